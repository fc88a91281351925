"""The offline teacher cache: bytes per token, write and read throughput, the packed encoding's effect on the KD
loss, KD step time from cache vs live.

    python benchmarks/cache.py                     # SmolLM2-135M teacher and student, Dolly, k = 16/64/128
    python benchmarks/cache.py --examples 128 --reps 5

Every timing: the variants in one process, interleaved in rotating order after a warm-up, --reps repetitions,
min / median / max (benchmarks/harness.py); a warning when the load average says the machine was shared.

- bytes per cached response token at k = 16, 64, 128: the packed encoding (teachers/cache_codec.py), or plain
  top-k ids (uint16 for vocabularies up to 65,536, else int32) + log-probabilities (fp16, fp32), + the tail mass
  (fp32), and the hidden states (bf16) on top when `--hidden` is asked for. The anchor: DistillKit's ~300 bytes
  per token (compressed) at top-k 128.
- write throughput: response tokens per second of `write_cache` (teacher forward + top-k + files);
- read throughput: response tokens per second of `TeacherCache.targets` for random batches of 8 examples;
- the KD loss (`sparse_kl`, the top-k + tail bucket forward KL `kd` trains with, τ = 1) per response token from
  the top-128 caches, packed and float16 against float32, for three students that share the teacher's
  tokenizer: SmolLM2 without its last layer (29 of 30 layers: near the teacher), without its last 4 (far: a
  pruned student before distillation) and a random-init model of its shape (uniform-like);
- KD step (`kd`, top_k = 64, batch 4 × 256): the teacher's targets from a live forward vs from the cache, then
  the same student loss and backward; the ratio cache ÷ live per repetition.
Needs ../shared/tools/real-models and ../shared/data/dolly.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import Timing, interleaved, spread, start_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = REPO.parent / "shared" / "data" / "dolly" / "train.jsonl"
SETTINGS = ((16, "float16", False), (64, "packed", False), (64, "float16", False), (64, "float32", False),
            (128, "packed", False), (128, "float16", False), (128, "float32", False),
            (128, "float16", True))  # k, encoding, hidden states


def _shared(timing: Timing) -> str:
    return "" if timing.quiet else " - SHARED MACHINE: these figures are not figures"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=64, help="Dolly examples cached per k (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="KD steps timed per side (default 3)")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    start_load()

    import torch

    from dualkd.config import validate_config
    from dualkd.data.dataset import pad_id
    from dualkd.methods.base import StepNorm
    from dualkd.teachers import CachedTeacher
    from dualkd.teachers.cache_files import TeacherCache, write_cache
    from dualkd.train.build import build_parts
    from dualkd.train.engine import LocalEngine
    from dualkd.train.step import TrainModule

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
    print("| k | encoding | hidden | bytes/token | write tokens/s (min / median / max) | read tokens/s |")
    print("|---|---|---|---|---|---|")
    try:
        def writer(k: int, encoding: str, hidden: bool):  # noqa: ANN202
            out = root / f"k{k}-{encoding}-{int(hidden)}"

            def write() -> Path:
                shutil.rmtree(out, ignore_errors=True)
                write_cache(out, teacher, examples, model, pad_id=pad_id(tokenizer), k=k, hidden=hidden,
                            encoding=encoding, shard_examples=32, batch_size=8)
                return out
            return write

        def reader(folder: Path):  # noqa: ANN202
            def read() -> int:
                cache, rng = TeacherCache(folder), random.Random(0)
                return sum(len(cache.targets(rng.sample(range(len(examples)), 8))) for _ in range(50))
            return read

        writes = interleaved({c: writer(*c) for c in SETTINGS}, reps=args.reps, threads=torch.get_num_threads())
        reads = interleaved({c: reader(writes.last[c]) for c in SETTINGS}, reps=args.reps,
                            threads=torch.get_num_threads())
        for c in SETTINGS:
            k, encoding, hidden = c
            write_rates = [tokens / sec for sec in writes.seconds[c]]
            read_rates = [reads.last[c] / sec for sec in reads.seconds[c]]
            size = TeacherCache(writes.last[c]).bytes_per_token()
            print(f"| {k} | {encoding} | {'bf16' if hidden else '–'} | {size:.0f} | {spread(write_rates, '{:,.0f}')} | "
                  f"{spread(read_rates, '{:,.0f}')} |")
        print(f"(writes: load average {writes.load_before:.2f} before, {writes.load_after:.2f} after{_shared(writes)};"
              f" reads: {reads.load_before:.2f}, {reads.load_after:.2f}{_shared(reads)})")

        loss_error(model, examples, pad_id(tokenizer), {e: writes.last[(128, e, False)]
                                                        for e in ("packed", "float16", "float32")})

        # KD step from the live teacher vs from the cache, same batch, same loss
        live_obj = parts.objective
        module = TrainModule(parts.student, live_obj)
        longest = sorted(range(len(ds)), key=lambda i: -len(ds.student[i].ids))[: args.batch_size]
        step_dir = root / "step"
        write_cache(step_dir / "train", teacher, examples, model, pad_id=pad_id(tokenizer), k=64,
                    encoding="float32", shard_examples=32)
        cached = CachedTeacher(step_dir, tokenizer, dtype=torch.float32)
        cached.attach(torch.device("cpu"))

        def step(source) -> None:  # noqa: ANN001
            b = ds.collate(longest)
            with torch.no_grad():  # the cache read counts in the cached step's time
                out = live_obj.teacher_forward(source, b)
            n = float(b.student.loss_mask.sum())
            loss, _ = module(b, out, StepNorm({"tokens": n}))
            loss.backward()
            parts.student.zero_grad(set_to_none=True)

        steps = interleaved({"live": lambda: step(teacher), "cache": lambda: step(cached)}, reps=args.reps,
                            threads=torch.get_num_threads())
        live, from_cache = steps.seconds["live"], steps.seconds["cache"]
        print(f"\nKD step (top-64, batch {args.batch_size} x 256), s min / median / max: live teacher "
              f"{spread(live, '{:.2f}')}, from cache {spread(from_cache, '{:.2f}')}, ratio cache / live "
              f"{spread([c / v for c, v in zip(from_cache, live)], '{:.2f}')} (load average {steps.load_before:.2f}"
              f" before, {steps.load_after:.2f} after{_shared(steps)})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def loss_error(model: str, examples: list, pad: int, caches: dict[str, Path]) -> None:
    """The KD loss per response token from each top-128 cache, against the float32 one, for three students."""
    import torch

    from benchmarks.cache_layouts import sharing_students
    from dualkd.data.collate import pad_batch
    from dualkd.losses.sparse import sparse_kl
    from dualkd.teachers.cache_files import TeacherCache

    labels = {"near": "29 of 30 layers (near)", "far": "26 of 30 layers (far)", "random": "random init (uniform-like)"}
    students = {labels[name]: m for name, m in sharing_students(Path(model)).items()}
    targets = {e: TeacherCache(folder).targets(list(range(len(examples)))) for e, folder in caches.items()}
    print(f"\nKD loss (sparse_kl, top-128 + tail, tau 1) per response token over {len(targets['float32'])} tokens, "
          "against the float32 cache: mean |difference| per token / difference of the mean / the float32 loss")
    print("| student | packed vs float32 | float16 vs float32 | float32 loss |")
    print("|---|---|---|---|")
    for name, student in students.items():
        rows = []
        with torch.no_grad():
            for start in range(0, len(examples), 8):
                tokens = pad_batch(examples[start:start + 8], pad)
                out = student(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                              output_hidden_states=True)
                rows.append(out.hidden_states[-1][tokens.loss_mask])
            hidden, head = torch.cat(rows), student.get_output_embeddings().weight
            loss = {e: sparse_kl(hidden, head, t, reduction="none").double() for e, t in targets.items()}
        cells = []
        for e in ("packed", "float16"):
            d = loss[e] - loss["float32"]
            cells.append(f"{d.abs().mean():.1e} / {d.mean():+.1e}")
        print(f"| {name} | {cells[0]} | {cells[1]} | {loss['float32'].mean():.3f} |")


if __name__ == "__main__":
    main()
