"""The offline teacher cache: bytes per token, write and read throughput, KD step time from cache vs live.

    python benchmarks/cache.py                     # SmolLM2-135M teacher and student, Dolly, k = 16/64/128
    python benchmarks/cache.py --examples 128 --reps 5

- bytes per cached response token at k = 16, 64, 128: top-k ids (uint16 for vocabularies up to 65,536, else
  int32) + log-probabilities (fp16, and fp32 at k = 64) + the tail mass (fp32), and the hidden states (bf16) on
  top when `--hidden` is asked for. The anchor: DistillKit's ~300 bytes per token (compressed) at top-k 128.
- write throughput: response tokens per second of `write_cache` (teacher forward + top-k + files);
- read throughput: response tokens per second of `TeacherCache.targets` for random batches of 8 examples;
- KD step (`kd`, top_k = 64, batch 4 × 256): the teacher's targets from a live forward vs from the cache, then
  the same student loss and backward; medians over --reps after a warm-up, side by side in one process.
Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = REPO.parent / "shared" / "data" / "dolly" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64, help="Dolly examples cached per k (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="KD steps timed per side (default 3)")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    import torch

    from dualkd.config import validate_config
    from dualkd.data.dataset import pad_id
    from dualkd.methods.base import StepNorm
    from dualkd.teachers import CachedTeacher
    from dualkd.teachers.cache_files import TeacherCache, write_cache
    from dualkd.train.build import build_parts
    from dualkd.train.engine import LocalEngine
    from dualkd.train.loop import TrainModule

    torch.manual_seed(0)
    model = str(MODELS / "smollm2-135m-instruct")
    cfg = {"output_dir": "/tmp/dualkd-bench-cache", "student": {"path": model}, "teacher": {"path": model},
           "data": {"train": str(DATA), "max_examples": args.examples, "max_length": 257, "max_prompt_length": 128},
           "objective": {"name": "kd", "top_k": 64}}
    engine = LocalEngine("cpu")
    parts = build_parts(validate_config(cfg), Path("/tmp/dualkd-bench-cache"), engine)
    teacher, tokenizer, ds = parts.teacher, parts.teacher_tokenizer, parts.train_set
    examples = ds.teacher_view
    tokens = sum(len(x.ids) - x.prompt_len for x in examples)
    root = Path(tempfile.mkdtemp(prefix="dualkd-bench-cache-"))
    print(f"SmolLM2-135M-Instruct teacher, {len(examples)} Dolly examples, {tokens} response tokens, "
          f"{torch.get_num_threads()} threads")
    print("| k | log-probs | hidden | bytes/token | write tokens/s | read tokens/s |")
    print("|---|---|---|---|---|---|")
    try:
        for k, dtype, hidden in ((16, "float16", False), (64, "float16", False), (64, "float32", False),
                                 (128, "float16", False), (128, "float16", True)):
            out = root / f"k{k}-{dtype}-{int(hidden)}"
            t0 = time.perf_counter()
            write_cache(out, teacher, examples, model, pad_id=pad_id(tokenizer), k=k, hidden=hidden,
                        logprob_dtype=dtype, shard_examples=32, batch_size=8)
            write_s = time.perf_counter() - t0
            cache = TeacherCache(out)
            rng = random.Random(0)
            t0, read = time.perf_counter(), 0
            for _ in range(50):
                read += len(cache.targets(rng.sample(range(len(examples)), 8)))
            read_s = time.perf_counter() - t0
            print(f"| {k} | {dtype} | {'bf16' if hidden else '–'} | {cache.bytes_per_token():.0f} | "
                  f"{tokens / write_s:,.0f} | {read / read_s:,.0f} |")

        # KD step from the live teacher vs from the cache, same batch, same loss
        live_obj = parts.objective
        module = TrainModule(parts.student, live_obj)
        longest = sorted(range(len(ds)), key=lambda i: -len(ds.student[i].ids))[: args.batch_size]
        step_dir = root / "step"
        write_cache(step_dir / "train", teacher, examples, model, pad_id=pad_id(tokenizer), k=64,
                    logprob_dtype="float32", shard_examples=32)
        cached = CachedTeacher(step_dir, tokenizer, dtype=torch.float32)
        cached.attach(torch.device("cpu"))

        def step(from_cache: bool) -> None:
            b = ds.collate(longest)
            with torch.no_grad():  # the cache read counts in the cached step's time
                out = live_obj.teacher_forward(cached if from_cache else teacher, b)
            n = float(b.student.loss_mask.sum())
            loss, _ = module(b, out, StepNorm({"tokens": n}))
            loss.backward()
            parts.student.zero_grad(set_to_none=True)

        times: dict[bool, list[float]] = {False: [], True: []}
        for side in (False, True):
            step(side)  # warm-up
        for _ in range(args.reps):
            for side in (False, True):
                t0 = time.perf_counter()
                step(side)
                times[side].append(time.perf_counter() - t0)
        live, cached = statistics.median(times[False]), statistics.median(times[True])
        print(f"\nKD step (top-64, batch {args.batch_size} x 256): live teacher {live:.2f} s, from cache "
              f"{cached:.2f} s, ratio {cached / live:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
