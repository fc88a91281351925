"""Distillation step time vs its parts: KD step ÷ (teacher forward + student SFT step), on real models.

    python benchmarks/kd_step.py                # SmolLM2-135M student; batch 4 x 256 tokens of Dolly
    python benchmarks/kd_step.py --reps 5 --objectives kd,dskdv2
    python benchmarks/kd_step.py --device cuda  # on a GPU (scripts/gpu-check.sh): peak memory is CUDA's

Cases (each in a fresh subprocess, so that its peak memory is its own):
- `kd` / fkl, same vocabulary: SmolLM2-135M teacher -> SmolLM2-135M-shaped student (vocab 49,152);
- `dskdv2` with ETA across vocabularies: Gemma-3-270M teacher (vocab 262,144) -> SmolLM2-135M.
The baseline of a case runs, on the same batch, a teacher forward that returns logits (no grad) and a student
SFT step (forward, CE, backward). The KD step is what the training loop does per micro-batch: the objective's
teacher forward, its counts, its loss, backward. Times are medians over --reps after one warm-up; the
optimizer step is left out of both sides. Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = REPO.parent / "shared" / "data" / "dolly" / "train.jsonl"

CASES = {
    "kd": {"teacher": "smollm2-135m-instruct", "objective": {"name": "kd", "divergence": "fkl", "temperature": 2.0}},
    "dskdv2": {"teacher": "gemma-3-270m", "objective": {"name": "dskdv2", "temperature": 2.0}},
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(case: str, part: str, reps: int, batch_size: int, seq_len: int, teacher_dtype: str, device: str = "cpu"
           ) -> dict:
    import contextlib

    import torch

    from dualkd.config import validate_config
    from dualkd.lm import lm_forward
    from dualkd.losses import token_cross_entropy
    from dualkd.methods.base import StepNorm
    from dualkd.train.build import build_parts
    from dualkd.train.engine import LocalEngine
    from dualkd.train.loop import TrainModule

    spec = CASES[case]
    cfg = validate_config({
        "output_dir": "/tmp/dualkd-bench-kd-step",
        "student": {"path": str(MODELS / "smollm2-135m-instruct")},
        "teacher": {"path": str(MODELS / spec["teacher"]), "dtype": teacher_dtype},
        "data": {"train": str(DATA), "max_examples": 400, "max_length": seq_len + 1, "max_prompt_length": 128},
        "objective": spec["objective"],
    })
    parts = build_parts(cfg, Path("/tmp/dualkd-bench-kd-step"), LocalEngine())
    ds = parts.train_set
    longest = sorted(range(len(ds)), key=lambda i: -len(ds.student[i].ids))[:batch_size]
    batch = ds.collate(longest).to(device)
    student, teacher, objective = parts.student.to(device), parts.teacher, parts.objective
    objective.to(device)  # its projectors, if any
    teacher.attach(torch.device(device), lambda m: m.to(device), contextlib.nullcontext)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    module = TrainModule(student, objective)
    student.train()

    def baseline() -> None:
        with torch.no_grad():
            lm_forward(teacher.model, batch.teacher_view)  # the teacher as a KD step would need it: full logits
        tokens = batch.student
        logits = lm_forward(student, tokens).logits
        loss = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / tokens.loss_mask.sum()
        loss.backward()

    def kd_step() -> None:
        with torch.no_grad():
            teacher_out = objective.teacher_forward(teacher, batch)
            teacher_out, counts = objective.prepare(batch, teacher_out, student)
        loss, _ = module(batch, teacher_out, StepNorm({k: float(v) for k, v in counts.items()}))
        loss.backward()

    run = baseline if part == "baseline" else kd_step
    times = []
    for i in range(reps + 1):
        module.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        run()
        sync()
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_mib()
    return {"seconds": statistics.median(times), "peak_mib": peak,
            "tokens": int(batch.student.attention_mask.sum()), "shape": list(batch.student.input_ids.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "PART"), help=argparse.SUPPRESS)
    parser.add_argument("--objectives", default="kd,dskdv2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 runs the teacher's GEMMs ~2.7x faster on CPUs with AVX512-BF16")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.reps, args.batch_size, args.seq_len, args.teacher_dtype,
                                args.device)))
        return
    if not (MODELS / ".done").exists() or not DATA.exists():
        sys.exit(f"needs real models in {MODELS} (../shared/tools/real-models) and Dolly at {DATA}")
    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# torch {torch.__version__}, {where}, {torch.get_num_threads()} threads; batch {args.batch_size} x "
          f"{args.seq_len} tokens; teacher in {args.teacher_dtype}; median of {args.reps}")
    print(f"{'objective':10} {'teacher':24} | {'teacher fwd + SFT s':>19} {'KD step s':>10} {'ratio':>6} | "
          f"{'baseline MiB':>12} {'KD MiB':>8}")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for case in args.objectives.split(","):
        res = {}
        for part in ("baseline", "kd"):
            done = subprocess.run([sys.executable, __file__, "--worker", case, part, "--reps", str(args.reps),
                                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                                   "--teacher-dtype", args.teacher_dtype, "--device", args.device],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            res[part] = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = res["kd"]["seconds"] / res["baseline"]["seconds"]
        print(f"{case:10} {CASES[case]['teacher']:24} | {res['baseline']['seconds']:19.2f} "
              f"{res['kd']['seconds']:10.2f} {ratio:6.2f} | {res['baseline']['peak_mib']:12.0f} "
              f"{res['kd']['peak_mib']:8.0f}   (student batch {res['kd']['shape']})", flush=True)


if __name__ == "__main__":
    main()
