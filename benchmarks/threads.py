"""Torch threads for tiny models: training throughput of the demo's and the tiny recipes with 1 and 2 threads.

    python benchmarks/threads.py                        # demo teacher + tiny teacher recipes, 40 steps, 3 reps
    python benchmarks/threads.py --recipes demo-teacher --steps 60 --reps 5
    python benchmarks/threads.py --tests tests/test_losses.py,tests/methods --reps 3   # test files instead

Each run is `dualkd train RECIPE` for --steps steps in a fresh process started with OMP_NUM_THREADS=N and
torch's thread count N (so that both the intra-op pool and OpenMP obey it). Runs alternate between thread
counts in rotating order (3+ repetitions; benchmarks/harness.py's discipline, processes instead of calls).
Reported: median training tokens/s over steps 5.. of each run (the loop's own `tokens_per_s`), min / median /
max over repetitions, and the wall time of the run. Whether one thread wins for tiny models decides the
default; the load average is read at the start and after every run, and a shared machine is said so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import QUIET_LOAD, load_average, start_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(recipe: str, threads: int, steps: int, work: Path) -> tuple[float, float]:
    out = work / f"{recipe}-{threads}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); from dualkd.cli import main; "
            "sys.argv = ['dualkd'] + sys.argv[2:]; main()")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(threads), "train", str(REPO / "configs" / f"{recipe}.yaml"),
                    f"output_dir={out}", f"optimization.max_steps={steps}", "eval.every_steps=100000",
                    "checkpoint.every_steps=100000", "logging.progress_bar='off'"],
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if r.get("kind") == "train" and r["step"] >= 5]
    return statistics.median(speeds), wall


def one_test_run(paths: list[str], threads: int) -> float:
    """Wall seconds of `pytest -q PATHS` with OMP_NUM_THREADS=N (torch takes its thread count from it; the
    distributed tests set their own, 1 per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], env=env, check=True,
                   capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="demo-teacher,tiny-teacher")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tests", default="", help="instead of recipes: time `pytest -q` on these test files "
                        "(comma-separated) with each thread count")
    args = parser.parse_args()
    start = start_load()
    counts = [int(t) for t in args.threads.split(",")]
    loads = []
    if args.tests:
        paths = args.tests.split(",")
        print(f"# load average at the start {start:.2f}; pytest {' '.join(paths)}, {args.reps} interleaved reps")
        walls: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.reps):
            for k in range(len(counts)):
                n = counts[(r + k) % len(counts)]
                walls[n].append(one_test_run(paths, n))
                loads.append(load_average())
        for n in counts:
            w = sorted(walls[n])
            print(f"{n} thread(s): wall {w[0]:.1f} / {statistics.median(w):.1f} / {w[-1]:.1f} s (min / median / max)")
        base = statistics.median(walls[counts[0]])
        for n in counts[1:]:
            print(f"{n} ÷ {counts[0]} thread(s), median wall: {statistics.median(walls[n]) / base:.2f}")
        shared = start > QUIET_LOAD or max(loads) > max(counts) + QUIET_LOAD
        print(f"\n(load average {start:.2f} at the start, at most {max(loads):.2f} after a run"
              + (" — SHARED MACHINE: these figures are not figures)" if shared else ")"))
        return
    print(f"# load average at the start {start:.2f}; {args.steps} steps per run, {args.reps} interleaved reps")
    with tempfile.TemporaryDirectory(prefix="dualkd-threads-") as tmp:
        for recipe in args.recipes.split(","):
            results: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
            for r in range(args.reps):
                for k in range(len(counts)):
                    n = counts[(r + k) % len(counts)]
                    results[n].append(one_run(recipe, n, args.steps, Path(tmp)))
                    loads.append(load_average())
            print(f"\n## {recipe}")
            for n in counts:
                speeds = sorted(s for s, _ in results[n])
                walls = sorted(w for _, w in results[n])
                print(f"{n} thread(s): tokens/s {speeds[0]:7.0f} / {statistics.median(speeds):7.0f} / "
                      f"{speeds[-1]:7.0f} (min / median / max); wall {statistics.median(walls):.1f} s (median)")
    shared = start > QUIET_LOAD or max(loads) > max(counts) + QUIET_LOAD
    print(f"\n(load average {start:.2f} at the start, at most {max(loads):.2f} after a run"
          + (" — SHARED MACHINE: these figures are not figures)" if shared else ")"))


if __name__ == "__main__":
    main()
