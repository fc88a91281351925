"""Supervised fine-tuning: next-token cross-entropy on the response tokens (the SFT baseline of every paper).

`label_smoothing: ε` trains on fairseq's label-smoothed CE instead (the Transformer NMT baseline, ε = 0.1);
the logged `ce` stays the plain CE, so dev numbers compare across ε."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.lm import lm_forward
from dualkd.losses import token_cross_entropy
from dualkd.losses.cross_entropy import label_smoothed_cross_entropy
from dualkd.methods.base import Objective, StepNorm, token_accuracy
from dualkd.schema import StrictModel


class SFTConfig(StrictModel):
    name: Literal["sft"] = "sft"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """ε of the label-smoothed CE the model trains on (0: plain CE)."""


class SFT(Objective):
    config_class = SFTConfig

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Any, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        logits = lm_forward(student, tokens).logits  # [B, T, V]
        ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / norm["tokens"]
        acc = token_accuracy(logits.detach(), tokens.labels, tokens.loss_mask) / norm["tokens"]
        eps = self.config.label_smoothing
        loss = ce if eps == 0 else label_smoothed_cross_entropy(logits, tokens.labels, tokens.loss_mask,
                                                                 eps).sum() / norm["tokens"]
        return loss * norm.ce_weight, {"ce": ce.detach(), "acc": acc}
