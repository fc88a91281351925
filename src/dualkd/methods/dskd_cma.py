"""Dual-Space KD with cross-model attention (CMA), for different vocabularies (arXiv 2406.17328 §3.3;
`version: 2` is DSKDv2's CMA, arXiv 2504.11426).

Each student position attends over the teacher's response positions (and the transpose), so that every
position of one model gets a mixture of the other model's states:

    Q = P_query([e_s(x); e_s(y)])                 student input-token and next-token embeddings   [B, Ts, 2dt]
    K = N([e_t(x_t); e_t(y_t)])                   teacher input-token and gold next-token embeddings [B, Tt, 2dt]
    A = Q Kᵀ / sqrt(2 dt), -1e5 where either position is not a response token (no causal mask)
    h_t2s = softmax(A) · P_t2s(N(h_t) + N(e_t(v_t)))   v_t = y_t (version 1) or argmax p_t (2)    [B, Ts, ds]
    h_s2t = softmax(Aᵀ) · P_s2t(h_s)                                                             [B, Tt, dt]

N(x) = x / std(x), the scalar (unbiased) std of x over the response positions of x's own sequence.

    L = (1 - r)·CE(z_s, y) + r·( D(p_t2s^τ/τ_t detached || q^τ) on positions where argmax z_t2s = y
                                + CE(h_t2s W_sᵀ, y)                        (trains P_t2s and P_query)
                                + D_t(p_t^τ || softmax(h_s2t W_tᵀ / τ)) )  on the teacher's response tokens

Version 1 (DSKD): D_t is forward KL; P_t2s, P_s2t and P_query are Linear layers with bias.
Version 2 (DSKDv2): the teacher's values use the embeddings of its own argmax predictions instead of the
gold targets (the keys keep the gold ones), P_s2t is the pseudo-inverse map recomputed from the student head
each step, P_t2s starts at its pseudo-inverse initialization, and D_t is the chosen divergence.
All terms are normalized by token counts of the global batch; the logits go through the fused chunked losses.

Deviation from the official code (docs/fidelity.md): the official N(·) takes one std over the whole padded
batch tensor (padded to 512 tokens there), so the attention temperature, and every example's loss, depends
on the padding and on the other examples of the micro-batch. Here each sequence is scaled by the std of its
own response positions: an example's loss is the same in any batch, and 8 x 1 and 2 x 4 make the same update.

The paper's idea, the official code as verified and the switches: docs/methods/dskd.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.align.vocab import shared_vocabulary
from dualkd.data.collate import Batch, ModelBatch
from dualkd.lm import check_head_is_linear, head_of, lm_forward, through_head
from dualkd.losses import fused_divergence
from dualkd.losses.fused import fused_argmax, fused_cross_entropy
from dualkd.methods.base import SetupContext, StepNorm
from dualkd.methods.common import DivergenceChoice, ProjectorChoice
from dualkd.methods.needs import Needs
from dualkd.methods.projectors import DualSpace
from dualkd.teachers import Teacher


class DSKDCMAConfig(DivergenceChoice, ProjectorChoice):
    name: Literal["dskd_cma"] = "dskd_cma"
    version: Literal[1, 2] = 1
    """1: DSKD's CMA; 2: DSKDv2's CMA (argmax-embedding values, pseudo-inverse projectors)."""
    teacher_temperature: float = Field(1.0, gt=0)
    """Extra temperature on the projected teacher distribution in student space (DSKD's --teacher-temperature)."""


@dataclass
class TeacherStates:
    hidden: Tensor  # [B, Tt, dt] last hidden states
    inputs: Tensor  # [B, Tt, dt] input embeddings of the teacher's tokens (response positions; else id 0)
    gold: Tensor  # [B, Tt, dt] embeddings of its gold next tokens (the keys)
    values: Tensor  # [B, Tt, dt] embeddings of the next tokens in the values: gold (v1), its own argmax (v2)
    head: Tensor
    bias: Tensor | None


def _scale_free(x: Tensor, mask: Tensor) -> Tensor:
    """N(x) = x / std(x) per sequence: one scalar, the unbiased std of all of x[b]'s entries at its response
    positions. [B, T, d], [B, T] bool -> [B, T, d]."""
    m = mask[:, :, None].to(x.dtype)
    n = (mask.sum(1) * x.shape[-1]).to(x.dtype)  # [B] entries per sequence
    mean = (x * m).sum((1, 2)) / n.clamp(min=1)
    var = (((x - mean[:, None, None]) * m) ** 2).sum((1, 2)) / (n - 1).clamp(min=1)
    return x / var.sqrt().clamp(min=1e-6)[:, None, None]


class DSKDCMA(DualSpace):
    def needs(self) -> Needs:
        return Needs(teacher=(frozenset({"hidden", "head", "embeddings"}),), teacher_tokens=True)

    config: DSKDCMAConfig

    def setup(self, ctx: SetupContext) -> None:
        assert ctx.teacher is not None
        teacher = ctx.teacher
        teacher.require({"hidden", "head", "embeddings"}, f"objective `{self.config.name}` (cross-model attention)")
        check_head_is_linear(ctx.student, "student")
        w_s, _ = head_of(ctx.student)
        w_t, _ = teacher.head()
        d_s, d_t = w_s.shape[1], w_t.shape[1]
        dtype = w_s.dtype
        v2 = self.config.version == 2
        self.query = nn.Linear(2 * d_s, 2 * d_t, dtype=dtype)  # before the projectors: their initialization order
        pinv_rows = None
        if v2:
            if ctx.same_tokenizer:
                student_ids = teacher_ids = torch.arange(min(w_s.shape[0], w_t.shape[0], len(ctx.student_tokenizer)))
            else:
                student_ids, teacher_ids = shared_vocabulary(ctx.student_tokenizer, ctx.teacher_tokenizer)
            pinv_rows = (w_t[teacher_ids], w_s[student_ids], student_ids)
        self.build_projectors(d_s, d_t, dtype, bias=not v2, pinv_rows=pinv_rows)

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        return {"tokens": batch.student.loss_mask.sum(), "teacher_tokens": self._teacher_tokens(batch).loss_mask.sum()}

    @staticmethod
    def _teacher_tokens(batch: Batch) -> ModelBatch:
        return batch.teacher_view

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> TeacherStates:
        tokens = self._teacher_tokens(batch)
        hidden = teacher.hidden(tokens)  # [B, Tt, dt]
        head, bias = teacher.head()
        if self.config.version == 2:
            next_ids = fused_argmax(hidden, head, bias, self.config.chunk_size)
        else:
            next_ids = tokens.labels
        embed = teacher.embeddings
        mask = tokens.loss_mask
        inputs = embed(torch.where(mask, tokens.input_ids, 0))
        gold = embed(torch.where(mask, tokens.labels, 0))
        values = embed(torch.where(mask, next_ids, 0)) if self.config.version == 2 else gold
        return TeacherStates(hidden, inputs, gold, values, head, bias)

    def forward(self, student: nn.Module, batch: Batch, teacher: TeacherStates, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = lm_forward(student, batch.student, hidden=True, logits=False).hidden  # [B, Ts, ds]
        return through_head(student, partial(self._loss, student=student, batch=batch, teacher=teacher, norm=norm),
                            hidden)

    def attention_scores(self, student: nn.Module, batch: Batch, teacher: TeacherStates) -> Tensor:
        """A: the cross-model attention's logits [B, Ts, Tt] (-1e5 off the response tokens); softmax over the
        last axis gives each student position's weights on the teacher's positions. Embeddings are looked up
        without gradient."""
        s_tok, t_mask = batch.student, self._teacher_tokens(batch).loss_mask
        s_mask = s_tok.loss_mask
        dtype = self.query.weight.dtype
        embed = student.get_input_embeddings()
        with torch.no_grad():
            s_emb = torch.cat([embed(torch.where(s_mask, s_tok.input_ids, 0)),
                               embed(torch.where(s_mask, s_tok.labels, 0))], dim=-1).to(dtype)
        query = self.query(s_emb)  # [B, Ts, 2dt]
        key = _scale_free(torch.cat([teacher.inputs, teacher.gold], dim=-1).to(dtype), t_mask)  # [B, Tt, 2dt]
        scores = query @ key.transpose(1, 2) / math.sqrt(key.shape[-1])
        return scores.masked_fill(~(s_mask[:, :, None] & t_mask[:, None, :]), -1e5)

    def _loss(self, w_s: Tensor, b_s: Tensor | None, hidden: Tensor, student: nn.Module, batch: Batch,
              teacher: TeacherStates, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """What reads the student's head (run inside its forward: `lm.through_head`)."""
        cfg = self.config
        s_tok, t_tok = batch.student, self._teacher_tokens(batch)
        s_mask, t_mask = s_tok.loss_mask, t_tok.loss_mask
        w_fixed, b_fixed = w_s.detach(), b_s.detach() if b_s is not None else None
        dtype = self.query.weight.dtype

        scores = self.attention_scores(student, batch, teacher)  # [B, Ts, Tt]
        t_values = self.t2s(_scale_free(teacher.hidden.to(dtype), t_mask)
                            + _scale_free(teacher.values.to(dtype), t_mask))  # [B, Tt, ds]
        h_t2s = torch.softmax(scores, dim=-1) @ t_values  # [B, Ts, ds]
        s_values = self.project_s2t(hidden, w_s)
        h_s2t = torch.softmax(scores.transpose(1, 2), dim=-1) @ s_values  # [B, Tt, dt]

        labels = s_tok.labels[s_mask]
        h_s_rows, h_t2s_rows = hidden[s_mask], h_t2s[s_mask]
        # student space; the KD counts only positions whose projected teacher predicts the gold token
        agree = fused_argmax(h_t2s_rows.detach(), w_fixed, b_fixed, cfg.chunk_size) == labels
        ce, hits = fused_cross_entropy(h_s_rows, w_s, labels, bias=b_s, chunk_size=cfg.chunk_size)
        kd_student = fused_divergence(cfg.divergence, h_s_rows, w_s, h_t2s_rows.detach() / cfg.teacher_temperature,
                                      w_fixed, mask=agree, temperature=cfg.temperature, reduction="sum",
                                      chunk_size=cfg.chunk_size, student_bias=b_s,
                                      teacher_bias=b_fixed / cfg.teacher_temperature if b_fixed is not None
                                      else None, **cfg.divergence_params)
        ce_t2s, t2s_hits = fused_cross_entropy(h_t2s_rows, w_fixed, labels, bias=b_fixed, chunk_size=cfg.chunk_size)
        # teacher space
        kd_name, kd_params = ("fkl", {}) if cfg.version == 1 else (cfg.divergence, cfg.divergence_params)
        kd_teacher = fused_divergence(kd_name, h_s2t[t_mask].to(teacher.head.dtype), teacher.head,
                                      teacher.hidden[t_mask], teacher.head, temperature=cfg.temperature,
                                      reduction="sum", chunk_size=cfg.chunk_size, student_bias=teacher.bias,
                                      teacher_bias=teacher.bias, **kd_params)
        n, n_t = norm["tokens"], norm["teacher_tokens"]
        ce, kd_student, ce_t2s, kd_teacher = ce / n, kd_student / n, ce_t2s / n, kd_teacher / n_t
        loss = norm.blend(ce, kd_student + ce_t2s + kd_teacher, cfg.kd_rate)
        return loss, {"ce": ce.detach(), "kd_student": kd_student.detach(), "ce_t2s": ce_t2s.detach(),
                      "kd_teacher": kd_teacher.detach(), "acc": hits / n, "t2s_acc": t2s_hits / n}
