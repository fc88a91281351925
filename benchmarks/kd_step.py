"""Distillation step time vs two baselines and vs its GEMM floor, on real models (SmolLM2 <- SmolLM2 / Gemma-3).

    python benchmarks/kd_step.py                 # kd and dskdv2, both batches, 3 interleaved reps + peak memory
    python benchmarks/kd_step.py --objectives dskdv2 --batches longest-256 --reps 5 --no-memory
    python benchmarks/kd_step.py --device cuda   # on a GPU (scripts/gpu-check.sh): peak memory is CUDA's

Cases: `kd` / fkl, same vocabulary (SmolLM2-135M-Instruct teacher -> SmolLM2-135M-shaped student, vocab 49,152);
`dskdv2` with ETA across vocabularies (Gemma-3-270M teacher, vocab 262,144 -> SmolLM2-135M). Batches of Dolly
train: `longest-256` (the 4 longest examples, cut at 256 tokens) and `random-512` (4 examples drawn with seed 0,
cut at 512). Per case and batch, three variants run in one process, interleaved in rotating order after a
warm-up (benchmarks/harness.py):
- plain:  what a user writes without us: the teacher's forward returning full logits (no grad) + an HF SFT step
          (the student's logits at every position, cross-entropy, backward);
- strict: the least a distillation step must also do: the teacher's body without its head (no grad) + our fused
          CE SFT step (no [T, V] logits);
- kd:     what the training loop does per micro-batch: the objective's teacher forward, its counts, its loss,
          backward.
The optimizer step is left out of all three. GEMM floor: every variant runs once under torch's FLOP counter
(matrix products, forward and backward); floor = kd FLOPs ÷ baseline FLOPs × baseline time, the time the KD
step would take if it multiplied at the baseline's rate and did nothing else; "÷ floor" = measured ÷ floor.
Peak memory: each variant once in a fresh process (--no-memory skips it). The JSON record is written only when
the load average says the machine was not shared. Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import interleaved, start_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = REPO.parent / "shared" / "data" / "dolly" / "train.jsonl"
RESULTS = REPO / "benchmarks" / "results" / "kd_step.json"

CASES = {
    "kd": {"teacher": "smollm2-135m-instruct", "objective": {"name": "kd", "divergence": "fkl", "temperature": 2.0}},
    "dskdv2": {"teacher": "gemma-3-270m", "objective": {"name": "dskdv2", "temperature": 2.0}},
}
BATCHES = {"longest-256": ("longest", 256), "random-512": ("random", 512)}
VARIANTS = ("plain", "strict", "kd")


def _count_inplace_addmm() -> None:
    """torch's FLOP counter knows addmm, not its in-place form, which the fused losses use to accumulate."""
    import torch
    from torch.utils.flop_counter import mm_flop, register_flop_formula

    @register_flop_formula(torch.ops.aten.addmm_)
    def _addmm_(self, a, b, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN202
        return mm_flop(a, b)


def build(case: str, batch_name: str, device: str, teacher_dtype: str):  # noqa: ANN201
    """The case's models, objective and batch, and one callable per variant (each runs forward + backward)."""
    import contextlib

    import torch

    from dualkd.config import validate_config
    from dualkd.lm import head_of, lm_forward
    from dualkd.losses import token_cross_entropy
    from dualkd.losses.fused import fused_cross_entropy
    from dualkd.methods.base import StepNorm
    from dualkd.train.build import build_parts
    from dualkd.train.engine import LocalEngine
    from dualkd.train.step import TrainModule

    pick, seq_len = BATCHES[batch_name]
    spec = CASES[case]
    cfg = validate_config({
        "output_dir": "/tmp/dualkd-bench-kd-step",
        "student": {"path": str(MODELS / "smollm2-135m-instruct")},
        "teacher": {"path": str(MODELS / spec["teacher"]), "dtype": teacher_dtype},
        "data": {"train": str(DATA), "max_examples": 400, "max_length": seq_len + 1,
                 "max_prompt_length": seq_len // 2},
        "objective": spec["objective"],
    })
    parts = build_parts(cfg, Path("/tmp/dualkd-bench-kd-step"), LocalEngine())
    ds = parts.train_set
    if pick == "longest":
        rows = sorted(range(len(ds)), key=lambda i: -len(ds.student[i].ids))[:4]
    else:
        rows = random.Random(0).sample(range(len(ds)), 4)
    batch = ds.collate(rows).to(device)
    student, teacher, objective = parts.student.to(device), parts.teacher, parts.objective
    objective.to(device)  # its projectors, if any
    teacher.attach(torch.device(device), lambda m: m.to(device), contextlib.nullcontext)
    module = TrainModule(student, objective)
    student.train()
    tokens = batch.student

    def plain() -> None:
        with torch.no_grad():
            lm_forward(teacher.model, batch.teacher_view)  # full [T, V_t] logits
        logits = lm_forward(student, tokens).logits
        loss = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / tokens.loss_mask.sum()
        loss.backward()

    def strict() -> None:
        with torch.no_grad():
            lm_forward(teacher.model, batch.teacher_view, hidden=True, logits=False)  # the body only
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden
        head, bias = head_of(student)
        loss, _ = fused_cross_entropy(hidden, head, tokens.labels, bias=bias, mask=tokens.loss_mask)
        loss.backward()

    def kd() -> None:
        with torch.no_grad():
            teacher_out = objective.teacher_forward(teacher, batch)
            teacher_out, counts = objective.prepare(batch, teacher_out, student)
        loss, _ = module(batch, teacher_out, StepNorm({k: float(v) for k, v in counts.items()}))
        loss.backward()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):  # noqa: ANN001, ANN202
        def go() -> None:
            module.zero_grad(set_to_none=True)
            fn()
            sync()
        return go

    shape = {"student": list(tokens.input_ids.shape), "tokens": int(tokens.attention_mask.sum()),
             "response_tokens": int(tokens.loss_mask.sum())}
    return {"plain": timed(plain), "strict": timed(strict), "kd": timed(kd)}, shape


def time_worker(case: str, batch_name: str, reps: int, device: str, teacher_dtype: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    start_load(float(os.environ["DUALKD_BENCH_START_LOAD"]))
    variants, shape = build(case, batch_name, device, teacher_dtype)
    _count_inplace_addmm()
    flops = {}
    for name, fn in variants.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    timing = interleaved(variants, reps=reps, threads=torch.get_num_threads())
    return {"seconds": timing.seconds, "flops": flops, "shape": shape, "quiet": timing.quiet,
            "load": [timing.load_before, timing.load_after], "table": timing.table(baseline="plain", unit="s",
                                                                                    scale=1.0)}


def memory_worker(case: str, batch_name: str, variant: str, device: str, teacher_dtype: str) -> dict:
    """One run of one variant in this fresh process: peak memory above the loaded models and batch."""
    import torch

    variants, _ = build(case, batch_name, device, teacher_dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        variants[variant]()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    variants[variant]()
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}


def _subprocess(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DUALKD_BENCH_START_LOAD": str(start_load())}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> str:
    s = sorted(values)
    return f"{s[0]:.2f} / {s[len(s) // 2]:.2f} / {s[-1]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--objectives", default="kd,dskdv2")
    parser.add_argument("--batches", default=",".join(BATCHES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 runs the teacher's GEMMs faster on CPUs with AVX512-BF16")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--shared-ok", action="store_true", help="write the record even from a shared machine")
    args = parser.parse_args()
    common = ["--device", args.device, "--teacher-dtype", args.teacher_dtype]
    if args.worker:
        kind, *rest = args.worker
        if kind == "time":
            out = time_worker(*rest, args.reps, args.device, args.teacher_dtype)
        else:
            out = memory_worker(*rest, args.device, args.teacher_dtype)
        print(json.dumps(out))
        return
    start_load()
    if not (MODELS / ".done").exists() or not DATA.exists():
        sys.exit(f"needs real models in {MODELS} (../shared/tools/real-models) and Dolly at {DATA}")
    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# torch {torch.__version__}, {where}, {torch.get_num_threads()} threads; teacher in "
          f"{args.teacher_dtype}; {args.reps} interleaved reps; ratios min / median / max over reps", flush=True)
    records, quiet = [], True
    for case in args.objectives.split(","):
        for batch_name in args.batches.split(","):
            res = _subprocess(["--worker", "time", case, batch_name, "--reps", str(args.reps), *common])
            quiet &= res["quiet"]
            sec, flops = res["seconds"], res["flops"]
            row = {"case": case, "teacher": CASES[case]["teacher"], "batch": batch_name, **res}
            print(f"\n## {case} <- {CASES[case]['teacher']}, {batch_name}: student batch {res['shape']}")
            print(res["table"])
            for base in ("plain", "strict"):
                ratios = [k / b for k, b in zip(sec["kd"], sec[base])]
                floor = flops["kd"] / flops[base]
                vs_floor = [r / floor for r in ratios]
                row[f"ratio_{base}"], row[f"floor_{base}"], row[f"vs_floor_{base}"] = ratios, floor, vs_floor
                print(f"kd ÷ {base:6}: {_stats(ratios)}   GEMM floor {floor:.2f} "
                      f"(kd {flops['kd'] / 1e12:.3f} TFLOP, {base} {flops[base] / 1e12:.3f})   "
                      f"measured ÷ floor {_stats(vs_floor)}")
            if not args.no_memory:
                row["peak_mib"] = {v: _subprocess(["--worker", "memory", case, batch_name, v, *common])["peak_mib"]
                                   for v in VARIANTS}
                print("peak MiB above the loaded models: "
                      + ", ".join(f"{v} {m:,.0f}" for v, m in row["peak_mib"].items()))
            records.append(row)
            sys.stdout.flush()
    if not (quiet or args.shared_ok):
        print("not writing the record: the load average says the machine was shared; rerun on a quiet machine "
              "or pass --shared-ok")
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "device": where, "teacher_dtype": args.teacher_dtype,
                                   "threads": torch.get_num_threads(), "quiet": quiet, "records": records}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
