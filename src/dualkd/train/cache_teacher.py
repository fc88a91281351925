"""`dualkd cache-teacher`: run a config's teacher once over the run's own data and write an offline cache.

    dualkd cache-teacher configs/kd.yaml --out cache/ --top-k 64 [--hidden]
    dualkd train configs/kd.yaml teacher.cache=cache/

The data are built exactly as training builds them (tokenizers, truncation, skipped records: `build_parts`),
so the cache covers the examples training will read, in order. The teacher is opened by the same factory as in
training and asked through the `Teacher` protocol (top-k, and with `--hidden` its response hidden states and LM
head), like every objective asks it.
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from dualkd.config import RunConfig
from dualkd.data.dataset import pad_id
from dualkd.errors import ConfigError
from dualkd.models import is_encoder_decoder
from dualkd.outputs import claim, mark
from dualkd.progress import ProgressLines
from dualkd.teachers import TeacherSite, open_teacher
from dualkd.teachers.cache_files import write_cache
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.sources import OffPolicyConfig


def cache_teacher(cfg: RunConfig, out: str | Path, *, k: int = 64, hidden: bool = False,
                  encoding: str = "packed", shard_examples: int = 1024, batch_size: int = 8,
                  overwrite: bool = False) -> list[dict[str, Any]]:
    """Write (or resume) the cache of `cfg.teacher` over the train and dev data of `cfg`; returns the manifests.
    `out` must be new, empty or a cache (to resume), unless `overwrite`; one process writes it at a time."""
    if cfg.teacher is None:
        raise ConfigError("cache-teacher: the config needs a `teacher` to run (e.g. `teacher.path`)")
    for name, value in (("--top-k", k), ("--shard-examples", shard_examples), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"cache-teacher {name} {value}: must be ≥ 1")
    out = claim(out, "teacher cache", overwrite=overwrite, recognise=lambda f: (f / "train" / "manifest.json").exists())
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        mark(out, "teacher cache")
        return _cache_teacher(cfg, out, k, hidden, encoding, shard_examples, batch_size)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (a second cache-teacher into the same folder is refused, not raced)."""
    with (out / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"--out {out}: another `dualkd cache-teacher` is writing this cache now; wait for it "
                              "(rerunning afterwards resumes after its last complete shard)") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_teacher(cfg: RunConfig, out: Path, k: int, hidden: bool, encoding: str, shard_examples: int,
                   batch_size: int) -> list[dict[str, Any]]:
    assert cfg.teacher is not None
    cfg = cfg.model_copy(update={"source": OffPolicyConfig()})  # the dataset's responses, as training reads them
    parts = build_parts(cfg, Path(cfg.output_dir), LocalEngine())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = parts.teacher  # the objective's own teacher, else (an objective without one) the config's
    if teacher is None:
        teacher = open_teacher(cfg.teacher, TeacherSite(run_dir=Path(cfg.output_dir), seed=cfg.seed,
                                                        seq2seq=is_encoder_decoder(cfg.student)))
    teacher.require({"topk", *(("response_hidden", "head") if hidden else ())}, "cache-teacher")
    if teacher.k is not None and teacher.k < k:
        raise ConfigError(f"cache-teacher --top-k {k}: {teacher.what} gives its top {teacher.k} only")
    teacher.attach(device, LocalEngine(device).place_teacher, contextlib.nullcontext)  # the weights' own dtype
    tokenizer = teacher.tokenizer
    manifests = []
    for split, dataset in (("train", parts.train_set), ("dev", parts.dev_set)):
        if dataset is None:
            continue
        examples = dataset.teacher_view
        lines = ProgressLines(len(examples), f"caching {split}", None)  # a log file gets plain lines
        with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task(f"caching {split}", total=len(examples))

            def advance(n: int, bar: Progress = bar, task: Any = task, lines: ProgressLines = lines) -> None:
                bar.advance(task, n)
                lines.advance(n)

            manifests.append(write_cache(Path(out) / split, teacher, examples, cfg.teacher.path or "random",
                                         pad_id=pad_id(tokenizer), k=k, hidden=hidden, encoding=encoding,
                                         shard_examples=shard_examples, batch_size=batch_size, device=device,
                                         progress=advance))
    return manifests
