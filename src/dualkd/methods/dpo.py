"""DPO (Rafailov et al., 2023, arXiv 2305.18290) with a frozen reference model, and reverse DPO.

    L = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

over preference pairs (`data` records with `prompt`/`chosen`/`rejected`), averaged over the pairs of the
global batch. The `teacher` of the run config is the reference model (usually the model DPO starts from).
`swap_pairs: true` trains on rejected-over-chosen: the reverse-DPO model AlignDistil contrasts with.
Logged: preference accuracy (share of pairs whose chosen reward beats the rejected one), the reward margin
and both rewards (rewards are β·log π/π_ref of whole responses, in the direction trained).

The paper's idea, the official code as verified and the switches: docs/methods/aligndistil.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.data.preferences import pairs_of
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, response_logprobs
from dualkd.losses.policy import dpo_loss
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.needs import Needs
from dualkd.methods.spec import ObjectiveSpec
from dualkd.teachers import Teacher


class DPOConfig(ObjectiveSpec):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    """β of DPO (AlignDistil trains both DPO models with 0.1)."""
    swap_pairs: bool = False
    """Swap chosen and rejected: trains the reverse-DPO model."""
    chunk_size: int | None = Field(None, ge=1)
    """Rows per chunk of the fused log-probabilities (None: about 16M logits per chunk)."""


class DPO(Objective):
    def needs(self) -> Needs:
        return Needs(teacher=(frozenset({"sequence_logprobs"}),), data="pairs", eval_weight="pairs")

    config: DPOConfig

    eval_weight = "pairs"

    def setup(self, ctx: SetupContext) -> None:
        if not ctx.same_tokenizer:
            raise ModelError("objective `dpo`: the reference model (`teacher`) must share the student's tokenizer")
        assert ctx.teacher is not None
        ctx.teacher.require({"sequence_logprobs"}, "objective `dpo` (the reference model)")
        check_head_is_linear(ctx.student, "student")

    def counts(self, batch: Batch) -> dict[str, Tensor]:
        return {"tokens": batch.student.loss_mask.sum(), "pairs": torch.tensor(float(pairs_of(batch)))}

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> Tensor:
        return teacher.sequence_logprobs(batch.student, self.config.chunk_size)  # [2P]

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Tensor, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        P = pairs_of(batch)
        policy = response_logprobs(student, batch.student, self.config.chunk_size)  # [2P]
        first, second = slice(0, P), slice(P, 2 * P)
        win, lose = (second, first) if self.config.swap_pairs else (first, second)  # reverse DPO swaps them
        loss, chosen, rejected = dpo_loss(policy[win], policy[lose], teacher_out[win], teacher_out[lose],
                                          self.config.beta)
        n = norm["pairs"]
        margin = chosen - rejected
        return loss.sum() / n, {"dpo": loss.detach().sum() / n, "pref_acc": (margin > 0).float().sum() / n,
                                "margin": margin.sum() / n, "reward_chosen": chosen.sum() / n,
                                "reward_rejected": rejected.sum() / n}
