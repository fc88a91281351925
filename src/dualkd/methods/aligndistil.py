"""AlignDistil (arXiv 2503.02832): LM alignment as token-level distillation from a DPO model and a reverse-DPO
model (arXiv 2503.02832; pure definitions: losses/policy.py).

    teacher (adaptive):  z*_t = z_dpo + α_t·(z_dpo − z_rev),  α_t = r·TVD_t + ε,  weight β0/α_t
    teacher (constant):  α_t = `alpha` at every position (the paper's "constant ratio"), weight β0/α
    teacher (theorem1):  z* = w·z_dpo + (1 − w)·z_ref,       weight β0/w   (w = β0/β of Theorem 1)
    L = mean over responses of (1/|y|)·Σ_t weight_t·KL(q_θ(·|s_t) ‖ softmax(z*_t))      (`length_norm`)

Models: the run's `teacher` is the DPO model; `teachers.reverse` the reverse-DPO model (or `teachers.reference`
for `theorem1`); all three read the student's tokens (one tokenizer). Off-policy the responses are the chosen
ones of a preference set (or any responses); on-policy they are student samples (`source.kind: on_policy`).
`kd_rate` < 1 adds (1 − kd_rate)·CE on the dataset response (0 by default: pure distillation, as the paper).

Memory: the two frozen models return last hidden states only. z* is linear in them, so it is the product of
one concatenated hidden state [(1+α_t)·h_dpo, −α_t·h_rev] with one concatenated head [W_dpo | W_rev] (biases as
two extra columns), and the reverse KL runs through the fused chunked loss with a per-token weight: no
[N, V] tensor exists, three vocabulary-wide distributions never sit in memory together. TVD_t needs both
softmaxes; it is computed chunk by chunk in the frozen models' no-grad pass. Vocabularies are cut to the
common size (Qwen-style padded heads).

Shift: `labels[t] = ids[t + 1]` and the loss mask marks the positions that predict response tokens and the
EOS, so the first response token's prediction (at the last prompt position) counts and the position after
the EOS does not (the official off-policy trainer drops the former and counts the latter).

The paper's idea, the official code as verified and the switches: docs/methods/aligndistil.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses.fused import fused_ce_and_divergence, fused_total_variation
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import DistillationConfig
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.models import head_rows, shared_vocab_size
from dualkd.teachers import Teacher


class AlignDistilConfig(DistillationConfig):
    name: Literal["aligndistil"] = "aligndistil"
    teacher_logits: Literal["adaptive", "constant", "theorem1"] = "adaptive"
    """`adaptive`: token-adaptive extrapolation (the method); `constant`: a fixed α; `theorem1`: interpolation
    with the reference model (needs `teachers.reference`)."""
    beta0: float = Field(0.1, gt=0)
    """β of the DPO models (β0)."""
    r: float = Field(20.0, ge=0)
    """adaptive: α_t = r·TVD_t + ε with TVD's ½. The official `--beta2` sums |p − p'| without the ½: its 10
    (off-policy) and 15 (on-policy) are r = 20 and 30 here."""
    eps: float = Field(1e-3, gt=0)
    """adaptive: ε, the floor of α_t."""
    alpha: float = Field(2.0, gt=0)
    """constant: α (the paper's Table 3 compares 1.0 and 2.0)."""
    w: float = Field(2.0, gt=0)
    """theorem1: w = β0/β, the weight of the DPO logits."""
    length_norm: bool = True
    """Divide each response's summed loss by its length, then average over responses (`--reward_len_norm`);
    off: the mean over tokens."""
    temperature: float = Field(1.0, gt=0)
    """τ of both distributions in the KL (the paper: 1.0)."""
    kd_rate: float = Field(1.0, ge=0.0, le=1.0)
    """Weight of the distillation term; 1 - kd_rate weighs a CE on the dataset response (paper: 1.0)."""
    chunk_size: int | None = Field(None, ge=1)
    """Rows per chunk of the fused loss (None: about 16M logits per chunk)."""


@dataclass
class TeacherPlan:
    """What the frozen models give the loss, at the response positions of a batch."""

    hidden: Tensor  # [N, 2·d (+2)] the concatenated teacher state, scaled per row
    head: Tensor  # [V, 2·d (+2)] the concatenated heads
    weight: Tensor  # [N] β0/α_t (per-token loss weight)
    alpha: Tensor  # [N]
    tvd: Tensor  # [N] TVD_t between the two frozen models (0 for theorem1's constant weights)


class AlignDistil(Objective):
    config: AlignDistilConfig

    def needs(self) -> Needs:
        role = ({"reference": "the model DPO started from (π_ref of Theorem 1)"}
                if self.config.teacher_logits == "theorem1" else
                {"reverse": "the reverse-DPO model (DPO with chosen and rejected swapped)"})
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,), frozen=role)

    def setup(self, ctx: SetupContext) -> None:
        if not ctx.same_tokenizer:
            raise ModelError("objective `aligndistil`: the DPO models must share the student's tokenizer")
        assert ctx.teacher is not None and ctx.frozen is not None
        (role,) = self.needs().frozen
        self.other = ctx.frozen[role]  # a teacher, not a module: never trained, saved or wrapped
        ctx.teacher.require({"response_hidden", "head"}, "objective `aligndistil` (the DPO model)")
        self.other.require({"response_hidden", "head"}, f"objective `aligndistil` (teachers.{role})")
        check_head_is_linear(ctx.student, "student")
        rows = head_rows(ctx.student)
        self.vocab_size = min(shared_vocab_size(rows, ctx.teacher.vocab_rows, ctx.student_tokenizer),
                              shared_vocab_size(rows, self.other.vocab_rows, ctx.student_tokenizer))

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        mask = batch.student.loss_mask
        return {"tokens": mask.sum(), "sequences": (mask.sum(-1) > 0).sum()}

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> TeacherPlan:
        tokens, V, cfg = batch.student, self.vocab_size, self.config
        h_dpo = teacher.response_hidden(tokens, batch.indices)  # [N, d]
        h_other = self.other.response_hidden(tokens, batch.indices)  # [N, d']
        w_dpo, b_dpo = teacher.head()
        w_oth, b_oth = self.other.head()
        w_dpo, w_oth = w_dpo[:V], w_oth[:V]
        b_dpo = b_dpo[:V] if b_dpo is not None else None
        b_oth = b_oth[:V] if b_oth is not None else None
        n = h_dpo.shape[0]
        if cfg.teacher_logits == "adaptive":
            tvd = fused_total_variation(h_dpo, w_dpo, h_other, w_oth, b_dpo, b_oth, cfg.chunk_size)
            alpha = cfg.r * tvd + cfg.eps
        elif cfg.teacher_logits == "constant":
            tvd, alpha = h_dpo.new_zeros(n), h_dpo.new_full((n,), cfg.alpha)
        else:  # theorem1: z* = w·z_dpo + (1 − w)·z_ref  ==  z_dpo + (w − 1)·(z_dpo − z_ref)
            tvd, alpha = h_dpo.new_zeros(n), h_dpo.new_full((n,), cfg.w - 1.0)
        # z* = (1 + α)·z_dpo − α·z_other as one product: [(1+α)h_dpo, −α h_other, (1+α), −α] @ [W_dpo | W_oth | b | b]
        a = alpha[:, None].to(h_dpo.dtype)
        parts_h, parts_w = [(1 + a) * h_dpo, -a * h_other.to(h_dpo.dtype)], [w_dpo, w_oth.to(w_dpo.dtype)]
        if b_dpo is not None or b_oth is not None:
            zero = w_dpo.new_zeros(V)
            parts_h += [1 + a, -a]
            parts_w += [(b if b is not None else zero)[:, None] for b in (b_dpo, b_oth)]
        weight = cfg.beta0 / (cfg.w if cfg.teacher_logits == "theorem1" else alpha)
        weight = torch.as_tensor(weight, dtype=torch.float32, device=h_dpo.device).expand(n).clone()
        return TeacherPlan(torch.cat(parts_h, 1), torch.cat(parts_w, 1), weight, alpha.float(), tvd.float())

    def forward(self, student: nn.Module, batch: Batch, teacher: TeacherPlan, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, cfg = batch.student, self.config
        mask = tokens.loss_mask
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden  # [B, T, d_s]
        # per-token weights: β0/α_t, and 1/|y| of the token's response with length normalization
        lengths = mask.sum(-1, keepdim=True).clamp(min=1).expand_as(mask)[mask].float()  # [N]
        row_weight = teacher.weight / lengths if cfg.length_norm else teacher.weight
        denominator = norm["sequences"] if cfg.length_norm else norm["tokens"]
        ce_weight = norm.ce_share(cfg.kd_rate) / norm["tokens"]
        # the student's head is read inside its module's forward: gathered there under ZeRO-3 / FSDP2
        loss, ce, kd, hits = through_head(student, lambda head, bias, h: fused_ce_and_divergence(
            h, head, teacher.hidden, teacher.head, tokens.labels[mask], divergence="rkl",
            ce_weight=ce_weight, div_weight=cfg.kd_rate / denominator, div_mask=row_weight,
            temperature=cfg.temperature, vocab_size=self.vocab_size, chunk_size=cfg.chunk_size,
            student_bias=bias), hidden[mask])
        n = norm["tokens"]
        metrics = {"kd": kd / denominator, "alpha": teacher.alpha.sum() / n, "tvd": teacher.tvd.sum() / n}
        if ce_weight:  # the fused pass computes the CE only when it is trained
            metrics.update(ce=ce / n, acc=hits / n)
        return loss, metrics
