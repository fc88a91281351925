"""What every objective is: an nn.Module that owns its trainable extras and turns a batch into (loss, metrics).

The one training loop calls, per micro-batch:
    teacher_out = objective.teacher_forward(teacher, batch)          # teachers/: a live model or a cache
    loss, metrics = objective(student, batch, teacher_out, norm)     # timed as "student", then backward
Objectives run models only through `lm_forward`, so every method sees outputs the same way.

Normalization: `norm[key]` is the count `key` (see `counts`) summed over the micro-batches of the optimizer
step and over all processes, divided by the number of processes (DDP averages gradients over processes).
A loss written as `per_token.sum() / norm["tokens"]` is therefore the token mean over the *global* batch,
whatever the micro-batch size, accumulation or process count. Metrics follow the same rule so that summing
them over micro-batches and averaging over processes gives global means.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.methods.common import DistillationConfig
from dualkd.methods.needs import Needs
from dualkd.schema import StrictModel
from dualkd.teachers.base import Teacher


@dataclass
class StepNorm:
    """What the loop tells an objective about the optimizer step: its loss denominators (see the module
    docstring), how far training is, and the weight of the gold cross-entropy."""

    counts: dict[str, float]
    step: int = 0
    """Optimizer steps done before this one (objectives with a schedule, e.g. CBMI's phase switch)."""
    ce_weight: float = 1.0
    """Multiplies the objective's gold-CE term: 0 on a step that trains on student samples (the loop adds the
    CE of the dataset responses those samples replace; samples have no gold)."""

    def __getitem__(self, key: str) -> float:
        # an all-masked global batch has zero sums; dividing by 1 keeps the loss 0 with finite gradients
        return max(self.counts[key], 1e-6)

    def ce_share(self, kd_rate: float) -> float:
        """The gold CE's weight in a distillation loss, (1 − r) · ce_weight: what a fused pass that computes
        both terms is given."""
        return (1 - kd_rate) * self.ce_weight

    def blend(self, ce: Tensor, kd: Tensor, kd_rate: float) -> Tensor:
        """(1 − r) · ce_weight · CE + r · KD: how every distillation objective composes its two terms (CE
        drops out on a step of student samples, which have no gold)."""
        return self.ce_share(kd_rate) * ce + kd_rate * kd


@dataclass
class SetupContext:
    """What an objective may inspect (and validate) before training starts."""

    student: nn.Module
    teacher: Teacher | None
    """What the objective reads of the teacher (teachers/base.py): say what in `setup` with `teacher.require`."""
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    same_tokenizer: bool
    student_pretrained: bool = True
    """False when the student starts from random weights (`student.init: random`)."""
    frozen: dict[str, Teacher] | None = None
    """The extra frozen models of `needs().frozen`, opened as teachers from the config's `teachers` (the student's
    tokenizer); read through their capabilities like the teacher (never trained, saved or wrapped)."""


class Objective(nn.Module, ABC):
    """A training objective: what it needs of the run (`needs`), its setup, its counts, what it asks the teacher
    and its loss. Its config class lives next to it (methods/<name>.py) and joins `ObjectiveConfig`."""

    def __init__(self, config: StrictModel):
        super().__init__()
        self.config = config

    def setup(self, ctx: SetupContext) -> None:
        """Validate models/tokenizers against the objective and build trainable extras (projectors)."""

    def gold_weight(self) -> float:
        """The weight of the gold cross-entropy in this objective: 1 - kd_rate for distillation objectives,
        else 1. (On a student-sampled step the loop trains the dataset responses with it.)"""
        return 1.0 - self.config.kd_rate if isinstance(self.config, DistillationConfig) else 1.0

    def needs(self) -> Needs:
        """What this objective needs of the run (methods/needs.py): none of a teacher by default."""
        return Needs()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for the objective's own parameters, e.g. [{"params": [...], "lr": 1e-3}]."""
        return []

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        """Counts that normalize this objective's losses (summed over the global batch by the loop)."""
        return {"tokens": batch.student.loss_mask.sum()}

    @torch.no_grad()
    def prepare(self, batch: Batch, teacher_out: Any, student: nn.Module) -> tuple[Any, dict[str, Tensor]]:
        """The loop's one call before a step's losses: returns the teacher outputs the loss will read and the
        batch's counts. `teacher_out` is None unless `needs().counts_need_teacher` (then denominators may depend on
        the teacher's and the current student's predictions, and the returned outputs may carry what was
        computed for them, e.g. DSKDv2's agreement mask)."""
        return teacher_out, self.counts(batch)

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher | None, batch: Batch) -> Any:
        """What the objective needs of the teacher for `batch`, asked of `teacher` (no gradients)."""
        return None

    @abstractmethod
    def forward(
        self, student: nn.Module, batch: Batch, teacher_out: Any, norm: StepNorm
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss for this micro-batch, already divided by the step's counts; detached metrics to log)."""


def token_accuracy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Number of counted positions where argmax(logits) == label (a sum; divide by a count)."""
    return ((logits.argmax(-1) == labels) & mask).sum().float()
