"""TIE-KD (arXiv 2305.08096): word-level KD with a hierarchical ranking loss and iterative KD, for translation
models.

    L = (1 − λ)·CE_ls(gold) + λ·(1/N)·Σ_n Σ_t [KL(p_n ‖ q_n) + L_top1 + L_topk]      / response tokens

Pass 1 feeds both decoders the gold target shifted right; pass n + 1 feeds them [start] + argmax(q_n)[:-1],
the student's greedy teacher-forced predictions of pass n (computed in parallel, not decoded). The encoders
run once per step and their outputs are reused; the gold target's mask counts every pass; the label-smoothed
CE is on pass 1 only; gradients flow through every student pass, never into the teacher. With `iterations: 1`
the objective is word-level KD + ranking loss, which also applies to decoder-only models.

The KL is the exact one, Σ_v p_v (log p_v − log q_v) with log-softmax (the paper's formula). The official
code takes Σ_v p_v (log p_v − log(q_v + 1e-6)); with a label-smoothed teacher at V = 32k the two differ by
about half the median per-token gradient (the floor caps the pull towards tokens where q_v ≪ 1e-6).
`kl_floor: 1.0e-6` reproduces the official gradient; the loss *value* it logs is not the official one (the
floor sits inside the log only, docs/fidelity.md), so compare runs by their gradients or BLEU, not by the
logged KD value.

The paper's idea, the official code as verified and the switches: docs/methods/translation.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.errors import ModelError
from dualkd.lm import is_seq2seq, lm_forward
from dualkd.losses import divergence
from dualkd.losses.cross_entropy import label_smoothed_cross_entropy
from dualkd.losses.divergences import upcast
from dualkd.losses.ranking import hierarchical_ranking_loss
from dualkd.methods.base import Objective, SetupContext, StepNorm, token_accuracy
from dualkd.methods.common import DistillationConfig
from dualkd.methods.needs import Needs
from dualkd.models import head_rows, shared_vocab_size
from dualkd.teachers import Teacher


class TIEKDConfig(DistillationConfig):
    name: Literal["tie_kd"] = "tie_kd"
    top_k: int = Field(5, ge=1)
    """k of the ranking loss (paper: 5)."""
    iterations: int = Field(3, ge=1)
    """N passes of iterative KD (paper: 3); more than 1 needs an encoder-decoder model."""
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    """ε of the CE (paper: 0.1)."""
    ranking: bool = True
    """Add the hierarchical ranking loss (off: word-KD, with iterations)."""
    temperature: float = Field(1.0, gt=0)
    """τ of the KL (paper: 1)."""
    kl_floor: float | None = Field(None, gt=0)
    """Compute the KL as Σ p·(log p − log(q + floor)), as the official code does with 1e-6 (None: exact KL)."""


@dataclass
class TeacherPass:
    teacher: Teacher  # for the later passes (timed, placed and without gradients like every teacher call)
    logits: Tensor  # [B, T, V] pass 1
    encoder_outputs: Any  # reused by later passes (None for decoder-only models)


def next_decoder_inputs(logits: Tensor, start_id: int) -> Tensor:
    """[start] + argmax(logits)[:, :-1]: the decoder inputs of the next pass, [B, T, V] -> [B, T]."""
    greedy = logits.argmax(-1)
    start = torch.full_like(greedy[:, :1], start_id)
    return torch.cat([start, greedy[:, :-1]], dim=1)


class TIEKD(Objective):
    def needs(self) -> Needs:  # iterative passes encode the source once and re-run the decoder on given inputs
        return Needs(teacher=(frozenset({"logits", "encoder"} if self.config.iterations > 1 else {"logits"}),))

    config: TIEKDConfig

    def setup(self, ctx: SetupContext) -> None:
        if not ctx.same_tokenizer:
            raise ModelError("objective `tie_kd` needs one tokenizer for student and teacher")
        assert ctx.teacher is not None
        self.seq2seq = is_seq2seq(ctx.student)
        if self.config.iterations > 1 and not self.seq2seq:
            raise ModelError("objective `tie_kd`: iterative KD (iterations > 1) re-runs a decoder on its own "
                             "predictions and needs an encoder-decoder model; use iterations: 1 for a causal LM")
        ctx.teacher.require(self.needs().teacher[0], "objective `tie_kd`")
        self.vocab_size = shared_vocab_size(head_rows(ctx.student), ctx.teacher.vocab_rows, ctx.student_tokenizer)
        if self.config.top_k > self.vocab_size:
            raise ModelError(f"objective.top_k={self.config.top_k} exceeds the vocabulary ({self.vocab_size})")
        self.start_id = int(ctx.student.config.decoder_start_token_id) if self.seq2seq else 0

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> TeacherPass:
        tokens = batch.student
        encoder_outputs = None
        if self.seq2seq and self.config.iterations > 1:
            encoder_outputs = teacher.encode(tokens)
        logits = teacher.logits(tokens, encoder_outputs=encoder_outputs)
        return TeacherPass(teacher, logits, encoder_outputs)

    def forward(self, student: nn.Module, batch: Batch, teacher: TeacherPass, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, tokens, V = self.config, batch.student, self.vocab_size
        mask = tokens.loss_mask  # the gold target's mask counts in every pass
        encoder_outputs = None
        if self.seq2seq and cfg.iterations > 1:
            encoder_outputs = student.get_encoder()(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        kd_total, ranking_total = 0.0, 0.0
        decoder_inputs = None
        ce = acc = None
        for n in range(cfg.iterations):
            logits = lm_forward(student, tokens, decoder_input_ids=decoder_inputs,
                                encoder_outputs=encoder_outputs).logits  # [B, T, V_s]
            if n == 0:
                t_logits = teacher.logits
                ce = label_smoothed_cross_entropy(logits, tokens.labels, mask, cfg.label_smoothing).sum()
                acc = token_accuracy(logits.detach(), tokens.labels, mask)
            else:
                t_logits = teacher.teacher.logits(tokens, decoder_input_ids=decoder_inputs,
                                                  encoder_outputs=teacher.encoder_outputs)
            rows_s, rows_t = logits[mask][:, :V], t_logits[mask][:, :V]
            kd_total = kd_total + self._kl(rows_s, rows_t).sum()
            if cfg.ranking:
                ranking_total = ranking_total + hierarchical_ranking_loss(rows_s, rows_t, cfg.top_k).sum()
            if n + 1 < cfg.iterations:
                decoder_inputs = next_decoder_inputs(logits.detach(), self.start_id)
        n_tok = norm["tokens"]
        kd = (kd_total + ranking_total) / cfg.iterations
        loss = norm.blend(ce, kd, cfg.kd_rate) / n_tok
        metrics = {"ce": ce.detach() / n_tok, "kd": torch.as_tensor(kd_total).detach() / cfg.iterations / n_tok,
                   "acc": acc / n_tok}
        if cfg.ranking:
            metrics["ranking"] = torch.as_tensor(ranking_total).detach() / cfg.iterations / n_tok
        return loss, metrics

    def _kl(self, student_rows: Tensor, teacher_rows: Tensor) -> Tensor:
        """KL(p^τ ‖ q^τ) per row, exact or with the official floor inside log q: [N, V], [N, V] -> [N]."""
        cfg = self.config
        if cfg.kl_floor is None:
            return divergence("fkl", student_rows, teacher_rows, temperature=cfg.temperature, reduction="none")
        p = torch.softmax(upcast(teacher_rows) / cfg.temperature, -1)
        q = torch.softmax(upcast(student_rows) / cfg.temperature, -1)
        return (torch.xlogy(p, p) - p * torch.log(q + cfg.kl_floor)).sum(-1)
