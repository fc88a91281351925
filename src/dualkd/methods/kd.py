"""Vanilla word-level KD (Hinton et al., 2015; the "vanilla KD framework" of DSKD, arXiv 2406.17328):

    L = (1 - kd_rate) * CE(student, gold) + kd_rate * D(p_teacher^τ || q_student^τ)

on response tokens, same tokenizer. D is any divergence of `dualkd.losses` (forward KL by default), no τ².

Large vocabularies go through the fused chunked loss (`losses/fused.py`): the models return their last hidden
states and the loss multiplies them by the LM heads chunk by chunk, so no [N, V] logits exist. `fused: auto`
does this from `fused_min_vocab` rows on; both paths give the same numbers (tested).

When the two models pad their vocabularies differently (e.g. 151,936 vs 152,064 rows for one Qwen
tokenizer), D uses the first `min(V_student, V_teacher, len(tokenizer))` rows: the padding rows are never
real tokens and are left out of both distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from dualkd.data.collate import Batch, ModelBatch
from dualkd.errors import ModelError
from dualkd.losses import divergence, fused_kd_loss, token_cross_entropy
from dualkd.losses.divergences import SPECS
from dualkd.methods.base import Objective, SetupContext, StepNorm, lm_forward, token_accuracy
from dualkd.models import shared_vocab_size
from dualkd.schema import StrictModel

Divergence = Literal["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]


class KDConfig(StrictModel):
    name: Literal["kd"] = "kd"
    kd_rate: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the KD term; CE gets 1 - kd_rate (DSKD scripts: 0.5)."""
    temperature: float = Field(1.0, gt=0)
    """τ applied to both logits (DSKD scripts use 2.0). No τ² rescaling."""
    divergence: Divergence = "fkl"
    """fkl, rkl, js, tvd, skl, srkl or akl (see dualkd.losses.divergences)."""
    beta: float = Field(0.5, gt=0.0, lt=1.0)
    """js only: weight of KL(p || m), with m = βp + (1-β)q."""
    skew_lambda: float = Field(0.1, ge=0.0, lt=1.0)
    """skl/srkl only: the skew λ."""
    akl_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """akl only: teacher mass that defines the tail."""
    fused: Literal["auto", "on", "off"] = "auto"
    """Chunked loss from hidden states (never materializes [N, V] logits). `auto`: when the vocabulary has at
    least `fused_min_vocab` rows."""
    fused_min_vocab: int = Field(32000, ge=1)
    """Vocabulary size from which `fused: auto` uses the fused loss."""
    chunk_size: int | None = Field(None, ge=1)
    """Rows per chunk of the fused loss (None: about 8M logits per chunk)."""

    @model_validator(mode="after")
    def _params_belong_to_divergence(self) -> KDConfig:
        allowed = set(SPECS[self.divergence].params)
        fields = type(self).model_fields
        stray = {k for k in ("beta", "skew_lambda", "akl_alpha") if k not in allowed
                 and getattr(self, k) != fields[k].default}  # a default (e.g. in a saved config) is harmless
        if stray:
            raise ValueError(f"{sorted(stray)} do(es) not apply to divergence {self.divergence!r}")
        return self

    @property
    def divergence_params(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in SPECS[self.divergence].params}


@dataclass
class TeacherRows:
    """The teacher's view of the counted positions in fused mode: hidden states and its LM head."""

    hidden: Tensor  # [N, d_t]
    head: Tensor  # [V, d_t]
    bias: Tensor | None  # [V]


class KD(Objective):
    config_class = KDConfig
    needs_teacher = True
    config: KDConfig

    def setup(self, ctx: SetupContext) -> None:
        if not ctx.same_tokenizer:
            raise ModelError(
                "objective `kd` needs the student and teacher to share one tokenizer, but their vocabularies "
                "differ; use a cross-tokenizer objective (dskd_cma, dskdv2, uld, mined)"
            )
        assert ctx.teacher is not None
        self.vocab_size = shared_vocab_size(ctx.student, ctx.teacher, ctx.student_tokenizer)
        mode = self.config.fused
        self.fused = mode == "on" or (mode == "auto" and self.vocab_size >= self.config.fused_min_vocab)
        if self.fused:
            check_head_is_linear(ctx.student, "student")
            check_head_is_linear(ctx.teacher, "teacher")

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module | None, batch: Batch) -> Tensor | TeacherRows:
        assert teacher is not None
        tokens = batch.student  # same tokenizer: the teacher reads the student's tokens
        if self.fused:
            hidden = lm_forward(teacher, tokens, hidden=True, logits=False).hidden
            head, bias = _head(teacher)
            return TeacherRows(hidden[tokens.loss_mask], head[: self.vocab_size],
                               bias[: self.vocab_size] if bias is not None else None)
        logits = lm_forward(teacher, tokens).logits
        return logits[tokens.loss_mask][:, : self.vocab_size]  # [N, V] response positions only

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Tensor | TeacherRows, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        if isinstance(teacher_out, TeacherRows):
            return self._fused_loss(student, tokens, teacher_out, norm)
        logits = lm_forward(student, tokens).logits  # [B, T, V_s]
        ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / norm["tokens"]
        student_rows = logits[tokens.loss_mask][:, : self.vocab_size]  # [N, V]
        kd = divergence(self.config.divergence, student_rows, teacher_out, temperature=self.config.temperature,
                        reduction="sum", **self.config.divergence_params) / norm["tokens"]
        rate = self.config.kd_rate
        loss = (1 - rate) * ce + rate * kd
        acc = token_accuracy(logits.detach(), tokens.labels, tokens.loss_mask) / norm["tokens"]
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "acc": acc}

    def _fused_loss(self, student: nn.Module, tokens: ModelBatch, teacher: TeacherRows, norm: StepNorm
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden  # [B, T, d_s]
        head, bias = _head(student)
        loss, ce, kd, hits = fused_kd_loss(
            hidden[tokens.loss_mask], head, teacher.hidden, teacher.head, tokens.labels[tokens.loss_mask],
            divergence=self.config.divergence, kd_rate=self.config.kd_rate, temperature=self.config.temperature,
            vocab_size=self.vocab_size, chunk_size=self.config.chunk_size, student_bias=bias,
            teacher_bias=teacher.bias, params=self.config.divergence_params)
        n = norm["tokens"]
        return loss / n, {"ce": ce / n, "kd": kd / n, "acc": hits / n}


def _head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def check_head_is_linear(model: nn.Module, role: str) -> None:
    """The fused loss computes logits as last_hidden @ head.T (+ bias). Models that post-process logits
    (soft-capping, scaling) would silently get a different loss: refuse them with a clear message."""
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device)[None] % max(model.get_input_embeddings().weight.shape[0], 1)
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    model.train(was_training)
    weight, bias = _head(model)
    logits = torch.nn.functional.linear(out.hidden_states[-1], weight, bias)
    if not torch.allclose(logits.float(), out.logits.float(), atol=1e-3, rtol=1e-3):
        raise ModelError(f"the {role}'s logits are not last_hidden_state @ lm_head (the model post-processes them, "
                         "e.g. logit soft-capping); set objective.fused: off")
