"""Supervised fine-tuning: next-token cross-entropy on the response tokens (the SFT baseline of every paper)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.losses import token_cross_entropy
from dualkd.methods.base import Objective, StepNorm, lm_forward, token_accuracy
from dualkd.schema import StrictModel


class SFTConfig(StrictModel):
    name: Literal["sft"] = "sft"


class SFT(Objective):
    config_class = SFTConfig

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Any, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        logits = lm_forward(student, tokens).logits  # [B, T, V]
        ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / norm["tokens"]
        acc = token_accuracy(logits.detach(), tokens.labels, tokens.loss_mask) / norm["tokens"]
        return ce * batch.ce_scale, {"ce": ce.detach(), "acc": acc}
