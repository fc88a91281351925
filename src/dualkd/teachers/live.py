"""A teacher model on this machine: every call without gradients, under the engine's autocast, timed as "teacher".

    teacher: {path: HuggingFaceTB/SmolLM2-1.7B-Instruct, dtype: bfloat16}        # kind: live (the default)

The engine places the model (`placement`: same device, CPU offload, sharded) before training and attaches its
autocast and the step timer (`attach`); objectives only call the methods of `Teacher`. Where an objective
reads the LM head (`head`, `sequence_logprobs`), `require` first checks that the model's logits are its last
hidden states times that head (no soft-capping): the fused losses compute them so.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from dualkd.data.collate import ModelBatch
from dualkd.data.formats import Example
from dualkd.errors import ConfigError
from dualkd.generate import GenerationConfig, generate_responses
from dualkd.lm import check_head_is_linear, head_is_whole, head_of, is_seq2seq, lm_forward, response_logprobs
from dualkd.losses.sparse import TopKTargets, topk_rows
from dualkd.models import head_rows, load_model
from dualkd.teachers.base import CAPABILITIES, Teacher
from dualkd.teachers.spec import TeacherSite, TeacherSpec

_READ_THE_HEAD = {"head", "sequence_logprobs"}  # capabilities whose values assume logits = h W^T + b


class LiveTeacherConfig(TeacherSpec):
    """A teacher model loaded from `path` (the model fields), run where `placement` says."""

    kind: Literal["live"] = "live"

    def provides(self) -> tuple[str, frozenset[str]]:
        return LiveTeacher.what, LiveTeacher.provides

    def open(self, tokenizer: Any, site: TeacherSite) -> LiveTeacher:
        model = load_model(self, tokenizer, role="teacher", seed=site.seed, field=site.field)
        if is_seq2seq(model) != site.seq2seq:
            raise ConfigError(f"{site.field}: the student and the teacher must both be encoder-decoder models or "
                              "both decoder-only")
        return LiveTeacher(model, tokenizer, name=site.field, placement=self.placement)


class LiveTeacher(Teacher):
    provides: ClassVar[frozenset[str]] = frozenset(CAPABILITIES) - {"members"}  # one model
    what: ClassVar[str] = "a live teacher"

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "teacher", placement: str = "auto"):
        super().__init__(tokenizer)
        self._model, self.name, self.placement = model, name, placement
        self._linear_head = False
        self._autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._timer: Any = None
        self._gather_head: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
        self._head_copy: tuple[weakref.ref, weakref.ref | None] | None = None

    @property
    def model(self) -> nn.Module:
        """The model (for tests and tools that hold a `LiveTeacher` as such; objectives read capabilities)."""
        return self._model

    def modules(self) -> list[nn.Module]:
        return [self._model]

    def describe(self, count_parameters: Callable[[nn.Module], int]) -> str:
        return f"{self.name} {count_parameters(self._model) / 1e6:.2f}M params (placement {self.placement})"

    @property
    def vocab_rows(self) -> int:
        return head_rows(self._model)

    def require(self, needs: set[str], who: str) -> None:
        super().require(needs, who)
        if needs & _READ_THE_HEAD and not self._linear_head:
            check_head_is_linear(self._model, self.name)  # refused with the reason (soft-capping, a sharded head)
            self._linear_head = True

    def attach(self, device: torch.device, place: Callable[[nn.Module, str], nn.Module],
               autocast: Callable[[], contextlib.AbstractContextManager], timer: Any = None,
               gather_head: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> None:
        self._model, self._autocast, self._timer = place(self._model, self.placement), autocast, timer
        self._gather_head = gather_head

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        section = self._timer.section("teacher") if self._timer is not None else contextlib.nullcontext()
        with section, torch.no_grad(), self._autocast():
            yield

    def hidden(self, tokens: ModelBatch) -> Tensor:
        with self._running():
            return lm_forward(self._model, tokens, hidden=True, logits=False).hidden  # [B, T, d]

    def response_hidden(self, tokens: ModelBatch, indices: list[int]) -> Tensor:
        return self.hidden(tokens)[tokens.loss_mask]  # [N, d]

    def head(self) -> tuple[Tensor, Tensor | None]:
        """The LM head. Where the engine shards the teacher (ZeRO-3, FSDP2) it is gathered into a whole copy
        (the objectives read it outside any forward of the teacher); the copy lives as long as someone holds
        it, so the micro-batches of a step share one gathering and no copy outlives them. Every process
        gathers at the same calls (they run the same micro-batches)."""
        if head_is_whole(self._model) or self._gather_head is None:
            return head_of(self._model)  # refused with the reason where the head is not whole
        if self._head_copy is not None:
            weight, bias = (ref() if ref is not None else None for ref in self._head_copy)
            if weight is not None and (bias is not None or self._head_copy[1] is None):
                return weight, bias
        with self._gather_head(self._model):
            weight, bias = head_of(self._model)
            weight, bias = weight.detach().clone(), bias.detach().clone() if bias is not None else None
        self._head_copy = (weakref.ref(weight), weakref.ref(bias) if bias is not None else None)
        return weight, bias

    def topk(self, tokens: ModelBatch, indices: list[int], k: int, vocab_size: int,
             chunk_size: int | None = None) -> TopKTargets:
        hidden = self.response_hidden(tokens, indices)
        head, bias = self.head()
        with self._running():
            return topk_rows(hidden, head[:vocab_size], bias[:vocab_size] if bias is not None else None, k,
                             chunk_size)

    def logits(self, tokens: ModelBatch, decoder_input_ids: Tensor | None = None, encoder_outputs: Any = None
               ) -> Tensor:
        with self._running():
            return lm_forward(self._model, tokens, decoder_input_ids=decoder_input_ids,
                              encoder_outputs=encoder_outputs).logits  # [B, T, V]

    def embeddings(self, ids: Tensor) -> Tensor:
        with self._running():
            return self._model.get_input_embeddings()(ids)

    def sequence_logprobs(self, tokens: ModelBatch, chunk_size: int | None = None) -> Tensor:
        with self._running():
            return response_logprobs(self._model, tokens, chunk_size)  # [B]

    def encode(self, tokens: ModelBatch) -> Any:
        with self._running():
            return self._model.get_encoder()(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)

    def generate(self, examples: list[Example], settings: GenerationConfig, seed: int, label: str,
                 progress: bool | None = None) -> list[str]:
        return generate_responses(self._model, self.tokenizer, examples, settings, seed=seed, label=label,
                                  progress=progress)
