"""Supervised fine-tuning: next-token cross-entropy on the response tokens (the SFT baseline of every paper).

    L = Σ_t −log softmax(z_s,t)[y_t] / #tokens      over response tokens (+ EOS)

Large vocabularies go through the fused chunked CE (`losses/fused.py`): the model returns its last hidden
states and the loss multiplies them by the LM head chunk by chunk, so the [B, T, V] logits never exist
(Gemma-3's 262,144-token head: 2 GB of logits per 8 x 256 micro-batch, several times that with their
log-softmax and gradient). `fused: auto` does this from `fused_min_vocab` rows on; both paths give the same
numbers (tested).

`label_smoothing: ε` trains on fairseq's label-smoothed CE instead (the Transformer NMT baseline, ε = 0.1);
the logged `ce` stays the plain CE, so dev numbers compare across ε. It reads the dense logits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.lm import check_head_is_linear, gold_cross_entropy
from dualkd.losses.cross_entropy import label_smoothed_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.spec import ObjectiveSpec
from dualkd.models import head_rows
from dualkd.schema import AutoOnOff


class SFTConfig(ObjectiveSpec):
    name: Literal["sft"] = "sft"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """ε of the label-smoothed CE the model trains on (0: plain CE; ε > 0 needs the dense logits)."""
    fused: AutoOnOff = "auto"
    """The fused chunked CE (no [B, T, V] logits): `auto` from `fused_min_vocab` head rows on, without label
    smoothing, under every engine (the head is read inside its module's forward); `on` / `off` force it."""
    fused_min_vocab: int = Field(32000, ge=1)
    """Vocabulary size from which `fused: auto` uses the fused CE."""
    chunk_size: int | None = Field(None, ge=1)
    """Rows per chunk of the fused CE (None: sized to the vocabulary)."""

    @model_validator(mode="after")
    def _smoothing_is_dense(self) -> SFTConfig:
        if self.fused == "on" and self.label_smoothing > 0:
            raise ValueError("label_smoothing reads the dense logits: set fused: off (or auto)")
        return self


class SFT(Objective):
    config: SFTConfig

    def setup(self, ctx: SetupContext) -> None:
        mode = self.config.fused
        self.fused = self.config.label_smoothing == 0 and (
            mode == "on" or (mode == "auto" and head_rows(ctx.student) >= self.config.fused_min_vocab))
        if self.fused:
            check_head_is_linear(ctx.student, "student")

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Any, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, n = batch.student, norm["tokens"]
        ce, hits, logits = gold_cross_entropy(student, tokens, self.fused, self.config.chunk_size)
        ce, acc, eps = ce / n, hits / n, self.config.label_smoothing
        if eps:  # label smoothing reads the logits (never fused: `setup`)
            loss = label_smoothed_cross_entropy(logits, tokens.labels, tokens.loss_mask, eps).sum() / n
        else:
            loss = ce
        return loss * norm.ce_weight, {"ce": ce.detach(), "acc": acc}
