"""A teacher section of a run config, and the one factory that opens any kind of teacher from it.

    teacher: {kind: live, path: HuggingFaceTB/SmolLM2-1.7B-Instruct}                  # teachers/live.py
    teacher: {kind: cache, cache: cache/}                                            # teachers/cached.py
    teacher: {kind: server, tokenizer: ..., server: {url: "http://127.0.0.1:8080"}}  # teachers/served.py
    teacher: {kind: several, members: {a: {path: ...}, b: {kind: cache, cache: ...}}}  # teachers/several.py

`kind` chooses the section's class from `KINDS` (filled in teachers/kinds.py); a section that names no kind
is a cache when it sets `cache`, a server when it sets `server`, else a live model. Every kind keeps the
model's fields (`path`, `tokenizer`, ...): they say which teacher it is, which a live teacher loads, a cache
is checked against and a server's tokenizer comes from.

Whoever needs a teacher — training (train/build.py), SeqKD's writer, `dualkd cache-teacher`, the frozen models
of DPO and AlignDistil (`teachers.<role>`) — calls `open_teacher` and then only the `Teacher` protocol.
A new kind is one file (its config class, subclassing `TeacherSpec`, and its `Teacher`) plus one line in
teachers/kinds.py.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator

from dualkd.data.collate import TokenizedExample
from dualkd.data.dataset import TokenizedDataset
from dualkd.models import ModelConfig, load_tokenizer
from dualkd.schema import ByKind
from dualkd.teachers.base import Teacher

KINDS: dict[str, type[ByKind]] = {}
"""Teacher kinds by name (`kind:` in a config): their config classes (registered in teachers/kinds.py)."""


@dataclass
class TeacherSite:
    """What a teacher is opened for: what its kind may need or check there."""

    field: str = "teacher"
    """Its key in the run config (`teacher`, `teachers.reverse`), for messages."""
    run_dir: Path = Path(".")
    """The run's folder (a served teacher keeps its answers under it)."""
    seed: int = 0
    """The run's seed (a live teacher built from random weights)."""
    seq2seq: bool = False
    """Whether the student is an encoder-decoder model (the teacher must be one too)."""
    dtype: torch.dtype = torch.float32
    """The student's parameter dtype (a cache's tensors come in it)."""
    splits: dict[str, list[TokenizedExample]] = dataclasses.field(default_factory=dict)
    """The teacher's view of the run's data by split ("train", "dev"): a cache refuses other data."""
    views: Callable[[Any], dict[str, TokenizedDataset]] | None = None
    """(a tokenizer) -> the run's data by split as datasets whose teacher view is that tokenizer's (the student's
    where the vocabularies match), aligned where the objective aligns: same examples, same order. Given by a
    training run, for a kind that holds several teachers with their own tokenizers (teachers/several.py)."""


class TeacherSpec(ModelConfig, ByKind):
    """The fields every teacher section has (see the module docstring)."""

    kinds: ClassVar[dict[str, type[ByKind]]] = KINDS
    kind: str
    scores_new_sequences: ClassVar[bool] = True
    """Whether it can be asked about sequences that are not the dataset's (on-policy samples, replay)."""
    dataset_only: ClassVar[str] = "holds the teacher's outputs on the dataset responses only"
    """Why not, where it cannot (the refusal's words)."""

    placement: Literal["auto", "same", "cpu_offload", "sharded"] = "auto"
    """Where a live teacher runs. `same`: a whole copy on every process's device. `cpu_offload`: the weights stay
    in CPU memory and each layer is copied to the device as it runs (accelerate's big-model offload; for
    teachers larger than the device's memory; objectives that read the LM head directly cannot use it).
    `sharded`: split over the processes with the student's engine (DeepSpeed ZeRO-3, FSDP2). `auto`: `sharded`
    under ZeRO-3 (every model is partitioned as it loads there), else `same`. Kept by every kind so that
    `teacher.cache=DIR` can be set on a live teacher's section; only a live teacher runs a model here."""

    @classmethod
    def default_kind(cls, data: dict[str, Any]) -> str:
        cache, server = data.get("cache") is not None, data.get("server") is not None
        if cache and server:
            raise ValueError("set `cache` or `server`, not both: a teacher is one kind")
        return "cache" if cache else "server" if server else "live"

    @model_validator(mode="after")
    def _frozen(self) -> TeacherSpec:
        if self.lora is not None:
            raise ValueError("lora: a teacher is frozen; give a trained adapter as `adapter`")
        if self.train_tokenizer is not None:
            raise ValueError("train_tokenizer: a teacher's tokenizer must come with the teacher")
        return self

    def load_tokenizer(self, field: str) -> Any:
        """The teacher's tokenizer (before the teacher opens: the data are tokenized with it first)."""
        return load_tokenizer(self, field=field)

    def provides(self) -> tuple[str, frozenset[str]] | None:
        """What the teacher this section opens is called in messages and what it can give, known before it opens
        (so that an objective that reads more is refused before any model loads); None: known once opened."""
        return None

    def cure(self, gap: frozenset[str], objective: str) -> str:
        """What to do when objective `objective` reads capabilities `gap` this kind cannot give (the end of
        the refusal)."""
        return "use a live teacher (`teacher.path`)"

    @abstractmethod
    def open(self, tokenizer: Any, site: TeacherSite) -> Teacher:
        """The teacher this section describes, checked against `site` (refused with the reason before any
        training step)."""


def open_teacher(spec: TeacherSpec, site: TeacherSite, tokenizer: Any = None) -> Teacher:
    """The one factory: any kind of teacher from its config section (`tokenizer`: loaded already)."""
    return spec.open(tokenizer if tokenizer is not None else spec.load_tokenizer(site.field), site)
