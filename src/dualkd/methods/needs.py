"""What an objective needs of a run, declared once (`Objective.needs`): read by train/build.py, which refuses a
run that cannot give it before any model loads, and by the loop.

    def needs(self) -> Needs:
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,), teacher_tokens=True, aligner=ExactAligner)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RESPONSE_HIDDEN_AND_HEAD = frozenset({"response_hidden", "head"})
"""The teacher's last hidden states at the response positions and its LM head: what the fused losses read."""


@dataclass(frozen=True)
class Needs:
    teacher: tuple[frozenset[str], ...] = ()
    """The teacher's capabilities the objective reads (teachers/base.py), as alternatives: a teacher must give
    all of one of them (`kd` reads top-k from a cache, hidden states and head from a model). Empty: no
    teacher, and the loop never calls `teacher_forward`."""
    why: str = ""
    """What in the config asks for those capabilities, where a setting does (named when a teacher is refused)."""
    teacher_tokens: bool = False
    """Where the two vocabularies differ, the data is also tokenized with the teacher's tokenizer
    (`Batch.teacher`), and the teacher reads that view."""
    aligner: Callable[[Any, Any], Any] | None = None
    """Built from (student tokenizer, teacher tokenizer) where the views differ: pairs their positions
    (align/pairs.py); on-policy sources run it on student samples."""
    frozen: Mapping[str, str] = field(default_factory=dict)
    """Extra frozen models besides the teacher, by role (`teachers.<role>` in the config) -> what each is; they
    reach `setup` as `ctx.frozen`, opened as teachers."""
    data: Literal["responses", "pairs"] = "responses"
    """`pairs`: preference pairs (`PreferenceDataset`: chosen rows, then rejected rows), as DPO reads them."""
    counts_need_teacher: bool = False
    """The loop runs the teacher on every micro-batch of a step before `prepare` (denominators that depend on
    the teacher's predictions, such as DSKDv2's agreement count)."""
    eval_weight: str = "tokens"
    """The count that weights each dev batch's loss in the dev mean (DPO: pairs)."""
    unused_parameters: bool = False
    """Some trained parameters stop getting gradients mid-run (CBMI freezes its LM): DDP must look for them."""

    @property
    def distills(self) -> bool:
        """Whether there are distillation terms (a teacher to ask)."""
        return bool(self.teacher)

    @property
    def trains_on_samples(self) -> bool:
        """Whether student samples can stand in for the dataset's responses (on-policy, replay): distillation
        terms over single responses (not DPO's pairs, whose rejected response is data)."""
        return self.distills and self.data == "responses"

    def missing(self, provides: frozenset[str]) -> frozenset[str] | None:
        """None when a teacher that gives `provides` serves one alternative; else what the nearest lacks."""
        gaps = [alternative - provides for alternative in self.teacher]
        return None if not gaps or any(not gap for gap in gaps) else min(gaps, key=len)
