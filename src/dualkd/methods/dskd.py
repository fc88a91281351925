"""Dual-Space KD, same vocabulary (Zhang et al., "Dual-Space Knowledge Distillation for Large Language
Models", arXiv 2406.17328).

Two projectors put each model's last hidden states in the other's space, where the other's LM head reads them:

    h_t2s = P_t2s(h_t)   z_t2s = h_t2s @ W_s.T (W_s detached)    student space
    h_s2t = P_s2t(h_s)   z_s2t = h_s2t @ W_t.T (teacher head)    teacher space

    L = (1 - r)·CE(z_s, y) + r·( D(softmax(z_t2s / τ) detached || softmax(z_s / τ))      KD in student space
                                + CE(z_t2s, y)                                           trains P_t2s
                                + FKL(softmax(z_t / τ) || softmax(z_s2t / τ)) )          KD in teacher space

(DSKD v1 always uses forward KL in teacher space; DSKDv2 uses the chosen divergence there too.) The
projectors are nn.Linear with bias and PyTorch's default init, trained with their own learning rate. Every
term goes through the fused chunked loss, so the vocabulary size never shapes memory.

From an offline teacher cache written with `--hidden` (`teacher.cache`), h_t and W_t are the cached
ones (bf16 on disk, used in the student's dtype): no teacher model is loaded.

The paper's idea, the official code as verified and the switches: docs/methods/dskd.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, head_of, lm_forward, through_head
from dualkd.losses import fused_divergence
from dualkd.losses.fused import fused_ce_and_divergence, fused_cross_entropy
from dualkd.methods.base import SetupContext, StepNorm
from dualkd.methods.common import DivergenceChoice, ProjectorChoice, TeacherRows, head_rows_of
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.methods.projectors import DualSpace
from dualkd.models import shared_vocab_size
from dualkd.teachers import Teacher


class DSKDConfig(DivergenceChoice, ProjectorChoice):
    name: Literal["dskd"] = "dskd"


class DSKD(DualSpace):
    def needs(self) -> Needs:
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,))

    config: DSKDConfig

    def setup(self, ctx: SetupContext) -> None:
        if not ctx.same_tokenizer:
            raise ModelError("objective `dskd` needs one tokenizer on both sides; for different vocabularies use "
                             "dskd_cma or dskdv2")
        check_head_is_linear(ctx.student, "student")
        w_s, _ = head_of(ctx.student)
        d_s, dtype = w_s.shape[1], w_s.dtype
        teacher = ctx.teacher
        assert teacher is not None
        teacher.require({"response_hidden", "head"}, "objective `dskd`")  # a cache written with --hidden will do
        self.vocab_size = shared_vocab_size(w_s.shape[0], teacher.vocab_rows, ctx.student_tokenizer)
        d_t = teacher.head()[0].shape[1]
        self.build_projectors(d_s, d_t, dtype, bias=True)

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> TeacherRows:
        # same tokenizer: the teacher reads the student's tokens; its rows are the student's response rows
        return TeacherRows(teacher.response_hidden(batch.student, batch.indices),
                           *head_rows_of(teacher, self.vocab_size))

    def forward(self, student: nn.Module, batch: Batch, teacher: TeacherRows, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, V = self.config, self.vocab_size
        tokens = batch.student
        mask = tokens.loss_mask
        labels = tokens.labels[mask]  # [N]
        h_s = lm_forward(student, tokens, hidden=True, logits=False).hidden[mask]  # [N, d_s]
        h_t2s = self.t2s(teacher.hidden.to(self.t2s.weight.dtype))  # [N, d_s]

        def student_space(w_s: Tensor, b_s: Tensor | None, h_s: Tensor, h_t2s: Tensor) -> tuple[Tensor, ...]:
            """The terms that read the student's head (run inside its forward: `through_head`)."""
            w_s_fixed = w_s[:V].detach()
            b_s_fixed = b_s[:V].detach() if b_s is not None else None
            # (1 - r)·CE + r·D(projected teacher || student), in one pass over the student's logits
            main, ce, kd_student, hits = fused_ce_and_divergence(
                h_s, w_s, h_t2s.detach(), w_s_fixed, labels, divergence=cfg.divergence,
                ce_weight=norm.ce_share(cfg.kd_rate), div_weight=cfg.kd_rate,
                temperature=cfg.temperature, vocab_size=V, chunk_size=cfg.chunk_size, student_bias=b_s,
                teacher_bias=b_s_fixed, params=cfg.divergence_params)
            ce_t2s, t2s_hits = fused_cross_entropy(h_t2s, w_s_fixed, labels, bias=b_s_fixed,
                                                   chunk_size=cfg.chunk_size)
            return main, ce, kd_student, hits, ce_t2s, t2s_hits

        main, ce, kd_student, hits, ce_t2s, t2s_hits = through_head(student, student_space, h_s, h_t2s)
        kd_teacher = fused_divergence(self.teacher_space_divergence, self.s2t(h_s), teacher.head, teacher.hidden,
                                      teacher.head, temperature=cfg.temperature, reduction="sum",
                                      chunk_size=cfg.chunk_size, student_bias=teacher.bias,
                                      teacher_bias=teacher.bias, **self.teacher_space_params)
        n = norm["tokens"]
        loss = main / n + cfg.kd_rate * (ce_t2s + kd_teacher) / n
        return loss, {"ce": ce / n, "kd_student": kd_student / n, "ce_t2s": ce_t2s.detach() / n,
                      "kd_teacher": kd_teacher.detach() / n, "acc": hits / n, "t2s_acc": t2s_hits / n}

    @property
    def teacher_space_divergence(self) -> str:
        return "fkl"  # DSKD v1: forward KL in teacher space whatever the student-space divergence

    @property
    def teacher_space_params(self) -> dict[str, float]:
        return {}
