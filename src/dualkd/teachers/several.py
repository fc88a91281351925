"""Several teachers at once, each of any kind and with its own tokenizer (`teacher.kind: several`).

    teacher:
      kind: several
      members:
        a: {path: HuggingFaceTB/SmolLM2-360M-Instruct}               # live, the student's tokenizer
        b: {kind: cache, cache: cache-gemma/}                         # any kind; another tokenizer
    objective: {name: multi_teacher, combine: sum, weights: {a: 0.5, b: 0.5}, each: {name: dskdv2}}

What the members' outputs become is the `multi_teacher` objective's business (methods/multi_teacher.py); this
file opens the members and gives each its own view of the data. A member whose vocabulary differs from the
student's reads the data tokenized with its own tokenizer (and aligned to the student's tokens where the
objective aligns), made once before training by the run (`TeacherSite.views`), with the same examples in the
same order as the student's dataset; so one dataset index names one example for every member, and a member
cache is checked against its own view. Each member is opened with its own site (`teacher.members.<name>` in
messages) and the `Teacher` calls fan out: `attach`, `for_split`, `interrupt`, `close`, `modules`.

The run's batches carry the student's tokens only; `member_batch(name, indices)` collates a member's view of
given dataset examples (the student's tokens and, where its vocabulary differs, its own and the alignment), and
`routes(indices)` reads the records' `teacher` field. Several teachers read dataset responses only (their
views are made before training): on-policy and replay sources are refused with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from dualkd.data.collate import Batch
from dualkd.data.dataset import TokenizedDataset
from dualkd.errors import ConfigError
from dualkd.schema import of_kind
from dualkd.teachers.base import CAPABILITIES, Teacher
from dualkd.teachers.spec import TeacherSite, TeacherSpec, open_teacher

MEMBERS = "members"
"""The capability only several teachers give: separate teachers, each with its own view of the data."""


CURE = ("distil several teachers with `objective: {{name: multi_teacher, each: {{name: {objective}, ...}}}}`; "
        "`dualkd cache-teacher` writes one cache per member (that member as `teacher`)")


class SeveralTeachersConfig(TeacherSpec):
    """Several teachers by name, each a teacher section of its own kind."""

    kind: Literal["several"] = "several"
    scores_new_sequences: ClassVar[bool] = False
    dataset_only: ClassVar[str] = "gives each teacher its own tokenization of the dataset responses, made before " \
                                  "training"
    members: dict[str, of_kind(TeacherSpec)] = Field(min_length=2)  # type: ignore[valid-type]
    """The teachers by name (the names a record's `teacher` field and `objective.weights` use)."""

    def _loads_a_model(self) -> bool:
        return False

    @field_validator("members")
    @classmethod
    def _flat(cls, members: dict[str, Any]) -> dict[str, Any]:
        for name, spec in members.items():
            if spec.kind == "several":
                raise ValueError(f"{name}: a member is one teacher (kind live, cache, server, ...), not several")
            if not name.isidentifier():
                raise ValueError(f"{name!r}: a member's name must be a plain word (letters, digits, _)")
        return members

    def load_tokenizer(self, field: str) -> Any:
        return None  # each member has its own; the run's data are the student's tokens

    def provides(self) -> tuple[str, frozenset[str]]:
        return SeveralTeachers.what, SeveralTeachers.provides

    def cure(self, gap: frozenset[str], objective: str) -> str:
        return CURE.format(objective=objective)

    def open(self, tokenizer: Any, site: TeacherSite) -> SeveralTeachers:
        if site.views is None:
            raise ConfigError(f"{site.field}.kind=several: several teachers are opened by a training run only; "
                              "to cache them, write one cache per member (`dualkd cache-teacher` with that member "
                              "as `teacher`) and list the caches as members (kind: cache)")
        members, views = {}, {}
        for name, spec in self.members.items():
            field = f"{site.field}.members.{name}"
            own = spec.load_tokenizer(field)
            views[name] = site.views(own)  # split -> dataset whose teacher view is this member's
            member_site = replace(site, field=field, views=None,
                                  splits={s: d.teacher_view for s, d in views[name].items()})
            members[name] = open_teacher(spec, member_site, own)
        return SeveralTeachers(members, views)


class SeveralTeachers(Teacher):
    provides: ClassVar[frozenset[str]] = frozenset({MEMBERS})
    what: ClassVar[str] = "several teachers (teacher.kind: several)"

    def __init__(self, members: dict[str, Teacher], views: dict[str, dict[str, TokenizedDataset]],
                 split: str = "train"):
        super().__init__(tokenizer=None)
        self.members, self.views, self.split = members, views, split

    def _refuse(self, need: str, who: str) -> ConfigError:
        by = f"{who} reads " if who else "this needs "
        return ConfigError(f"{by}the teacher's {CAPABILITIES[need]}, which {self.what} cannot give as one; "
                           + CURE.format(objective="kd"))

    @property
    def identity(self) -> str | None:
        found = {name: t.identity for name, t in self.members.items() if t.identity is not None}
        return ";".join(f"{name}={identity}" for name, identity in sorted(found.items())) or None

    @property
    def vocab_rows(self) -> int:
        raise ConfigError("several teachers have no one vocabulary; read a member's (`members[name]`)")

    def modules(self) -> list[nn.Module]:
        return [m for t in self.members.values() for m in t.modules()]

    def describe(self, count_parameters: Callable[[nn.Module], int]) -> str:
        return "; ".join(f"{name}: {t.describe(count_parameters)}" for name, t in self.members.items())

    def attach(self, device: torch.device, place: Callable[[nn.Module, str], nn.Module],
               autocast: Callable[[], contextlib.AbstractContextManager], timer: Any = None,
               gather_head: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> None:
        for t in self.members.values():
            t.attach(device, place, autocast, timer, gather_head=gather_head)

    def for_split(self, split: str) -> SeveralTeachers:
        if split == self.split:
            return self
        return SeveralTeachers({n: t.for_split(split) for n, t in self.members.items()}, self.views, split)

    def interrupt(self) -> None:
        for t in self.members.values():
            t.interrupt()

    def close(self) -> None:
        for t in self.members.values():
            t.close()

    def dataset(self, name: str) -> TokenizedDataset:
        """Member `name`'s view of this split's data."""
        return self.views[name][self.split]

    def reads_student_tokens(self, name: str) -> bool:
        """Whether member `name` reads the student's tokens (its vocabulary is the student's)."""
        return self.dataset(name).teacher is None

    def member_batch(self, name: str, indices: list[int], device: torch.device) -> Batch:
        """Member `name`'s view of the dataset examples `indices` (collated, on `device`)."""
        return self.dataset(name).collate(indices).to(device)

    def routes(self, indices: list[int]) -> list[str | None]:
        """The record field `teacher` of each example (None where the record has none)."""
        examples = self.dataset(next(iter(self.members))).examples
        return [examples[i].teacher for i in indices]


__all__ = ["MEMBERS", "SeveralTeachers", "SeveralTeachersConfig"]
