"""Vanilla word-level KD (Hinton et al., 2015; the "vanilla KD framework" of DSKD, arXiv 2406.17328):

    L = (1 - kd_rate) * CE(student, gold) + kd_rate * D(p_teacher^τ || q_student^τ)

on response tokens, same tokenizer. D is a divergence from `dualkd.losses` (forward KL by default), no τ².
When the two models pad their vocabularies differently (e.g. 151,936 vs 152,064 rows for one Qwen
tokenizer), KD uses the first `min(V_student, V_teacher, len(tokenizer))` rows: the padding rows are never
real tokens and are left out of both distributions.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.errors import ModelError
from dualkd.losses import DIVERGENCES, divergence, token_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm, lm_forward, token_accuracy
from dualkd.models import shared_vocab_size
from dualkd.schema import StrictModel


class KDConfig(StrictModel):
    name: Literal["kd"] = "kd"
    kd_rate: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the KD term; CE gets 1 - kd_rate (DSKD scripts: 0.5)."""
    temperature: float = Field(1.0, gt=0)
    """τ applied to both logits (DSKD scripts use 2.0). No τ² rescaling."""
    divergence: str = "fkl"
    """Divergence from `dualkd.losses.DIVERGENCES`."""


class KD(Objective):
    config_class = KDConfig
    needs_teacher = True
    config: KDConfig

    def setup(self, ctx: SetupContext) -> None:
        if self.config.divergence not in DIVERGENCES:
            raise ModelError(f"objective.divergence: unknown {self.config.divergence!r}; "
                             f"choose from {sorted(DIVERGENCES)}")
        if not ctx.same_tokenizer:
            raise ModelError(
                "objective `kd` needs the student and teacher to share one tokenizer, but their vocabularies "
                "differ; use a cross-tokenizer objective (dskd_cma, dskdv2, uld, mined)"
            )
        assert ctx.teacher is not None
        self.vocab_size = shared_vocab_size(ctx.student, ctx.teacher, ctx.student_tokenizer)

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module | None, batch: Batch) -> Tensor:
        assert teacher is not None
        tokens = batch.student  # same tokenizer: the teacher reads the student's tokens
        logits = lm_forward(teacher, tokens).logits
        return logits[tokens.loss_mask][:, : self.vocab_size]  # [N, V] response positions only

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Tensor, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        logits = lm_forward(student, tokens).logits  # [B, T, V_s]
        ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / norm["tokens"]
        student_rows = logits[tokens.loss_mask][:, : self.vocab_size]  # [N, V]
        kd = divergence(self.config.divergence, student_rows, teacher_out, temperature=self.config.temperature,
                        reduction="sum") / norm["tokens"]
        rate = self.config.kd_rate
        loss = (1 - rate) * ce + rate * kd
        acc = token_accuracy(logits.detach(), tokens.labels, tokens.loss_mask) / norm["tokens"]
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "acc": acc}
