"""A teacher read from an offline cache (`dualkd cache-teacher`, files in teachers/cache_files.py).

    teacher: {kind: cache, path: HuggingFaceTB/SmolLM2-1.7B-Instruct, cache: cache/}   # the model is not loaded

It returns what the cache holds: the teacher's top-k log-probabilities at every response position, and with
`--hidden` its last hidden states there and its LM head. Objectives that read more (logits at every
position, hidden states outside the response, the model's embeddings) are refused before training. It
reads by dataset index, one split at a time (`for_split`); its tensors come in the student's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from dualkd.data.collate import ModelBatch, TokenizedExample
from dualkd.errors import DataError, ModelError
from dualkd.losses.sparse import TopKTargets
from dualkd.models import load_tokenizer
from dualkd.schema import HomePath
from dualkd.teachers.base import Teacher
from dualkd.teachers.cache_files import CacheMismatch, TeacherCache, tokenizer_fingerprint
from dualkd.teachers.spec import TeacherSite, TeacherSpec


def _same_source(a: str, b: str) -> bool:
    """Whether two `teacher.path` values name the same model: equal as written, or the same local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _gives(hidden: bool) -> frozenset[str]:
    """What a cache gives: its top-k, and with `--hidden` the response hidden states and the head."""
    return frozenset({"topk", "response_hidden", "head"} if hidden else {"topk"})


def cache_tokenizer(cache_dir: str | Path) -> Any:
    """The teacher tokenizer saved in a cache."""
    from transformers import AutoTokenizer

    folder = Path(cache_dir) / "train" / "tokenizer"
    if not folder.exists():
        raise DataError(f"teacher.cache: no teacher cache at {cache_dir} (expected {folder}); write one with "
                        f"`dualkd cache-teacher CONFIG --out {cache_dir}`")
    return AutoTokenizer.from_pretrained(folder)


class CachedTeacherConfig(TeacherSpec):
    """An offline teacher cache (the folder `dualkd cache-teacher` wrote): the teacher's outputs are read from
    it and no teacher model is loaded. `path`, when given, names the teacher the cache must have been written
    by; a local `tokenizer` (or `path`) folder is compared with the cache's tokenizer by content."""

    kind: Literal["cache"] = "cache"
    scores_new_sequences: ClassVar[bool] = False
    cache: HomePath
    """The cache folder. It holds the top-k log-probabilities of the training and dev responses (and with
    `--hidden` the hidden states there and the LM head): `kd` (top-k), `dskd` and `dskdv2` train from it;
    objectives that read more are refused before training."""

    def _loads_a_model(self) -> bool:
        return False

    def load_tokenizer(self, field: str) -> Any:
        return cache_tokenizer(self.cache)

    def provides(self) -> tuple[str, frozenset[str]] | None:
        try:  # the manifest says whether hidden states were written; a missing cache is refused when it opens
            hidden = bool(json.loads((Path(self.cache) / "train" / "manifest.json").read_text())["hidden"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return CachedTeacher.what, _gives(hidden)

    def cure(self, gap: frozenset[str], objective: str) -> str:
        hidden = ", or write the cache with `dualkd cache-teacher ... --hidden`" if gap <= {"response_hidden",
                                                                                         "head"} else ""
        return super().cure(gap, objective) + hidden

    def open(self, tokenizer: Any, site: TeacherSite) -> CachedTeacher:
        cached = CachedTeacher(self.cache, tokenizer, dtype=site.dtype)
        source = self.tokenizer_source
        local = source is not None and Path(source).expanduser().is_dir()  # a hub id is named, not downloaded
        cached.check_teacher(self.path, load_tokenizer(self, field=site.field) if local else None)
        for split, examples in site.splits.items():  # refuse a cache of other data, naming what differs
            cached.for_split(split).check(examples)
        return cached


class CachedTeacher(Teacher):
    what: ClassVar[str] = "an offline teacher cache"

    def __init__(self, folder: str | Path, tokenizer: Any, dtype: torch.dtype, split: str = "train",
                 _shared: dict[str, Any] | None = None):
        super().__init__(tokenizer)
        self.folder, self.dtype, self.split = Path(folder), dtype, split
        # the splits' readers and the head's device copies, shared by the views of every split
        self._shared = _shared if _shared is not None else {"caches": {}, "heads": {}}
        self.cache = self._reader(split)
        self.provides = _gives(bool(self.cache.manifest["hidden"]))

    def _reader(self, split: str) -> TeacherCache:
        caches = self._shared["caches"]
        if split not in caches:
            caches[split] = TeacherCache(self.folder / split)
        return caches[split]

    def _refuse(self, need: str, who: str) -> Exception:
        error = super()._refuse(need, who)
        if need in ("response_hidden", "head"):
            error.args = (error.args[0] + ", or write the cache with `dualkd cache-teacher ... --hidden` "
                          f"({self.folder} holds no hidden states)",)
        return error

    def for_split(self, split: str) -> CachedTeacher:
        return self if split == self.split else CachedTeacher(self.folder, self.tokenizer, self.dtype, split,
                                                              self._shared)

    def check(self, examples: list[TokenizedExample]) -> None:
        """Refuse a cache of other data (this split's teacher tokenization) or another tokenizer."""
        self.cache.check(self.tokenizer, examples)
        train = self._reader("train")
        if self.cache.k != train.k:
            raise CacheMismatch(f"{self.folder}: train and {self.split} caches have different k "
                                f"({train.k} vs {self.cache.k})")

    def check_teacher(self, path: str | None, tokenizer: Any | None) -> None:
        """Refuse a cache written by another teacher than the run's `teacher.path`, naming both; `tokenizer`:
        the run's teacher tokenizer where it is at hand (a local folder), compared by content."""
        written_by = str(self.cache.manifest["teacher"])
        if path is not None and not _same_source(path, written_by):
            raise CacheMismatch(f"teacher.cache {self.folder} was written by the teacher {written_by!r}, but "
                                f"teacher.path is {path!r}; point teacher.path at the cache's teacher (or drop it: "
                                "the cache holds its tokenizer), or write a cache of this teacher")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.cache.manifest["tokenizer"]:
            raise CacheMismatch(f"teacher.cache {self.folder} was written with another tokenizer than the run's "
                                f"teacher {path!r} has (sha256 {self.cache.manifest['tokenizer'][:12]}... vs "
                                f"{tokenizer_fingerprint(tokenizer)[:12]}...)")

    @property
    def k(self) -> int:
        return self.cache.k

    def describe(self, count_parameters: Any) -> str:
        return f"teacher read from the cache {self.folder}"

    @property
    def vocab_rows(self) -> int:
        return int(self.cache.manifest["vocab"])

    def head(self) -> tuple[Tensor, Tensor | None]:
        """The cached head (bf16 on disk) in the student's dtype, on the device last asked for (copied once)."""
        if "head" not in self.provides:
            raise self._refuse("head", "")
        heads = self._shared["heads"]
        device = self._shared.get("device", torch.device("cpu"))
        if device not in heads:
            weight, bias = self.cache.head()
            heads[device] = (weight.to(device=device, dtype=self.dtype),
                             bias.to(device=device, dtype=self.dtype) if bias is not None else None)
        return heads[device]

    def attach(self, device: torch.device, place: Any = None, autocast: Any = None, timer: Any = None,
               gather_head: Any = None) -> None:
        self._shared["device"] = torch.device(device)  # reads need no placement, autocast or timing

    def response_hidden(self, tokens: ModelBatch, indices: list[int]) -> Tensor:
        if "response_hidden" not in self.provides:
            raise self._refuse("response_hidden", "")
        hidden = self.cache.hidden(indices)
        if hidden.shape[0] != tokens.num_loss_tokens:
            raise ModelError(f"the teacher cache holds {hidden.shape[0]} response rows for these examples but the "
                             f"batch has {tokens.num_loss_tokens} (a cache of other data or truncation?)")
        return hidden.to(device=tokens.input_ids.device).to(self.dtype)  # [N, d]

    def topk(self, tokens: ModelBatch, indices: list[int], k: int, vocab_size: int,
             chunk_size: int | None = None) -> TopKTargets:
        if k != self.k:
            raise ModelError(f"top-{k} targets asked of a teacher cache that holds the top {self.k}")
        return self.cache.targets(indices).to(tokens.input_ids.device)
