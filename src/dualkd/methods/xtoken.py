"""X-Token (NVIDIA NeMo RL's cross-tokenizer distillation, `CrossTokenizerDistillationLossFn`; arXiv 2605.21699):
the student's distribution carried into the teacher's vocabulary by a sparse projection built from string rules,
compared with the teacher's chunk by chunk.

    W          [V_s, V_t] student -> teacher projection, ≤ 4 entries per row, rows summing to 1
               (align/projection.py: each token re-encoded by the other tokenizer, exact pairs one-hot)
    chunks     per example, the response tokens of both tokenizations cut where both have a token boundary at
               the same character (align/groups.py); a chunk's rows on a side are the positions predicting its
               tokens, C_s and C_t of them
    P-KL       q̄ = (1/|C_s|)·Σ_{i∈C_s} softmax(z_s,i / τ) · W,   q̂ = q̄ / (Σ q̄ + ε)
               t̄ = (1/|C_t|)·Σ_{j∈C_t} log_softmax(z_t,j / τ)
               per chunk  Σ_v e^{t̄_v}·(t̄_v − log(q̂_v + ε)),   ε = 1e-10
    H-KL       s̄ = (1/|C_s|)·Σ_{i∈C_s} log_softmax(z_s,i / τ),  t̄ as above;  (c_s, c_t) the pairs where W's largest
               entry of row c_s is ≥ 0.6 and lands on c_t (a teacher token claimed by several student tokens goes to
               the one with the largest entry, ties to the lowest id); U_s, U_t the rest of each vocabulary
               per chunk  Σ_(c_s,c_t) e^{t̄_ct}·(t̄_ct − s̄_cs)  +  Σ_{k<m} |top_k(e^{s̄}[U_s]) − top_k(e^{t̄}[U_t])|,
               m = min(|U_s|, |U_t|, 8192), both sorted descending
    L = (1 − r)·CE(z_s, y)/n + r·τ²·Σ_chunks (per chunk) / (number of chunks),   n the student's response tokens

t̄ is a mean of log-probabilities, not the log of a mean: e^{t̄} need not sum to 1 (the official code's choice,
kept). The probabilities of a slice of chunks are computed from both models' hidden states and heads and
recomputed in backward (checkpointed), so no [chunks, V] tensor outlives its slice. The teacher is read at
response positions only: a cache written with `--hidden` serves it.

Deviations from NeMo RL's code (docs/fidelity.md): chunks are span groups on character offsets, exact by
construction, where NeMo RL aligns canonicalized token strings by dynamic programming (and also scores chunks whose
texts differ); P-KL compares the whole teacher vocabulary, where NeMo RL keeps the `vocab_topk` (8,192) teacher
tokens with the largest logit anywhere in the micro-batch — the same thing whenever V_t ≤ 8,192, and a set that
would change with the micro-batch's composition otherwise; the chunk count that divides the KD term is the
optimizer step's (as NeMo RL's global count across data-parallel ranks); CE and KD are mixed as (1 − r)·CE + r·KD,
where NeMo RL's default rescales KD to CE's size each step (`dynamic_loss_scaling`) and NeMo RL's H-KL path is
called "gold loss with xtoken_loss"; positions are the response's, where NeMo RL distills every position of
pretraining text.

The paper's idea, the official code as read and the switches: docs/methods/baselines.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dualkd.align.projection import Projection, xtoken_projection
from dualkd.data.collate import Batch, ModelBatch
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses.fused import default_chunk_size, fused_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import DistillationConfig
from dualkd.methods.grouped import SideGroups, grouped_tokens
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.models import head_rows
from dualkd.teachers import Teacher

_EPS = 1e-10  # NeMo RL's: the projected chunk's renormalization and its log


class XTokenConfig(DistillationConfig):
    name: Literal["xtoken"] = "xtoken"
    loss: Literal["pkl", "hkl"] = "pkl"
    """pkl: KL to the teacher of the student projected into the teacher's vocabulary (NeMo RL's default);
    hkl: KL on the exactly mapped tokens plus sorted L1 on the rest (NeMo RL: gold_loss with xtoken_loss)."""
    temperature: float = Field(1.0, gt=0)
    """τ of both models' softmax (NeMo RL: 1); the KD term is multiplied by τ²."""
    top_k: int = Field(4, ge=1)
    """Entries kept per row of the projection (NeMo RL's runtime top-k: 4)."""
    exact_threshold: float = Field(0.6, gt=0.0, le=1.0)
    """hkl: a student token maps exactly when its largest projection entry reaches this (NeMo RL: 0.6)."""
    uncommon_top_k: int = Field(8192, ge=1)
    """hkl: the sorted L1 compares at most this many probabilities per side (NeMo RL: 8192)."""
    chunk_size: int | None = Field(None, ge=1)
    """Chunks per checkpointed slice (None: about 16M probabilities per slice)."""


@dataclass
class ChunkedTeacher:
    hidden: Tensor  # [N_t, d_t] the teacher's last hidden states at its response positions
    student: SideGroups
    teacher: SideGroups


def exact_pairs(projection: Projection, threshold: float, v_t: int) -> tuple[Tensor, Tensor]:
    """(student ids, teacher ids) of H-KL's exact map (module docstring), sorted by student id."""
    top_w, top_t = projection.weights[:, 0], projection.indices[:, 0]
    s = torch.nonzero((top_w >= threshold) & (top_t >= 0) & (top_t < v_t)).squeeze(1)
    t, w = top_t[s], top_w[s]
    best = torch.full((v_t,), -1.0).scatter_reduce(0, t, w, reduce="amax")
    s, t = s[w >= best[t]], t[w >= best[t]]
    first = torch.full((v_t,), len(projection.weights), dtype=torch.long).scatter_reduce(0, t, s, reduce="amin")
    keep = s == first[t]
    return s[keep], t[keep]


def _rest(ids: Tensor, size: int) -> Tensor:
    rest = torch.ones(size, dtype=torch.bool)
    rest[ids] = False
    return rest.nonzero().squeeze(1)


def _rows(hidden: Tensor, head: Tensor, bias: Tensor | None, side: SideGroups, first: int, last: int
          ) -> tuple[Tensor, Tensor, Tensor]:
    """The logits of groups [first, last) of one side [R, V], each row's group (from 0) and the group sizes."""
    a, b = int(side.bounds[first]), int(side.bounds[last])
    rows, group = side.rows[a:b], side.group[a:b] - first
    z = hidden[rows] @ head.T if bias is None else torch.addmm(bias, hidden[rows], head.T)
    if z.dtype in (torch.float16, torch.bfloat16):  # ε = 1e-10 and the sorted tails need float32
        z = z.float()
    sizes = torch.bincount(group, minlength=last - first).to(z.dtype)
    return z, group, sizes


def _chunk_mean(values: Tensor, group: Tensor, sizes: Tensor) -> Tensor:
    return values.new_zeros(sizes.numel(), values.shape[1]).index_add(0, group, values) / sizes[:, None]


class XToken(Objective):
    def needs(self) -> Needs:
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,), teacher_tokens=True)

    config: XTokenConfig

    def setup(self, ctx: SetupContext) -> None:
        assert ctx.teacher is not None
        ctx.teacher.require({"response_hidden", "head"}, "objective `xtoken`")
        check_head_is_linear(ctx.student, "student")
        w_t, b_t = ctx.teacher.head()
        self.v_s = min(head_rows(ctx.student), len(ctx.student_tokenizer))  # padding rows are no tokens
        self.v_t = min(w_t.shape[0], len(ctx.teacher_tokenizer))
        proj = xtoken_projection(ctx.student_tokenizer, ctx.teacher_tokenizer, v_s=self.v_s, v_t=self.v_t,
                                 top_k=self.config.top_k)
        self.register_buffer("proj_indices", proj.indices, persistent=False)
        self.register_buffer("proj_weights", proj.weights, persistent=False)
        c_s, c_t = exact_pairs(proj, self.config.exact_threshold, self.v_t)
        for name, ids, size in (("s", c_s, self.v_s), ("t", c_t, self.v_t)):
            self.register_buffer(f"{name}_common", ids, persistent=False)
            self.register_buffer(f"{name}_uncommon", _rest(ids, size), persistent=False)
        self.register_buffer("teacher_head", w_t.detach()[: self.v_t].clone(), persistent=False)  # frozen: once
        self.register_buffer("teacher_bias", b_t.detach()[: self.v_t].clone() if b_t is not None else None,
                             persistent=False)

    @property
    def projection(self) -> Projection:
        return Projection(self.proj_indices, self.proj_weights)

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        student, _ = grouped_tokens(batch.student, batch.teacher_view)
        return {"tokens": batch.student.loss_mask.sum(), "chunks": torch.tensor(student.bounds.numel() - 1)}

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> ChunkedTeacher:
        t_tokens = batch.teacher_view
        student, teacher_side = grouped_tokens(batch.student, t_tokens)
        return ChunkedTeacher(teacher.response_hidden(t_tokens, batch.indices), student, teacher_side)

    def forward(self, student: nn.Module, batch: Batch, teacher: ChunkedTeacher, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden
        return through_head(student, partial(self._loss, tokens=tokens, teacher=teacher, norm=norm), hidden)

    def _loss(self, w_s: Tensor, b_s: Tensor | None, hidden: Tensor, tokens: ModelBatch, teacher: ChunkedTeacher,
              norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """What reads the student's head (run inside its forward: `lm.through_head`)."""
        cfg = self.config
        ce, hits = fused_cross_entropy(hidden, w_s, tokens.labels, bias=b_s, mask=tokens.loss_mask,
                                       chunk_size=cfg.chunk_size)
        h_s = hidden[tokens.loss_mask]  # [N_s, d_s]
        w_s, b_s = w_s[: self.v_s], b_s[: self.v_s] if b_s is not None else None
        w_t = self.teacher_head.to(w_s.dtype)
        b_t = self.teacher_bias.to(w_s.dtype) if self.teacher_bias is not None else None
        h_t = teacher.hidden.to(w_s.dtype)
        chunks = teacher.student.bounds.numel() - 1
        step = cfg.chunk_size or max(1, default_chunk_size(max(chunks, 1), self.v_s + 2 * self.v_t) // 4)
        kd = h_s.new_zeros(())
        for first in range(0, chunks, step):
            last = min(first + step, chunks)
            kd = kd + checkpoint(self._slice, h_s, w_s, b_s, h_t, w_t, b_t, teacher, first, last,
                                 use_reentrant=False)
        kd = kd * cfg.temperature**2 / norm["chunks"]
        ce = ce / norm["tokens"]
        loss = norm.blend(ce, kd, cfg.kd_rate)
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "acc": hits / norm["tokens"]}

    def _slice(self, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor, w_t: Tensor, b_t: Tensor | None,
               teacher: ChunkedTeacher, first: int, last: int) -> Tensor:
        """Σ over chunks [first, last) of the per-chunk term of the module docstring (τ² left out)."""
        tau = self.config.temperature
        z_s, g_s, n_s = _rows(h_s, w_s, b_s, teacher.student, first, last)  # [R_s, V_s]
        z_t, g_t, n_t = _rows(h_t, w_t, b_t, teacher.teacher, first, last)  # [R_t, V_t]
        t_bar = _chunk_mean(torch.log_softmax(z_t / tau, -1), g_t, n_t)  # [g, V_t]
        if self.config.loss == "pkl":
            q = self.projection.project(torch.softmax(z_s / tau, -1), self.v_t)  # [R_s, V_t]
            q_bar = _chunk_mean(q, g_s, n_s)
            log_q = torch.log(q_bar / (q_bar.sum(-1, keepdim=True) + _EPS) + _EPS)
            return (t_bar.exp() * (t_bar - log_q)).sum()
        s_bar = _chunk_mean(torch.log_softmax(z_s / tau, -1), g_s, n_s)  # [g, V_s]
        t_c = t_bar[:, self.t_common]
        kl = (t_c.exp() * (t_c - s_bar[:, self.s_common])).sum()
        m = min(self.s_uncommon.numel(), self.t_uncommon.numel(), self.config.uncommon_top_k)
        if m == 0:
            return kl
        tail_s = s_bar[:, self.s_uncommon].exp().topk(m, -1).values
        tail_t = t_bar[:, self.t_uncommon].exp().topk(m, -1).values
        return kl + (tail_s - tail_t).abs().sum()
