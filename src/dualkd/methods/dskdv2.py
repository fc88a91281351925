"""DSKDv2: dual-space KD with ideally initialized projectors and exact token alignment, for any two LLMs
(Zhang et al., arXiv 2504.11426).

What changes from DSKD:
- P_t2s (bias-free) starts at W_t[V']ᵀ · pinv(W_s[V']ᵀ) over the shared vocabulary V', so that the student
  head reads the projected teacher states as (almost) the teacher's own logits on V'; then it is trained.
- P_s2t = W_s[V']ᵀ · pinv(W_t[V']ᵀ) is recomputed every step from the current (detached) student head; it is
  not a parameter. pinv(W_t[V']ᵀ) is computed once (the teacher is frozen).
- The projector CE uses the teacher's argmax as its label, converted to a student id: the aligned student gold
  token where the teacher predicts its own gold token, else the student token with the same bytes.
- Agreement mask: positions where argmax(z_t2s) equals that label. When the global share of agreeing
  positions is ≤ `t2s_agreement` (default 1.0: always), the student-space KD averages over agreeing positions.
- The chosen divergence is used in both spaces.
- Different vocabularies: the two tokenizations are paired by exact token alignment on character offsets
  (`alignment: eta`, computed when the data is built) and only paired positions enter the KD terms, each
  averaged by its own count. `alignment: cma` uses cross-model attention instead (dskd_cma.py).

    L = (1 - r)·CE(z_s, y) / #tokens + r·( KD_student / #agree + CE_t2s / #labels + KD_teacher / #pairs )

All counts are taken over the global batch (the teacher runs before the step's denominators are summed).

The paper's idea, the official code as verified and the switches: docs/methods/dskd.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from dualkd.align.pairs import ExactAligner
from dualkd.align.vocab import shared_vocabulary, teacher_to_student_ids
from dualkd.data.collate import Batch
from dualkd.lm import check_head_is_linear, head_of, lm_forward, through_head
from dualkd.losses import fused_divergence
from dualkd.losses.fused import fused_argmax, fused_ce_and_divergence, fused_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import (
    DivergenceChoice,
    ProjectorChoice,
    TeacherRows,
    head_rows_of,
)
from dualkd.methods.dskd_cma import DSKDCMA, DSKDCMAConfig
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.methods.projectors import DualSpace
from dualkd.models import shared_vocab_size
from dualkd.teachers import Teacher, response_rows

PINV_PROJECTOR_LR = 5e-4  # the DSKDv2 scripts' projector lr, for projectors that start at the pseudo-inverse


class DSKDv2Config(DivergenceChoice, ProjectorChoice):
    name: Literal["dskdv2"] = "dskdv2"
    projector_lr: float | None = Field(None, gt=0)
    """Learning rate of P_t2s. None: 5e-4 (the DSKDv2 scripts') when P_t2s starts at its pseudo-inverse (and
    for `alignment: cma`, whose projectors always do), else the student's lr: a projector learned from random
    weights must keep pace with the student, or the student-space target it makes stays flat and teaches noise
    (the projector-lr ablations of experiments/methods_table/README.md)."""
    alignment: Literal["eta", "cma"] = "eta"
    """How positions of two different tokenizations are paired (ignored with one tokenizer)."""
    pinv_init: bool | None = None
    """Initialize P_t2s and compute P_s2t by pseudo-inverse over the shared vocabulary (else: trained Linears).
    None (auto): on for a pretrained student, off for one that starts from random weights, whose head carries
    no knowledge to invert: the inverse of a random head maps teacher states to noise, which the t2s CE then
    has to unlearn."""
    topk_vocab: int | None = Field(None, ge=1)
    """Same tokenizer: use only the first k ids as the shared vocabulary of the pseudo-inverse."""
    t2s_agreement: float = Field(1.0, ge=0.0, le=1.0)
    """Average the student-space KD over agreeing positions when their share is at most this."""
    spaces: Literal["both", "student", "teacher"] = "both"
    """KD in both spaces, or only one (DSKDv2's --only-stu-kd / --only-tea-kd)."""

    @model_validator(mode="after")
    def _cma_fields(self) -> DSKDv2Config:
        if self.alignment == "cma":
            fields = type(self).model_fields
            eta_only = [k for k in ("pinv_init", "topk_vocab", "t2s_agreement", "spaces")
                        if getattr(self, k) != fields[k].default]
            if eta_only:
                raise ValueError(f"{eta_only} do(es) not apply to alignment: cma (DSKDv2's CMA always uses the "
                                 "pseudo-inverse projectors and both spaces)")
        return self

    def as_cma(self) -> DSKDCMAConfig:
        """alignment: cma is DSKDv2's cross-model attention, implemented in dskd_cma.py (version 2)."""
        shared = (DivergenceChoice.model_fields.keys() | ProjectorChoice.model_fields.keys()) - {"name"}
        fields = {k: getattr(self, k) for k in shared}
        if fields["projector_lr"] is None:  # version 2 always starts its projectors at the pseudo-inverse
            fields["projector_lr"] = PINV_PROJECTOR_LR
        return DSKDCMAConfig(name="dskd_cma", version=2, **fields)


def build(config: DSKDv2Config) -> Objective:
    """`dskdv2` with `alignment: cma` is DSKDv2's cross-model attention, built by dskd_cma.py (version 2)."""
    return DSKDCMA(config.as_cma()) if config.alignment == "cma" else DSKDv2(config)


class DSKDv2(DualSpace):
    def needs(self) -> Needs:
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,), teacher_tokens=True, counts_need_teacher=True,
                     aligner=ExactAligner if self.config.alignment == "eta" else None)
    config: DSKDv2Config

    def projector_lr(self) -> float | None:
        if self.config.projector_lr is not None:
            return self.config.projector_lr
        return PINV_PROJECTOR_LR if self.pinv_init else None  # None: the student's lr

    def setup(self, ctx: SetupContext) -> None:
        cfg = self.config
        check_head_is_linear(ctx.student, "student")
        w_s, _ = head_of(ctx.student)
        teacher = ctx.teacher
        assert teacher is not None
        teacher.require({"response_hidden", "head"}, "objective `dskdv2`")  # a cache written with --hidden will do
        w_t, _ = teacher.head()
        self.same_vocab = ctx.same_tokenizer
        if self.same_vocab:
            self.vocab_size = shared_vocab_size(w_s.shape[0], teacher.vocab_rows, ctx.student_tokenizer)
            k = min(cfg.topk_vocab or self.vocab_size, self.vocab_size)
            student_ids = teacher_ids = torch.arange(k)
            to_student = torch.arange(self.vocab_size)
        else:
            student_ids, teacher_ids = shared_vocabulary(ctx.student_tokenizer, ctx.teacher_tokenizer)
            to_student = teacher_to_student_ids(ctx.student_tokenizer, ctx.teacher_tokenizer)
            self.vocab_size = None
        self.register_buffer("to_student", to_student, persistent=False)  # teacher id -> student id or -1
        self.pinv_init = ctx.student_pretrained if cfg.pinv_init is None else cfg.pinv_init
        pinv_rows = (w_t[teacher_ids], w_s[student_ids], student_ids) if self.pinv_init else None
        self.build_projectors(w_s.shape[1], w_t.shape[1], w_s.dtype, bias=False, pinv_rows=pinv_rows)

    # ------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> TeacherRows:
        if self.same_vocab:  # one tokenization: the teacher's response rows are the student's
            hidden = teacher.response_hidden(batch.student, batch.indices)  # [N, d_t]
            head, bias = head_rows_of(teacher, self.vocab_size)
        else:
            assert batch.teacher is not None and batch.alignment is not None, "dskdv2 needs aligned batches"
            al = batch.alignment
            rows = response_rows(batch.teacher.loss_mask, al.batch_index, al.teacher_pos)
            hidden = teacher.response_hidden(batch.teacher, batch.indices)[rows]  # [P, d_t] at the paired positions
            head, bias = teacher.head()
        argmax = fused_argmax(hidden, head, bias, self.config.chunk_size)
        labels = self.to_student[argmax]  # the student token with the same bytes, or -1
        if not self.same_vocab:
            # where the teacher predicts its own gold token, the aligned student gold token is the same text
            # (ETA pairs identical spans) even when the two vocabularies spell it differently (a SentencePiece
            # "▁word" at the start of a response vs a byte-level "word"); the byte map alone would miss it
            al = batch.alignment
            teacher_gold = batch.teacher.labels[al.batch_index, al.teacher_pos]
            student_gold = batch.student.labels[al.batch_index, al.student_pos]
            labels = torch.where(argmax == teacher_gold, student_gold, labels)
        return TeacherRows(hidden, head, bias, labels=labels)

    @torch.no_grad()
    def prepare(self, batch: Batch, teacher_out: Any, student: nn.Module) -> tuple[TeacherRows, dict[str, Tensor]]:
        """The agreement mask (argmax of the projected teacher state under the current student head equals the
        label) is a denominator of the step: computed here, once, and handed to the loss with the rows."""
        assert isinstance(teacher_out, TeacherRows) and teacher_out.labels is not None
        labels = teacher_out.labels
        h_t2s = self.t2s(teacher_out.hidden.to(self.t2s.weight.dtype))  # [P, d_s]
        t2s_argmax = through_head(student, lambda w_s, b_s, h: fused_argmax(h, w_s, b_s, self.config.chunk_size),
                                  h_t2s)
        agree = (t2s_argmax == labels) & (labels >= 0)
        counts = {"tokens": batch.student.loss_mask.sum(), "pairs": torch.tensor(float(labels.numel())),
                  "t2s_labels": (labels >= 0).sum(), "agree": agree.sum()}
        return replace(teacher_out, mask=agree), counts

    # ------------------------------------------------------------------------------------------- loss
    def forward(self, student: nn.Module, batch: Batch, teacher: TeacherRows, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        tokens = batch.student
        mask = tokens.loss_mask
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden  # [B, T, d_s]
        h_rows = hidden[mask]  # [N, d_s] every response position
        labels = teacher.labels
        assert labels is not None and teacher.mask is not None
        valid = labels >= 0
        h_t2s = self.t2s(teacher.hidden.to(self.t2s.weight.dtype))  # [P, d_s] one per pair

        # where each pair's student position sits among the N response rows
        if self.same_vocab:
            pair_rows = torch.arange(h_rows.shape[0], device=h_rows.device)
        else:
            al = batch.alignment
            assert al is not None
            row_of = torch.cumsum(mask.reshape(-1).long(), 0) - 1
            pair_rows = row_of[al.batch_index * mask.shape[1] + al.student_pos]
        # the share from the raw counts: norm[...] floors a zero count at 1e-6, which would turn 0 ≤ 0 into >
        if norm.counts["agree"] <= cfg.t2s_agreement * norm.counts["pairs"]:
            kd_pairs, kd_denominator = teacher.mask, norm["agree"]
        else:
            kd_pairs, kd_denominator = torch.ones_like(teacher.mask), norm["pairs"]
        # the projected teacher at its student rows (detached: the KD target), and which rows carry the KD
        target_rows = h_rows.new_zeros(h_rows.shape).index_copy(0, pair_rows, h_t2s.detach())
        kd_rows = torch.zeros(h_rows.shape[0], dtype=torch.bool, device=h_rows.device)
        kd_rows[pair_rows] = kd_pairs

        student_space = cfg.spaces != "teacher"

        def head_terms(w_s: Tensor, b_s: Tensor | None, h_rows: Tensor, h_t2s: Tensor) -> tuple[Tensor, ...]:
            """What reads the student's head (run inside its forward: `through_head`)."""
            w_fixed, b_fixed = w_s.detach(), b_s.detach() if b_s is not None else None
            # gold CE and student-space KD share one pass over the student's logits
            main, ce, kd_student, hits = fused_ce_and_divergence(
                h_rows, w_s, target_rows, w_fixed, tokens.labels[mask], divergence=cfg.divergence,
                ce_weight=norm.ce_share(cfg.kd_rate) / norm["tokens"],
                div_weight=cfg.kd_rate / kd_denominator if student_space else 0.0, div_mask=kd_rows,
                temperature=cfg.temperature, chunk_size=cfg.chunk_size, student_bias=b_s, teacher_bias=b_fixed,
                params=cfg.divergence_params)
            # the projector's CE on the teacher's own prediction (trains P_t2s only: the head is detached)
            ce_t2s, _ = fused_cross_entropy(h_t2s, w_fixed, labels.clamp(min=0), bias=b_fixed, mask=valid,
                                            chunk_size=cfg.chunk_size)
            # teacher space: the student's states through P_s2t (made of the detached student head)
            h_s2t = self.project_s2t(h_rows[pair_rows], w_s)  # [P, d_t]
            return main, ce, kd_student, hits, ce_t2s, h_s2t

        main, ce, kd_student, hits, ce_t2s, h_s2t = through_head(student, head_terms, h_rows, h_t2s)
        ce_t2s = ce_t2s / norm["t2s_labels"]
        # ... read by the teacher's head
        kd_teacher = fused_divergence(cfg.divergence, h_s2t.to(teacher.head.dtype), teacher.head, teacher.hidden,
                                      teacher.head, temperature=cfg.temperature, reduction="sum",
                                      chunk_size=cfg.chunk_size, student_bias=teacher.bias,
                                      teacher_bias=teacher.bias, **cfg.divergence_params) / norm["pairs"]

        loss = main
        if student_space:
            loss = loss + cfg.kd_rate * ce_t2s
        if cfg.spaces != "student":
            loss = loss + cfg.kd_rate * kd_teacher
        metrics = {"ce": ce / norm["tokens"], "kd_student": kd_student / kd_denominator, "ce_t2s": ce_t2s.detach(),
                   "kd_teacher": kd_teacher.detach(), "acc": hits / norm["tokens"],
                   "t2s_agreement": teacher.mask.sum().float() / norm["pairs"]}
        return loss, metrics
