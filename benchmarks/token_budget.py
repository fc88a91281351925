"""Token-budget micro-batches vs a fixed example count: training tokens per second on Dolly, `kd` and `dskdv2`.

    python benchmarks/token_budget.py                          # kd (SmolLM2 <- SmolLM2), dskdv2 (SmolLM2 <- Gemma-3)
    python benchmarks/token_budget.py --objectives kd --budgets 1024,2048,4096 --reps 3

The same global batches (16 Dolly examples each, drawn and length-bucketed as training draws them, max length
512) go through the step's work — per micro-batch the objective's teacher forward, its counts, its loss and
backward; no optimizer step — split two ways: `optimization.micro_batch_size` examples per pass (today's
default, 8), or passes of at most `optimization.micro_batch_tokens` padded tokens (`sources.token_budget_split`).
The update is the same either way (the loss is normalized by the step's global counts); only the passes differ.
Variants are timed in one process, interleaved (benchmarks/harness.py); tokens/s counts real (unpadded) tokens.
Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import interleaved, may_write, start_load  # noqa: E402
from benchmarks.kd_step import CASES, DATA, MODELS  # noqa: E402  (the same models and data)

GLOBAL = 16


def run(parts, module, micro_batches: list[list[list[int]]]) -> None:  # noqa: ANN001
    """The steps' work, pass by pass: teacher forwards and counts of every pass first, then loss + backward."""
    import torch

    from dualkd.methods.base import StepNorm

    ds, objective = parts.train_set, parts.objective
    for step in micro_batches:
        batches = [ds.collate(m) for m in step]
        with torch.no_grad():
            outs = [objective.teacher_forward(parts.teacher, b) for b in batches]
            prepared = [objective.prepare(b, o, parts.student) for b, o in zip(batches, outs)]
        totals: dict[str, float] = {}
        for _, counts in prepared:
            for k, v in counts.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        norm = StepNorm(totals)
        for b, (out, _) in zip(batches, prepared):
            loss, _ = module(b, out, norm)
            loss.backward()
        module.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", default="kd,dskdv2")
    parser.add_argument("--budgets", default="2048,4096")
    parser.add_argument("--batches", type=int, default=2, help="global batches of 16 per timed run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shared-ok", action="store_true")
    args = parser.parse_args()
    start_load()
    if not (MODELS / ".done").exists() or not DATA.exists():
        sys.exit(f"needs real models in {MODELS} (../shared/tools/real-models) and Dolly at {DATA}")
    import torch

    from dualkd.config import validate_config
    from dualkd.train.build import build_parts
    from dualkd.train.engine import LocalEngine
    from dualkd.train.sources import OffPolicySource, token_budget_split
    from dualkd.train.step import TrainModule

    threads = torch.get_num_threads()
    print(f"# torch {torch.__version__}, CPU, {threads} threads; {args.batches} global batches of {GLOBAL} "
          f"Dolly examples (max length 512) per timed run")
    quiet = True
    for case in args.objectives.split(","):
        spec = CASES[case]
        cfg = validate_config({
            "output_dir": "/tmp/dualkd-bench-token-budget",
            "student": {"path": str(MODELS / "smollm2-135m-instruct")},
            "teacher": {"path": str(MODELS / spec["teacher"])},
            "data": {"train": str(DATA), "max_examples": 400, "max_length": 512, "max_prompt_length": 256},
            "objective": spec["objective"],
        })
        parts = build_parts(cfg, Path("/tmp/dualkd-bench-token-budget"), LocalEngine())
        ds = parts.train_set
        parts.teacher.attach(torch.device("cpu"), lambda m: m, contextlib.nullcontext)
        module = TrainModule(parts.student, parts.objective)
        source = OffPolicySource(ds, GLOBAL, 1, 1, 0, seed=10)
        steps = source.epoch_order(0)[: args.batches]  # each sorted by length, from length-bucketed chunks
        lengths = ds.lengths
        splits = {"8 examples per pass": [[b[i:i + 8] for i in range(0, GLOBAL, 8)] for b in steps]}
        for budget in map(int, args.budgets.split(",")):
            splits[f"<= {budget} tokens per pass"] = [token_budget_split([b], lengths, budget)[0] for b in steps]
        real = sum(lengths[i] for b in steps for i in b)  # input tokens (a sequence less its last token)

        timing = interleaved({name: (lambda s=s, p=parts, m=module: run(p, m, s)) for name, s in splits.items()},
                             reps=args.reps, threads=threads)
        baseline = "8 examples per pass"
        print(f"\n## {case} (teacher {spec['teacher']}); {real} real tokens per timed run")
        for name, s in splits.items():
            passes = sum(len(step) for step in s)
            padded = sum(len(m) * max(lengths[i] for i in m) for step in s for m in step)
            t = timing.summary(name, baseline)
            ratio = f"{t['ratio_min']:.2f} / {t['ratio_median']:.2f} / {t['ratio_max']:.2f}" if "ratio_median" in t \
                else "1"
            print(f"{name:24} {passes:3d} passes, {padded:6d} padded tokens | tokens/s {real / t['max_s']:6.0f} / "
                  f"{real / t['median_s']:6.0f} / {real / t['min_s']:6.0f} (min / median / max) | time ÷ "
                  f"{baseline}: {ratio}")
        print(timing.table(baseline, unit="s", scale=1.0).splitlines()[-1])
        quiet = quiet and timing.quiet
    if not quiet:
        may_write(timing, args.shared_ok)


if __name__ == "__main__":
    main()
