"""KD over the shared vocabulary: the simplest cross-tokenizer KD (KDFlow's `simple_ctkd`, songmzhang/KDFlow:
"modern LLMs have a large amount of shared tokens").

    S          the token pairs of the two vocabularies that stand for the same bytes (align/vocab.py), EOS ↔ EOS
    pairs      student and teacher response positions that predict tokens of identical text (exact token
               alignment on character offsets, align/pairs.py), plus the two EOS positions
    at a pair  D( softmax(z_t[S_t] / τ) ‖ softmax(z_s[S_s] / τ) ): both distributions restricted to S and
               renormalized there; D is any divergence of dualkd.losses (KDFlow default: forward KL)
    L = (1 − r)·CE(z_s, y) + r·Σ_pairs D,   both divided by the student's response tokens

No projector and nothing learned beyond the student: the teacher's logits at the shared tokens are its target.
Runs fused: the heads restricted to S (W_s[S_s], W_t[S_t]) go through the chunked divergence, so no [P, |S|]
logits outlive a chunk. The teacher is read at response positions only, so a cache written with `--hidden`
serves it as a live teacher does.

Deviations from the official code (docs/fidelity.md): S pairs tokens by their bytes, not by raw strings with
`Ġ` swapped for `▁` (which misses every token with a newline or a non-ASCII byte in a byte-level vocabulary,
and pairs a few strings that mean different bytes); positions are paired on character offsets, not by the
string walk that stops matching after the first newline (docs/benchmark-align.md: it pairs 45% vs 90%
of SmolLM2's tokens); S holds the EOS pair, so the EOS position distills the teacher's end-of-text mass (the
official overlap of token strings holds no special token).

The paper's idea, the official code as verified and the switches: docs/methods/baselines.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from dualkd.align.pairs import ExactAligner
from dualkd.align.vocab import shared_vocabulary
from dualkd.data.collate import Batch, ModelBatch
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses import fused_divergence
from dualkd.losses.fused import fused_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm
from dualkd.methods.common import DivergenceChoice
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.models import head_rows
from dualkd.teachers import Teacher, response_rows


class SharedVocabKDConfig(DivergenceChoice):
    name: Literal["shared_vocab_kd"] = "shared_vocab_kd"


@dataclass
class PairedTeacher:
    hidden: Tensor  # [P, d_t] the teacher's last hidden states at the paired positions
    batch_index: Tensor  # [P]
    student_pos: Tensor  # [P]


class SharedVocabKD(Objective):
    def needs(self) -> Needs:
        return Needs(teacher=(RESPONSE_HIDDEN_AND_HEAD,), teacher_tokens=True, aligner=ExactAligner)
    config: SharedVocabKDConfig

    def setup(self, ctx: SetupContext) -> None:
        assert ctx.teacher is not None
        ctx.teacher.require({"response_hidden", "head"}, "objective `shared_vocab_kd`")
        check_head_is_linear(ctx.student, "student")
        student_ids, teacher_ids = shared_vocabulary(ctx.student_tokenizer, ctx.teacher_tokenizer)
        w_t, b_t = ctx.teacher.head()
        keep = (student_ids < head_rows(ctx.student)) & (teacher_ids < w_t.shape[0])  # padding rows aside
        student_ids, teacher_ids = student_ids[keep], teacher_ids[keep]
        if student_ids.numel() < 2:
            raise ModelError("objective `shared_vocab_kd`: the two vocabularies share fewer than 2 tokens (by "
                             "bytes); use an objective that maps between them (dskdv2, mined, uld)")
        self.register_buffer("student_ids", student_ids, persistent=False)  # [|S|]
        # the teacher is frozen: its head restricted to S is built once
        self.register_buffer("teacher_head", w_t.detach()[teacher_ids].clone(), persistent=False)  # [|S|, d_t]
        self.register_buffer("teacher_bias", b_t.detach()[teacher_ids].clone() if b_t is not None else None,
                             persistent=False)

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> PairedTeacher:
        if batch.alignment is None or batch.teacher is None:  # one tokenizer: every response position pairs
            mask = batch.student.loss_mask
            b, s = mask.nonzero(as_tuple=True)
            return PairedTeacher(teacher.response_hidden(batch.student, batch.indices), b, s)
        al = batch.alignment
        rows = response_rows(batch.teacher.loss_mask, al.batch_index, al.teacher_pos)
        hidden = teacher.response_hidden(batch.teacher, batch.indices)[rows]  # [P, d_t]
        return PairedTeacher(hidden, al.batch_index, al.student_pos)

    def forward(self, student: nn.Module, batch: Batch, teacher: PairedTeacher, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden
        return through_head(student, partial(self._loss, tokens=tokens, teacher=teacher, norm=norm), hidden)

    def _loss(self, w_s: Tensor, b_s: Tensor | None, hidden: Tensor, tokens: ModelBatch, teacher: PairedTeacher,
              norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """What reads the student's head (run inside its forward: `lm.through_head`)."""
        cfg = self.config
        ce, hits = fused_cross_entropy(hidden, w_s, tokens.labels, bias=b_s, mask=tokens.loss_mask,
                                       chunk_size=cfg.chunk_size)
        ids = self.student_ids
        kd = fused_divergence(cfg.divergence, hidden[teacher.batch_index, teacher.student_pos], w_s[ids],
                              teacher.hidden.to(w_s.dtype), self.teacher_head.to(w_s.dtype),
                              temperature=cfg.temperature, reduction="sum", chunk_size=cfg.chunk_size,
                              student_bias=b_s[ids] if b_s is not None else None,
                              teacher_bias=self.teacher_bias.to(w_s.dtype) if self.teacher_bias is not None else None,
                              **cfg.divergence_params)
        n = norm["tokens"]
        ce, kd = ce / n, kd / n
        loss = norm.blend(ce, kd, cfg.kd_rate)
        aligned = torch.as_tensor(float(teacher.batch_index.numel()), device=ce.device) / n
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "aligned": aligned, "acc": hits / n}
