"""A served teacher that ships its last hidden states; its LM head is applied here (`kind: hidden_server`).

    dualkd serve-teacher teacher.gguf --port 8080                                  # teachers/hidden_server.py
    teacher: {kind: hidden_server, path: teacher-hf/, server: {url: "http://127.0.0.1:8080"}}

The server returns h [T, d], the input of the teacher's LM head, at every position of the given token ids; the
head W [V, d] (and bias) is loaded here once from `path` (the same weights: the Hugging Face folder the GGUF was
made from, or the GGUF itself with `gguf_file`), so the teacher's logits are h W^T + b over the full vocabulary,
computed by the fused losses chunk by chunk. It provides what a live teacher's hidden states and head provide
(`hidden`, `response_hidden`, `head`, and `topk` of any k from them), so DSKD, DSKDv2, ULD, MinED, GOLD and
fused KD train against it; it writes SeqKD responses like any served teacher. Input embeddings, whole-response
log-probabilities and encoder passes stay with a live teacher.

Before training, a probe checks that head and server belong together: on a fixed text, the server's own top-k
log-probabilities (/v1/completions) and those of its hidden states times the local head must agree within
`HEAD_TOLERANCE` nats on average (quantization moves them: SmolLM2's Q4_1 GGUF against its float32 head,
0.03 mean, 0.16 at most); another model's head, or hidden states one position off, differ by nats.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from dualkd.data.collate import ModelBatch
from dualkd.errors import ModelError
from dualkd.lm import check_head_is_linear, head_of
from dualkd.losses.sparse import TopKTargets, topk_rows
from dualkd.models import load_model
from dualkd.teachers.served import ServedTeacher, TeacherServer, decoder_only_client, unpadded_sequences
from dualkd.teachers.server_client import ServerClient, ServerMismatch
from dualkd.teachers.spec import TeacherSite, TeacherSpec

HEAD_TOLERANCE = 0.5
"""Nats: the largest mean difference between the server's top-k log-probabilities and the local head's on them."""
PROBE = "Knowledge distillation trains a small student on what a large teacher predicts, token by token."


def local_head(spec: Any, tokenizer: Any, field: str) -> tuple[Tensor, Tensor | None]:
    """The teacher's LM head [V, d] (and bias) from the weights `spec` names, the rest of the model let go."""
    model = load_model(spec, tokenizer, role="teacher", field=field)
    check_head_is_linear(model, field)  # logits = h W^T + b, as the losses compute them from served h
    weight, bias = head_of(model)
    return weight.detach().clone(), bias.detach().clone() if bias is not None else None


def check_head_matches(client: ServerClient, head: tuple[Tensor, Tensor | None], field: str) -> float:
    """Refuse a head that is not the served model's (or hidden states off by a position); returns the mean
    difference in nats on the probe."""
    ids = client.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    scored = client.score(ids, 4)
    hidden = torch.from_numpy(client.hidden(ids))  # [T, d]
    weight, bias = head
    if hidden.shape[1] != weight.shape[1]:
        raise ServerMismatch(f"{field}: the server's hidden states have {hidden.shape[1]} features but the LM head of "
                             f"{field}.path has {weight.shape[1]}: they are not the same model")
    logits = hidden.to(weight.dtype) @ weight.t() + (bias if bias is not None else 0)
    local = torch.log_softmax(logits.float(), -1).numpy()  # [T, V]
    valid = scored.valid
    ours = np.take_along_axis(local[valid], scored.ids[valid], 1)
    gap = float(np.abs(ours - scored.logprobs[valid]).mean())
    if not gap <= HEAD_TOLERANCE:
        raise ServerMismatch(f"{field}: the LM head loaded from {field}.path and the server's hidden states disagree "
                             f"with the server's own log-probabilities by {gap:.2f} nats on average (tolerance "
                             f"{HEAD_TOLERANCE}): the head is another model's, or the server shifts positions")
    return gap


class ServedHiddenTeacherConfig(TeacherSpec):
    """A teacher behind `dualkd serve-teacher`: its hidden states from the server, its LM head loaded here from
    `path` (the model fields: the same weights the server runs). `server.top_k` and `margin` are not used (any
    k comes from the full distribution); the other `server` settings are the served teacher's."""

    kind: Literal["hidden_server"] = "hidden_server"
    server: TeacherServer

    def provides(self) -> tuple[str, frozenset[str]]:
        return ServedHiddenTeacher.what, ServedHiddenTeacher.provides

    def open(self, tokenizer: Any, site: TeacherSite) -> ServedHiddenTeacher:
        client = decoder_only_client(self.server, tokenizer, site)
        head = local_head(self, tokenizer, site.field)
        check_head_matches(client, head, site.field)
        return ServedHiddenTeacher(client, tokenizer, head, self.server.concurrency)


class ServedHiddenTeacher(ServedTeacher):
    provides: ClassVar[frozenset[str]] = frozenset({"hidden", "response_hidden", "head", "topk", "generate"})
    what: ClassVar[str] = "a teacher that serves its hidden states"

    def __init__(self, client: ServerClient, tokenizer: Any, head: tuple[Tensor, Tensor | None],
                 concurrency: int = 4):
        super().__init__(client, tokenizer, top_k=0, concurrency=concurrency)
        self._head = head
        self._device = torch.device("cpu")

    @property
    def k(self) -> None:
        return None  # any k: top-k come from the full distribution

    @property
    def vocab_rows(self) -> int:
        return int(self._head[0].shape[0])

    def describe(self, count_parameters: Any) -> str:
        return f"teacher served at {self.client.url} (hidden states; its LM head here, {self.vocab_rows} rows)"

    def attach(self, device: torch.device, place: Any = None, autocast: Any = None, timer: Any = None,
               gather_head: Any = None) -> None:
        self._device = torch.device(device)
        weight, bias = self._head
        self._head = (weight.to(self._device), bias.to(self._device) if bias is not None else None)

    def _submit(self, sequences: list[tuple[int, ...]]) -> None:
        for sequence in sequences:
            if sequence not in self._pending:
                self._pending[sequence] = self._pool.submit(self.client.hidden, list(sequence))

    def hidden(self, tokens: ModelBatch) -> Tensor:
        sequences = unpadded_sequences(tokens)
        self._submit(sequences)  # those not asked for ahead
        rows = [self._pending[s].result() for s in sequences]  # re-raises a request's error
        for sequence in sequences:
            self._pending.pop(sequence, None)
        weight = self._head[0]
        if rows and rows[0].shape[1] != weight.shape[1]:
            raise ModelError(f"the teacher server sent hidden states of {rows[0].shape[1]} features for a head of "
                             f"{weight.shape[1]}")
        out = torch.zeros(*tokens.input_ids.shape, weight.shape[1], dtype=weight.dtype)  # [B, T, d], 0 at padding
        for b, row in enumerate(rows):
            out[b, : row.shape[0]] = torch.from_numpy(row)
        return out.to(tokens.input_ids.device)

    def response_hidden(self, tokens: ModelBatch, indices: list[int]) -> Tensor:
        return self.hidden(tokens)[tokens.loss_mask]  # [N, d]

    def head(self) -> tuple[Tensor, Tensor | None]:
        return self._head

    def topk(self, tokens: ModelBatch, indices: list[int], k: int, vocab_size: int,
             chunk_size: int | None = None) -> TopKTargets:
        weight, bias = self._head
        return topk_rows(self.response_hidden(tokens, indices), weight[:vocab_size],
                         bias[:vocab_size] if bias is not None else None, k, chunk_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
