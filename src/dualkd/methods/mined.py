"""MinED: minimum-edit-distance token alignment + forward KL (FuseLLM's alignment, arXiv 2401.10491, as the
cross-tokenizer baseline in DSKD).

    pairs      DTW over the response tokens' texts with edit-distance costs (computed once, when the data is
               built); a student position is aligned when the path gives it exactly one teacher token AND that
               teacher token names the student's token in the teacher -> student vocabulary map
    teacher    at an aligned position, the teacher's logits re-indexed into the student vocabulary: student id s
               gets the logit of partner(s), the one teacher token that names it (its exact-bytes partner
               when it has one); student ids that no teacher token names get -1e5
    elsewhere  a pseudo one-hot target on the gold token (so the KD term is CE at temperature τ there)
    L = (1 - r)·CE(z_s, y) + r·FKL(teacher^τ || student^τ),   summed over response tokens / their count

So the KD target of student token s is p_t(partner(s)) renormalized over the student ids that have a partner,
and no teacher logit reaches two student ids (`align/mined.py: mined_vocab_map`; built from the tokenizers,
exact bytes first, edit distance for the rest, cached on disk). The re-indexed teacher head W_t[partner]
makes the aligned term a plain fused divergence.

Deviations from the official code (docs/fidelity.md): positions are aligned on the tokens they predict
(labels), not on their input tokens; tokens are compared by their bytes, not by strings with `Ġ`/`▁`
swapped; a student id with an exact-bytes partner gets that partner rather than the first teacher id (in id
order) that names it. The official pseudo one-hot is the logits 100 / -1e5; here it is the exact one-hot,
whose FKL is the same CE up to e^-1e5.

The paper's idea, the official code as verified and the switches: docs/methods/baselines.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.align.mined import mined_vocab_map
from dualkd.align.pairs import MinEDAligner
from dualkd.data.collate import Batch, ModelBatch
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses import fused_divergence
from dualkd.losses.fused import fused_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import DistillationConfig
from dualkd.methods.needs import Needs
from dualkd.models import head_rows
from dualkd.teachers import Teacher

_UNMAPPED = -1e5  # the official code's "minus infinity" for student ids with no teacher token


class MinEDConfig(DistillationConfig):
    name: Literal["mined"] = "mined"
    temperature: float = Field(1.0, gt=0)
    """τ of the forward KL (DSKD scripts: 2.0)."""
    chunk_size: int | None = Field(None, ge=1)
    """Rows per chunk of the fused losses."""


@dataclass
class AlignedTeacher:
    hidden: Tensor  # [P, d_t] at the validly aligned positions
    batch_index: Tensor  # [P]
    student_pos: Tensor  # [P]


class MinED(Objective):
    def needs(self) -> Needs:
        return Needs(teacher=(frozenset({"hidden", "head"}),), teacher_tokens=True, aligner=MinEDAligner)
    config: MinEDConfig

    def setup(self, ctx: SetupContext) -> None:
        assert ctx.teacher is not None
        if ctx.same_tokenizer:  # no alignment is made then (train/build.py)
            raise ModelError("objective `mined` aligns two different tokenizers; the student and the teacher share "
                             "one here: use `kd` (or `dskdv2`)")
        ctx.teacher.require({"hidden", "head"}, "objective `mined`")
        check_head_is_linear(ctx.student, "student")
        w_t, b_t = ctx.teacher.head()
        vocab = mined_vocab_map(ctx.student_tokenizer, ctx.teacher_tokenizer)
        rows = head_rows(ctx.student)
        partner = torch.full((rows,), -1, dtype=torch.long)  # student head rows past the tokenizer: unmapped
        n = min(rows, vocab.partner.numel())
        partner[:n] = vocab.partner[:n]
        mapped, index = partner >= 0, partner.clamp(min=0)
        # the teacher head re-indexed into the student vocabulary (the teacher is frozen: built once); unmapped
        # ids get a -1e5 logit through the bias
        self.register_buffer("reindexed_head", w_t.detach()[index].clone(), persistent=False)  # [V_s, d_t]
        base = b_t.detach()[index] if b_t is not None else torch.zeros(rows, dtype=w_t.dtype)
        self.register_buffer("reindexed_bias", torch.where(mapped, base, torch.full_like(base, _UNMAPPED)),
                             persistent=False)
        self.register_buffer("to_student", vocab.to_student, persistent=False)  # [V_t] teacher id -> student id

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> AlignedTeacher:
        assert batch.alignment is not None and batch.teacher is not None
        al = batch.alignment
        teacher_labels = batch.teacher.labels[al.batch_index, al.teacher_pos]
        student_labels = batch.student.labels[al.batch_index, al.student_pos]
        valid = self.to_student[teacher_labels] == student_labels
        hidden = teacher.hidden(batch.teacher)  # [B, Tt, dt]
        b, s, t = al.batch_index[valid], al.student_pos[valid], al.teacher_pos[valid]
        return AlignedTeacher(hidden[b, t], b, s)

    def forward(self, student: nn.Module, batch: Batch, teacher: AlignedTeacher, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden
        return through_head(student, partial(self._loss, tokens=tokens, teacher=teacher, norm=norm), hidden)

    def _loss(self, w_s: Tensor, b_s: Tensor | None, hidden: Tensor, tokens: ModelBatch, teacher: AlignedTeacher,
              norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """What reads the student's head (run inside its forward: `lm.through_head`)."""
        cfg = self.config
        ce, hits = fused_cross_entropy(hidden, w_s, tokens.labels, bias=b_s, mask=tokens.loss_mask,
                                       chunk_size=cfg.chunk_size)
        aligned = torch.zeros_like(tokens.loss_mask)
        aligned[teacher.batch_index, teacher.student_pos] = True
        head_t = self.reindexed_head
        kd_aligned = fused_divergence("fkl", hidden[teacher.batch_index, teacher.student_pos], w_s,
                                      teacher.hidden, head_t, temperature=cfg.temperature, reduction="sum",
                                      chunk_size=cfg.chunk_size, student_bias=b_s,
                                      teacher_bias=self.reindexed_bias.to(head_t.dtype))
        # pseudo one-hot teacher elsewhere: FKL(one-hot || q^τ) is the CE of the gold token at temperature τ
        tau = cfg.temperature
        rest = tokens.loss_mask & ~aligned
        kd_rest, _ = fused_cross_entropy(hidden / tau, w_s, tokens.labels, mask=rest,
                                         bias=b_s / tau if b_s is not None else None, chunk_size=cfg.chunk_size)
        n = norm["tokens"]
        ce, kd = ce / n, (kd_aligned + kd_rest) / n
        loss = norm.blend(ce, kd, cfg.kd_rate)
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "aligned": aligned.sum().float() / n, "acc": hits / n}
