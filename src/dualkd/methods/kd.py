"""Vanilla word-level KD (Hinton et al., 2015; the "vanilla KD framework" of DSKD, arXiv 2406.17328):

    L = (1 - kd_rate) * CE(student, gold) + kd_rate * D(p_teacher^τ || q_student^τ)

on response tokens, same tokenizer. D is any divergence of `dualkd.losses` (forward KL by default), no τ².

`top_k: k` compares the teacher's k most likely tokens plus one tail bucket instead of the whole vocabulary
(`losses/sparse.py`, forward KL): what an offline teacher cache holds (`dualkd cache-teacher`, then
`teacher.cache`), and the live twin of it, to check a cache against. A teacher limited to its top k (a
cache) sets `top_k` to that k.

Large vocabularies go through the fused chunked loss (`losses/fused.py`): the models return their last hidden
states and the loss multiplies them by the LM heads chunk by chunk, so no [N, V] logits exist. `fused: auto`
does this from `fused_min_vocab` rows on, under every engine: the student's head is read inside its own
module's forward (`lm.through_head`), where ZeRO-3 and FSDP2 gather it, and a sharded teacher's head is
gathered by the teacher once per micro-batch; both paths give the same numbers (tested).

When the two models pad their vocabularies differently (e.g. 151,936 vs 152,064 rows for one Qwen
tokenizer), D uses the first `min(V_student, V_teacher, len(tokenizer))` rows: the padding rows are never
real tokens and are left out of both distributions.

The paper's idea, the official code as verified and the switches: docs/methods/baselines.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from dualkd.data.collate import Batch, ModelBatch
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, lm_forward, through_head
from dualkd.losses import divergence, token_cross_entropy
from dualkd.losses.fused import fused_ce_and_divergence, fused_cross_entropy
from dualkd.losses.ranking import hierarchical_ranking_loss
from dualkd.losses.sparse import TopKTargets, sparse_kl
from dualkd.methods.base import Objective, SetupContext, StepNorm, token_accuracy
from dualkd.methods.common import DivergenceChoice, TeacherRows, head_rows_of
from dualkd.methods.needs import RESPONSE_HIDDEN_AND_HEAD, Needs
from dualkd.models import head_rows, shared_vocab_size
from dualkd.schema import AutoOnOff
from dualkd.teachers import Teacher


class KDConfig(DivergenceChoice):
    name: Literal["kd"] = "kd"
    fused: AutoOnOff = "auto"
    """Chunked loss from hidden states (never materializes [N, V] logits). `auto`: when the vocabulary has at
    least `fused_min_vocab` rows."""
    fused_min_vocab: int = Field(32000, ge=1)
    """Vocabulary size from which `fused: auto` uses the fused loss."""
    top_k: int | None = Field(None, ge=1)
    """Distil only the teacher's top-k tokens + a tail bucket (forward KL). Reading a teacher cache sets it to
    the cache's k when unset."""
    ranking_top_k: int | None = Field(None, ge=1)
    """Add TIE-KD's hierarchical ranking loss with this k to D (`losses/ranking.py`; needs the [N, V] logits,
    so `fused: off`). None: no ranking loss."""

    @model_validator(mode="after")
    def _top_k_is_forward_kl(self) -> KDConfig:
        if self.top_k is not None and self.divergence != "fkl":
            raise ValueError("top_k (sparse KD with a tail bucket) is defined for divergence fkl only")
        return self


class KD(Objective):
    def needs(self) -> Needs:
        """Top-k from a teacher that keeps only its top k (a cache, a server); else what `fused` and `top_k`
        choose of a model: hidden states and head (fused), top-k, or full logits."""
        cfg = self.config
        if cfg.ranking_top_k is not None:
            return Needs(teacher=(frozenset({"logits"}),), why="objective.ranking_top_k: TIE-KD's ranking loss")
        if cfg.top_k is not None:
            return Needs(teacher=(frozenset({"topk"}),), why="objective.top_k")
        dense = {"on": (RESPONSE_HIDDEN_AND_HEAD,), "off": (frozenset({"logits"}),),
                 "auto": (RESPONSE_HIDDEN_AND_HEAD, frozenset({"logits"}))}[cfg.fused]
        return Needs(teacher=(*dense, frozenset({"topk"})))

    config: KDConfig

    def setup(self, ctx: SetupContext) -> None:
        if not ctx.same_tokenizer:
            raise ModelError(
                "objective `kd` needs the student and teacher to share one tokenizer, but their vocabularies "
                "differ; use a cross-tokenizer objective (dskd_cma, dskdv2, uld, mined)"
            )
        teacher = ctx.teacher
        assert teacher is not None
        self.top_k = self.config.top_k
        if teacher.k is not None:  # a teacher that only knows its top k (a cache): those are the targets
            if self.top_k is not None and self.top_k != teacher.k:
                raise ModelError(f"objective.top_k={self.top_k} but the teacher holds its top {teacher.k} only")
            # the sparse loss is forward KL over top-k + tail buckets; nothing else can be computed from them
            if self.config.divergence != "fkl":
                raise ModelError(f"objective.divergence={self.config.divergence}: {teacher.what} gives its top-"
                                 f"{teacher.k} only, and KD from a top-k with a tail bucket is defined for "
                                 "divergence fkl; set objective.divergence: fkl or use a live teacher")
            if self.config.ranking_top_k is not None:
                raise ModelError(f"objective.ranking_top_k: TIE-KD's ranking loss reads the teacher's full "
                                 f"logits, which {teacher.what} cannot give; drop it or use a live teacher")
            self.top_k = teacher.k
            teacher.require({"topk"}, "objective `kd`")
            self.vocab_size = min(head_rows(ctx.student), len(ctx.student_tokenizer))
            self.fused = False
            return
        self.vocab_size = shared_vocab_size(head_rows(ctx.student), teacher.vocab_rows, ctx.student_tokenizer)
        mode = self.config.fused
        self.fused = mode == "on" or (mode == "auto" and self.vocab_size >= self.config.fused_min_vocab)
        if self.config.ranking_top_k is not None:
            if mode == "on" or self.config.top_k is not None:
                raise ModelError("objective.ranking_top_k needs the dense logits: set objective.fused: off and no "
                                 "top_k")
            self.fused = False
        if not self.fused:
            teacher.require({"topk"} if self.top_k is not None else {"logits"}, "objective `kd`")
            return
        try:
            check_head_is_linear(ctx.student, "student")
            teacher.require({"response_hidden", "head"}, "objective `kd`")  # a live teacher checks its head
        except ModelError as e:
            raise ModelError(f"{e}; set objective.fused: off") from None

    @torch.no_grad()
    def teacher_forward(self, teacher: Teacher, batch: Batch) -> Tensor | TeacherRows | TopKTargets:
        tokens = batch.student  # same tokenizer: the teacher reads the student's tokens
        if self.top_k is not None:
            return teacher.topk(tokens, batch.indices, self.top_k, self.vocab_size, self.config.chunk_size)
        if self.fused:
            return TeacherRows(teacher.response_hidden(tokens, batch.indices), *head_rows_of(teacher, self.vocab_size))
        logits = teacher.logits(tokens)
        return logits[tokens.loss_mask][:, : self.vocab_size]  # [N, V] response positions only

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Tensor | TeacherRows, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch.student
        if isinstance(teacher_out, TopKTargets):
            return self._sparse_loss(student, tokens, teacher_out, norm)
        if isinstance(teacher_out, TeacherRows):
            return self._fused_loss(student, tokens, teacher_out, norm)
        logits = lm_forward(student, tokens).logits  # [B, T, V_s]
        ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask) / norm["tokens"]
        student_rows = logits[tokens.loss_mask][:, : self.vocab_size]  # [N, V]
        kd = divergence(self.config.divergence, student_rows, teacher_out, temperature=self.config.temperature,
                        reduction="sum", **self.config.divergence_params) / norm["tokens"]
        if self.config.ranking_top_k is not None:
            kd = kd + hierarchical_ranking_loss(student_rows, teacher_out, self.config.ranking_top_k).sum() / norm[
                "tokens"]
        rate = self.config.kd_rate
        loss = norm.blend(ce, kd, rate)
        acc = token_accuracy(logits.detach(), tokens.labels, tokens.loss_mask) / norm["tokens"]
        return loss, {"ce": ce.detach(), "kd": kd.detach(), "acc": acc}

    def _fused_loss(self, student: nn.Module, tokens: ModelBatch, teacher: TeacherRows, norm: StepNorm
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden  # [B, T, d_s]
        rate = self.config.kd_rate
        loss, ce, kd, hits = through_head(student, lambda head, bias, h: fused_ce_and_divergence(
            h, head, teacher.hidden, teacher.head, tokens.labels[tokens.loss_mask],
            divergence=self.config.divergence, ce_weight=norm.ce_share(rate), div_weight=rate,
            temperature=self.config.temperature,
            vocab_size=self.vocab_size, chunk_size=self.config.chunk_size, student_bias=bias,
            teacher_bias=teacher.bias, params=self.config.divergence_params), hidden[tokens.loss_mask])
        n = norm["tokens"]
        return loss / n, {"ce": ce / n, "kd": kd / n, "acc": hits / n}

    def _sparse_loss(self, student: nn.Module, tokens: ModelBatch, teacher: TopKTargets, norm: StepNorm
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden[tokens.loss_mask]  # [N, d_s]
        if hidden.shape[0] != len(teacher):
            raise ModelError(f"the teacher targets cover {len(teacher)} positions but the batch has "
                             f"{hidden.shape[0]} response tokens (a cache of other data or truncation?)")
        rate, n = self.config.kd_rate, norm["tokens"]

        def head_terms(head: Tensor, bias: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            ce, hits = fused_cross_entropy(h, head, tokens.labels[tokens.loss_mask], bias=bias,
                                           chunk_size=self.config.chunk_size)
            kd = sparse_kl(h, head[: self.vocab_size], teacher, temperature=self.config.temperature,
                           student_bias=bias[: self.vocab_size] if bias is not None else None,
                           chunk_size=self.config.chunk_size)
            return ce, hits, kd

        ce, hits, kd = through_head(student, head_terms, hidden)
        loss = norm.blend(ce, kd, rate) / n
        return loss, {"ce": ce.detach() / n, "kd": kd.detach() / n, "acc": hits / n}


class WordKDConfig(KDConfig):
    """`word_kd`: the name translation papers use for `kd` on an encoder-decoder model (Kim & Rush's word-level
    KD): the same loss, any divergence, per target token."""

    name: Literal["word_kd"] = "word_kd"  # type: ignore[assignment]


class WordKD(KD):
    """`kd` under the name `word_kd` (its config: WordKDConfig)."""
