"""GOLD's cross-tokenizer loss (TRL's `GOLDTrainer` with `use_uld_loss`, `use_extended_uld` and
`uld_use_hybrid_loss`): ULD extended by span groups and split into the shared and the unshared vocabulary.

    groups     per example, the response tokens of both tokenizations cut where both have a token boundary at
               the same character (align/groups.py); EOS left out on both sides, as GOLD's defaults do
    merge      a group of tokens y_1..y_m, y_i predicted at position t_i, on each side (the chain rule, GOLD's
               "bayesian" merge):  P_g(v) = p_τ(v | x, y_<m) · Π_{i<m} p_τ(y_i | x, y_<i),  p_τ = softmax(z/τ)
               (unnormalized: Σ_v P_g(v) = P(y_<m)); a one-token group is p_τ(· | x, y_<1) itself
    S          the token pairs of the two vocabularies with identical bytes (align/vocab.py), EOS <-> EOS;
               U_s, U_t: the rest of each vocabulary
    shared     JSD_β(P_t[S_t], P_s[S_s]) = β·Σ a_t·(log a_t − log m) + (1 − β)·Σ a_s·(log a_s − log m),
               a = max(P, 1e-8), m = β·a_t + (1 − β)·a_s;  β = 0: KL(a_t ‖ a_s), β = 1: KL(a_s ‖ a_t)
    unshared   Σ_k | sort↓(P_s[U_s])_k − sort↓(P_t[U_t])_k |   (the shorter side zero-padded)
    per group  w·shared + (1 − w)·unshared,   w = |S| / V_t (GOLD's adaptive weight) unless both weights are set
    L = (1 − r)·CE(z_s, y) + r·Σ_groups (per group),   both divided by the student's response tokens

The probabilities of a chunk of groups are computed from the two models' hidden states and heads and
recomputed in backward (checkpointed chunks), so no [G, V] tensor outlives its chunk. The teacher is read at
response positions only: a cache written with `--hidden` serves it.

Deviations from TRL's code (docs/fidelity.md): the merge is the chain rule on the distributions that predict
each token; TRL's default merge ("observed") slices the logits one position late, so that its distribution
at answer token k predicts token k + 1 while its scalars read the probability of token k there. S pairs
tokens by bytes, not by identical raw strings. Groups are cut on character offsets (byte pieces of one
character stay together), and a group whose sides start at different characters, or a trailing part with no
shared boundary, is dropped where TRL keeps it. Each side's distribution covers its tokenizer's tokens, not the
head's padding rows. Sums over groups are divided by the student's response tokens (micro-batch invariant)
where TRL divides each sequence's sum by its group count and averages over the sequences of the batch; the
CE is mixed as (1 − r)·CE + r·KD (TRL: a CE weight, 0 by default, and a distillation weight, 1: `kd_rate: 1`).

The paper's idea, the official code as verified and the switches: docs/methods/baselines.md.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dualkd.align.vocab import shared_vocabulary
from dualkd.data.collate import Batch, ModelBatch
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses.fused import default_chunk_size, fused_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import DistillationConfig
from dualkd.methods.grouped import GroupedTeacher, SideGroups, grouped_tokens
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.models import head_rows
from dualkd.teachers import Teacher

_FLOOR = math.log(1e-8)  # GOLD clamps probabilities at 1e-8 before its logs


class GOLDConfig(DistillationConfig):
    name: Literal["gold"] = "gold"
    temperature: float = Field(1.0, gt=0)
    """τ of both models' softmax (TRL: uld_student_temperature = uld_teacher_temperature = 1)."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """β of the generalized JSD on the shared vocabulary (TRL: `beta`, 0.5)."""
    shared_weight: float | None = Field(None, ge=0.0)
    """Fixed weight of the shared-vocabulary term (with `unshared_weight`); None: |S| / V_t."""
    unshared_weight: float | None = Field(None, ge=0.0)
    """Fixed weight of the sorted-L1 term on the rest of the vocabularies (with `shared_weight`)."""
    chunk_size: int | None = Field(None, ge=1)
    """Groups per checkpointed chunk (None: about 16M probabilities per chunk)."""

    @model_validator(mode="after")
    def _both_weights_or_none(self) -> GOLDConfig:
        if (self.shared_weight is None) != (self.unshared_weight is None):
            raise ValueError("set both shared_weight and unshared_weight, or neither (adaptive |S| / V_t)")
        return self


def merged_logprobs(hidden: Tensor, head: Tensor, bias: Tensor | None, labels: Tensor, side: SideGroups,
                    first: int, last: int, temperature: float) -> Tensor:
    """log P_g for groups [first, last) of one side: [G_chunk, V] (the merge of the module docstring).
    `hidden` [N, d] and `labels` [N] are the side's response rows."""
    a, b = int(side.bounds[first]), int(side.bounds[last])
    rows, group, is_last = side.rows[a:b], side.group[a:b] - first, side.last[a:b]
    z = hidden[rows] @ head.T if bias is None else torch.addmm(bias, hidden[rows], head.T)
    if z.dtype in (torch.float16, torch.bfloat16):  # probabilities as small as 1e-8 matter here
        z = z.float()
    logp = torch.log_softmax(z / temperature, -1)
    scalar = logp.gather(1, labels[rows][:, None])[:, 0].masked_fill(is_last, 0.0)  # the earlier tokens
    early = torch.zeros(last - first, dtype=logp.dtype, device=logp.device).index_add(0, group, scalar)
    return logp[is_last] + early[:, None]  # last tokens come group by group


def _generalized_jsd(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Per row, GOLD's generalized JSD of unnormalized probabilities given as logs (floored at 1e-8)."""
    a_s, a_t = log_s.clamp(min=_FLOOR), log_t.clamp(min=_FLOOR)
    if beta == 0.0:
        return (a_t.exp() * (a_t - a_s)).sum(-1)
    if beta == 1.0:
        return (a_s.exp() * (a_s - a_t)).sum(-1)
    m = torch.logsumexp(torch.stack([a_t + math.log(beta), a_s + math.log1p(-beta)]), 0)
    return beta * (a_t.exp() * (a_t - m)).sum(-1) + (1 - beta) * (a_s.exp() * (a_s - m)).sum(-1)


def _sorted_l1(p_s: Tensor, p_t: Tensor) -> Tensor:
    """Per row, Σ_k |sort↓(p_s)_k − sort↓(p_t)_k| with the shorter side zero-padded."""
    s = p_s.sort(-1, descending=True).values
    t = p_t.sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


class GOLD(Objective):
    def needs(self) -> Needs:
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,), teacher_tokens=True)

    config: GOLDConfig

    def setup(self, ctx: SetupContext) -> None:
        assert ctx.teacher is not None
        ctx.teacher.require({"response_hidden", "head"}, "objective `gold`")
        check_head_is_linear(ctx.student, "student")
        w_t, b_t = ctx.teacher.head()
        v_s = min(head_rows(ctx.student), len(ctx.student_tokenizer))  # padding rows are no tokens
        v_t = min(w_t.shape[0], len(ctx.teacher_tokenizer))
        s_ids, t_ids = shared_vocabulary(ctx.student_tokenizer, ctx.teacher_tokenizer)
        keep = (s_ids < v_s) & (t_ids < v_t)
        s_ids, t_ids = s_ids[keep], t_ids[keep]
        self.v_s = v_s
        cfg = self.config
        self.weights = ((cfg.shared_weight, cfg.unshared_weight) if cfg.shared_weight is not None else
                        (s_ids.numel() / v_t, 1.0 - s_ids.numel() / v_t))
        for name, ids, size in (("s", s_ids, v_s), ("t", t_ids, v_t)):
            rest = torch.ones(size, dtype=torch.bool)
            rest[ids] = False
            self.register_buffer(f"{name}_shared", ids, persistent=False)
            self.register_buffer(f"{name}_unshared", rest.nonzero().squeeze(1), persistent=False)
        self.register_buffer("teacher_head", w_t.detach()[:v_t].clone(), persistent=False)  # frozen: once
        self.register_buffer("teacher_bias", b_t.detach()[:v_t].clone() if b_t is not None else None,
                             persistent=False)

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> GroupedTeacher:
        t_tokens = batch.teacher_view
        student, teacher_side = grouped_tokens(batch.student, t_tokens)
        hidden = teacher.response_hidden(t_tokens, batch.indices)  # [N_t, d_t]
        return GroupedTeacher(hidden, t_tokens.labels[t_tokens.loss_mask], student, teacher_side)

    def forward(self, student: nn.Module, batch: Batch, teacher: GroupedTeacher, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden
        return through_head(student, partial(self._loss, tokens=tokens, teacher=teacher, norm=norm), hidden)

    def _loss(self, w_s: Tensor, b_s: Tensor | None, hidden: Tensor, tokens: ModelBatch, teacher: GroupedTeacher,
              norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """What reads the student's head (run inside its forward: `lm.through_head`)."""
        cfg = self.config
        ce, hits = fused_cross_entropy(hidden, w_s, tokens.labels, bias=b_s, mask=tokens.loss_mask,
                                       chunk_size=cfg.chunk_size)
        h_s, y_s = hidden[tokens.loss_mask], tokens.labels[tokens.loss_mask]  # [N_s, d_s], [N_s]
        w_s, b_s = w_s[: self.v_s], b_s[: self.v_s] if b_s is not None else None
        w_t = self.teacher_head.to(w_s.dtype)
        b_t = self.teacher_bias.to(w_s.dtype) if self.teacher_bias is not None else None
        h_t = teacher.hidden.to(w_s.dtype)
        groups = teacher.student.bounds.numel() - 1
        step = cfg.chunk_size or max(1, default_chunk_size(max(groups, 1), w_s.shape[0] + w_t.shape[0]) // 4)
        shared = unshared = h_s.new_zeros(())
        for first in range(0, groups, step):
            last = min(first + step, groups)
            terms = checkpoint(self._chunk, h_s, w_s, b_s, y_s, h_t, w_t, b_t, teacher, first, last,
                               use_reentrant=False)
            shared, unshared = shared + terms[0], unshared + terms[1]
        n = norm["tokens"]
        w_shared, w_unshared = self.weights
        kd = (w_shared * shared + w_unshared * unshared) / n
        ce = ce / n
        loss = norm.blend(ce, kd, cfg.kd_rate)
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "shared": shared.detach() / n,
                      "unshared": unshared.detach() / n, "groups": torch.as_tensor(groups / n), "acc": hits / n}

    def _chunk(self, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, y_s: Tensor, h_t: Tensor, w_t: Tensor,
               b_t: Tensor | None, teacher: GroupedTeacher, first: int, last: int) -> tuple[Tensor, Tensor]:
        """Σ over groups [first, last) of the shared and the unshared term."""
        tau = self.config.temperature
        log_s = merged_logprobs(h_s, w_s, b_s, y_s, teacher.student, first, last, tau)  # [g, V_s]
        log_t = merged_logprobs(h_t, w_t, b_t, teacher.labels, teacher.teacher, first, last, tau)  # [g, V_t]
        shared = _generalized_jsd(log_s[:, self.s_shared], log_t[:, self.t_shared], self.config.beta)
        unshared = _sorted_l1(log_s[:, self.s_unshared].exp(), log_t[:, self.t_unshared].exp())
        return shared.sum(), unshared.sum()
