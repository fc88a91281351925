"""Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv 2402.12030), as re-implemented in DSKD (arXiv 2406.17328):

    k-th response position of the student  <->  k-th response position of the teacher   (per sequence)
    ULD = Σ_v | sort↓(softmax(z_s))_v - sort↓(softmax(z_t))_v |      (the smaller vocabulary zero-padded)
    L = (1 - r)·CE(z_s, y) + r·ULD,   both summed over positions and divided by the response tokens

No temperature (as in the paper). The distance runs fused (`losses/sorted_l1.py`): chunks of positions, the
teacher's side as its top-V_s probabilities (a partial sort) and the mass below them, the gradient computed
analytically in the same pass, so no [P, V] tensor outlives its chunk and no sort runs twice. Unlike the
official code, label tensors are not modified in place.

The paper's idea, the official code as verified and the switches: docs/methods/baselines.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch, ModelBatch
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses.fused import fused_cross_entropy
from dualkd.losses.sorted_l1 import fused_sorted_l1
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import DistillationConfig
from dualkd.methods.needs import Needs
from dualkd.teachers import Teacher


class ULDConfig(DistillationConfig):
    name: Literal["uld"] = "uld"
    chunk_size: int | None = Field(None, ge=1)
    """Positions per chunk of the distance (None: about 16M logits per chunk)."""


@dataclass
class PairedRows:
    hidden: Tensor  # [P, d_t] teacher states at the paired positions
    head: Tensor
    bias: Tensor | None
    batch_index: Tensor  # [P]
    student_pos: Tensor  # [P]


def positional_pairs(student_mask: Tensor, teacher_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(batch_index, student_pos, teacher_pos): the k-th response position of each side, k < min(n_s, n_t)."""
    b_idx, s_pos, t_pos = [], [], []
    for b in range(student_mask.shape[0]):
        s = torch.nonzero(student_mask[b]).squeeze(1)
        t = torch.nonzero(teacher_mask[b]).squeeze(1)
        n = min(s.numel(), t.numel())
        b_idx.append(torch.full((n,), b, dtype=torch.long, device=s.device))
        s_pos.append(s[:n])
        t_pos.append(t[:n])
    return torch.cat(b_idx), torch.cat(s_pos), torch.cat(t_pos)



class ULD(Objective):
    def needs(self) -> Needs:
        return Needs(teacher=(frozenset({"hidden", "head"}),), teacher_tokens=True)

    config: ULDConfig

    def setup(self, ctx: SetupContext) -> None:
        check_head_is_linear(ctx.student, "student")
        assert ctx.teacher is not None
        ctx.teacher.require({"hidden", "head"}, "objective `uld`")

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> PairedRows:
        t_tokens = batch.teacher_view
        b_idx, s_pos, t_pos = positional_pairs(batch.student.loss_mask, t_tokens.loss_mask)
        hidden = teacher.hidden(t_tokens)[b_idx, t_pos]
        head, bias = teacher.head()
        return PairedRows(hidden, head, bias, b_idx, s_pos)

    def forward(self, student: nn.Module, batch: Batch, teacher: PairedRows, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden
        return through_head(student, partial(self._loss, tokens=tokens, teacher=teacher, norm=norm), hidden)

    def _loss(self, w_s: Tensor, b_s: Tensor | None, hidden: Tensor, tokens: ModelBatch, teacher: PairedRows,
              norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """What reads the student's head (run inside its forward: `lm.through_head`)."""
        ce, hits = fused_cross_entropy(hidden, w_s, tokens.labels, bias=b_s, mask=tokens.loss_mask,
                                       chunk_size=self.config.chunk_size)
        h_s = hidden[teacher.batch_index, teacher.student_pos]  # [P, d_s]
        uld = fused_sorted_l1(h_s, w_s, teacher.hidden, teacher.head, student_bias=b_s, teacher_bias=teacher.bias,
                              chunk_size=self.config.chunk_size)
        n = norm["tokens"]
        ce, uld = ce / n, uld / n
        loss = norm.blend(ce, uld, self.config.kd_rate)
        return loss, {"ce": ce.detach(), "uld": uld.detach(), "acc": hits / n}
