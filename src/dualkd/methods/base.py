"""What every objective is: an nn.Module that owns its trainable extras and turns a batch into (loss, metrics).

The one training loop calls, per micro-batch:
    teacher_out = objective.teacher_forward(teacher, batch)          # under no_grad, timed as "teacher"
    loss, metrics = objective(student, batch, teacher_out, norm)     # timed as "student", then backward
Objectives run models only through `lm_forward`, so every method sees outputs the same way.

Normalization: `norm[key]` is the count `key` (see `counts`) summed over the micro-batches of the optimizer
step and over all processes, divided by the number of processes (DDP averages gradients over processes).
A loss written as `per_token.sum() / norm["tokens"]` is therefore the token mean over the *global* batch,
whatever the micro-batch size, accumulation or process count. Metrics follow the same rule so that summing
them over micro-batches and averaging over processes gives global means.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dualkd.data.collate import Batch, ModelBatch
from dualkd.errors import ModelError
from dualkd.losses import token_cross_entropy
from dualkd.losses.fused import fused_cross_entropy
from dualkd.methods.common import check_head_is_linear, head_of
from dualkd.schema import StrictModel


@dataclass
class LMOutput:
    logits: Tensor | None  # [B, T, V]
    hidden: Tensor | None  # [B, T, d] last layer, after the final norm


def lm_forward(model: nn.Module, tokens: ModelBatch, *, hidden: bool = False, logits: bool = True,
               decoder_input_ids: Tensor | None = None, encoder_outputs: Any = None) -> LMOutput:
    """Run a causal LM on a padded batch. `logits=False` (for fused losses) asks transformers to compute the
    LM head on the last position only (`logits_to_keep=1`), so the [B, T, V] logits are never built.

    An encoder-decoder model reads `input_ids` with its encoder and predicts `labels`: its decoder inputs are
    the labels shifted right behind its start token, unless `decoder_input_ids` [B, T] are given (TIE-KD's
    later passes); `encoder_outputs` reuses an encoder pass. Outputs are per target position."""
    if getattr(model.config, "is_encoder_decoder", False):
        if decoder_input_ids is None:
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(
                labels=tokens.labels.masked_fill(~tokens.loss_mask, -100))
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_outputs=encoder_outputs,
                    decoder_input_ids=decoder_input_ids, output_hidden_states=hidden, use_cache=False)
        return LMOutput(logits=out.logits, hidden=out.decoder_hidden_states[-1] if hidden else None)
    kwargs = {} if logits else {"logits_to_keep": 1}
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                output_hidden_states=hidden or not logits, use_cache=False, **kwargs)
    return LMOutput(logits=out.logits if logits else None,
                    hidden=out.hidden_states[-1] if hidden or not logits else None)


def response_logprobs(model: nn.Module, tokens: ModelBatch, chunk_size: int | None = None) -> Tensor:
    """Σ_t log p(label_t) over each row's response tokens (+ EOS): [B]. Fused over the vocabulary (no [B, T, V]
    logits); gradients flow when the caller has them on (DPO's policy), not for frozen models."""
    hidden = lm_forward(model, tokens, hidden=True, logits=False).hidden  # [B, T, d]
    head, bias = head_of(model)
    ce, _ = fused_cross_entropy(hidden, head, tokens.labels, bias=bias, mask=tokens.loss_mask, reduction="none",
                                chunk_size=chunk_size)  # [B, T], 0 off the mask
    return -ce.sum(-1)


@dataclass
class StepNorm:
    """Loss denominators of one optimizer step (see the module docstring)."""

    counts: dict[str, float]
    step: int = 0
    """Optimizer steps done before this one (objectives with a schedule, e.g. CBMI's phase switch)."""

    def __getitem__(self, key: str) -> float:
        # an all-masked global batch has zero sums; dividing by 1 keeps the loss 0 with finite gradients
        return max(self.counts[key], 1e-6)


@dataclass
class SetupContext:
    """What an objective may inspect (and validate) before training starts."""

    student: nn.Module
    teacher: nn.Module | None
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    same_tokenizer: bool
    student_pretrained: bool = True
    """False when the student starts from random weights (`student.init: random`)."""
    cache_k: int | None = None
    """The k of an offline teacher cache the run trains from (no teacher model then)."""
    cache_head: tuple[Tensor, Tensor | None] | None = None
    """The cached teacher's LM head (weight [V, d], bias), for objectives with `reads_cached_hidden`."""
    frozen: dict[str, nn.Module] | None = None
    """The extra frozen models of `frozen_roles`, loaded from the config's `teachers` (same tokenizer as the
    teacher); the objective keeps them as plain attributes (never trained, saved or wrapped)."""


class Objective(nn.Module, ABC):
    config_class: ClassVar[type[StrictModel]]
    needs_teacher: ClassVar[bool] = False
    """The loop loads a teacher and calls `teacher_forward`."""
    teacher_reads_own_tokens: ClassVar[bool] = False
    """Cross-tokenizer objectives: the data is also tokenized with the teacher's tokenizer."""
    reads_teacher_cache: ClassVar[bool] = False
    """The objective can train from an offline top-k teacher cache instead of a live teacher."""
    reads_cached_hidden: ClassVar[bool] = False
    """From a cache, the objective reads the teacher's hidden states and LM head (written with --hidden)."""
    wants_pairs: ClassVar[bool] = False
    """The data are preference pairs (`PreferenceDataset`: chosen rows, then rejected rows)."""
    eval_weight: ClassVar[str] = "tokens"
    """The count that weights each dev batch's loss in the dev mean (DPO: pairs)."""
    changes_trained_parameters: ClassVar[bool] = False
    """Some parameters stop getting gradients mid-run (CBMI freezes its LM): DDP must look for unused ones."""
    counts_need_teacher: ClassVar[bool] = False
    """The loop runs the teacher on every micro-batch of a step before `counts` (denominators that depend on
    the teacher's predictions, such as DSKDv2's agreement count)."""

    def __init__(self, config: StrictModel):
        super().__init__()
        self.config = config

    def setup(self, ctx: SetupContext) -> None:
        """Validate models/tokenizers against the objective and build trainable extras (projectors)."""

    def frozen_roles(self) -> dict[str, str]:
        """Extra frozen models this objective reads besides the teacher: role -> what it is. The run config's
        `teachers.<role>` names each; they reach `setup` as `ctx.frozen`."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for the objective's own parameters, e.g. [{"params": [...], "lr": 1e-3}]."""
        return []

    def make_aligner(self, student_tokenizer: Any, teacher_tokenizer: Any) -> Any | None:
        """An aligner (align/pairs.py) when the objective pairs positions across two tokenizations."""
        return None

    def counts(self, batch: Batch, teacher_out: Any = None, student: nn.Module | None = None) -> dict[str, Tensor]:
        """Counts that normalize this objective's losses (summed over the global batch by the loop). `teacher_out`
        and `student` are given when `counts_need_teacher` is set."""
        return {"tokens": batch.student.loss_mask.sum()}

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module | None, batch: Batch) -> Any:
        return None

    def gold_ce(self, student: nn.Module, batch: Batch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """(1 - kd_rate)·CE on the dataset responses, alone: the gold part of a student-sampled step (the
        objective's other terms train on the samples). Fused over the vocabulary when the head allows it."""
        weight = 1.0 - float(getattr(self.config, "kd_rate", 0.0))
        tokens = batch.student
        n = norm["tokens"]
        if weight == 0.0:  # kd_rate = 1: no gold term (DistiLLM's setting)
            return torch.zeros((), device=tokens.input_ids.device), {}
        if getattr(self, "_student_head_is_linear", None) is None:
            try:
                check_head_is_linear(student, "student")
                self._student_head_is_linear = True
            except ModelError:
                self._student_head_is_linear = False
        if self._student_head_is_linear:
            hidden = lm_forward(student, tokens, hidden=True, logits=False).hidden  # [B, T, d]
            head, bias = head_of(student)
            ce, hits = fused_cross_entropy(hidden[tokens.loss_mask], head, tokens.labels[tokens.loss_mask], bias=bias)
        else:
            logits = lm_forward(student, tokens).logits  # [B, T, V]
            ce = token_cross_entropy(logits, tokens.labels, tokens.loss_mask)
            hits = token_accuracy(logits.detach(), tokens.labels, tokens.loss_mask)
        return weight * ce / n, {"ce": ce.detach() / n, "acc": hits / n}

    @abstractmethod
    def forward(
        self, student: nn.Module, batch: Batch, teacher_out: Any, norm: StepNorm
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss for this micro-batch, already divided by the step's counts; detached metrics to log)."""


def token_accuracy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Number of counted positions where argmax(logits) == label (a sum; divide by a count)."""
    return ((logits.argmax(-1) == labels) & mask).sum().float()
