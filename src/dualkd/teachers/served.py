"""A teacher behind an inference server that scores given tokens (teachers/server_client.py has the protocol).

    teacher: {kind: server, path: HuggingFaceTB/SmolLM2-135M-Instruct,   # its tokenizer only: no model loads
              server: {url: "http://127.0.0.1:8080", top_k: 64}}

It returns the teacher's top-k log-probabilities at the response positions (`topk`) and nothing else, so it
serves `kd` with the sparse top-k loss (the cache's), on-policy KD (the server scores the student's samples)
and SeqKD (the server writes the responses: train/seqkd.py). DSKD, DSKDv2 and every objective that reads hidden
states, the head or full logits are refused before training, as with a cache; a server that ships hidden
states serves them (`kind: hidden_server`, teachers/served_hidden.py).

Requests work ahead of the loop: before each step the loop hands over the step's micro-batches and the next
step's (`prefetch`), and a pool of `concurrency` threads sends them while the student computes; `topk` waits for
its own sequences only (each bounded by the client's timeout and retries). Sequences are keyed by their token
ids, so a resumed run, a second epoch or a dev pass asks the server nothing twice (memory, then the disk cache).
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from dualkd.data.collate import ModelBatch
from dualkd.data.formats import Example
from dualkd.errors import ConfigError, ModelError
from dualkd.generate import GenerationConfig, prompt_ids
from dualkd.losses.sparse import TopKTargets, log_tail_mass
from dualkd.progress import ProgressLines
from dualkd.schema import HomePath, ServerURL, StrictModel
from dualkd.teachers.base import Teacher
from dualkd.teachers.server_client import Scored, ServerClient
from dualkd.teachers.spec import TeacherSite, TeacherSpec


class TeacherServer(StrictModel):
    """An inference server that scores given tokens: llama.cpp's Python server, e.g.
    `python -m llama_cpp.server --model teacher.gguf --port 8080`."""

    url: ServerURL
    """The server's address, e.g. http://127.0.0.1:8080 (OpenAI-compatible: /v1/completions, /extras/tokenize)."""
    top_k: int = Field(64, ge=1)
    """Top-k log-probabilities per position: `kd` trains with the sparse top-k loss at this k."""
    margin: int = Field(4, ge=0)
    """Extra entries asked for, so that entries the server names ambiguously (by a string several tokens print
    as) can be passed over while k placeable ones remain."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request may take in all (however slowly its answer arrives) before it is retried."""
    retries: int = Field(3, ge=0)
    """Retries of a failed request (backoff_s, 2 backoff_s, ... apart), then the run stops with a checkpoint."""
    backoff_s: float = Field(1.0, ge=0)
    concurrency: int = Field(4, ge=1)
    """Requests in flight at once, working ahead of the training loop."""
    max_answer_mib: float = Field(64.0, gt=0)
    """The largest answer read (a top-k answer takes ~30 bytes per entry: 2,048 positions at k 64 ~ 4 MiB); a
    larger one stops the run instead of filling the memory."""
    cache_dir: HomePath | None = None
    """Where scored sequences are kept on disk (by server model, sequence and k); default
    `<output_dir>/teacher-server-cache`."""


class ServedTeacherConfig(TeacherSpec):
    """A teacher behind an inference server: no teacher model is loaded; `path` or `tokenizer` gives its
    tokenizer, which must be the server's. It gives top-k log-probabilities of given tokens and writes
    responses: `kd` (sparse top-k), on-policy KD and SeqKD use it; objectives that read more are refused."""

    kind: Literal["server"] = "server"
    server: TeacherServer

    def _loads_a_model(self) -> bool:
        return False

    @model_validator(mode="after")
    def _needs_tokenizer(self) -> ServedTeacherConfig:
        if self.tokenizer_source is None:
            raise ValueError("a served teacher needs its tokenizer: set `path` or `tokenizer`")
        return self

    def provides(self) -> tuple[str, frozenset[str]]:
        return ServedTeacher.what, ServedTeacher.provides

    def open(self, tokenizer: Any, site: TeacherSite) -> ServedTeacher:
        client = decoder_only_client(self.server, tokenizer, site)
        return ServedTeacher(client, tokenizer, self.server.top_k, self.server.concurrency)


def unpadded_sequences(tokens: ModelBatch) -> list[tuple[int, ...]]:
    """Each row's tokens without padding (batches are right-padded)."""
    lengths = tokens.attention_mask.sum(-1).tolist()
    return [tuple(row[:n]) for row, n in zip(tokens.input_ids.tolist(), lengths)]


def decoder_only_client(server: TeacherServer, tokenizer: Any, site: TeacherSite) -> ServerClient:
    """The client of a served teacher's section, refused for an encoder-decoder student (servers here run
    decoder-only models)."""
    if site.seq2seq:
        raise ConfigError(f"{site.field}.server serves decoder-only teachers; an encoder-decoder student needs "
                          "a live teacher or a cache")
    return server_client(server, tokenizer, site.run_dir)


def server_client(server: TeacherServer, tokenizer: Any, run_dir: Path) -> ServerClient:
    """The client of `teacher.server`, its tokenizer checked against the server's."""
    cache = Path(server.cache_dir) if server.cache_dir else run_dir / "teacher-server-cache"
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"teacher.server.cache_dir: {cache} is a file, not a folder")
    client = ServerClient(server.url, tokenizer, timeout_s=server.timeout_s, retries=server.retries,
                          backoff_s=server.backoff_s, margin=server.margin, cache_dir=cache,
                          max_answer_mib=server.max_answer_mib)
    client.check_tokenizer()
    return client


class ServedTeacher(Teacher):
    provides: ClassVar[frozenset[str]] = frozenset({"topk", "generate"})
    what: ClassVar[str] = "a teacher behind an inference server"
    works_ahead: ClassVar[bool] = True

    def __init__(self, client: ServerClient, tokenizer: Any, top_k: int, concurrency: int = 4):
        super().__init__(tokenizer)
        self.client, self.top_k, self.concurrency = client, top_k, concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-server")
        self._pending: dict[tuple[int, ...], Future[Scored]] = {}
        self.displaced = self.positions = 0
        """Response positions scored so far, and those whose top-k held a token the server names ambiguously
        (its mass stays in the tail bucket: server_client.py)."""

    @property
    def identity(self) -> str:
        return f"served:{self.client.fingerprint}"

    @property
    def k(self) -> int:
        return self.top_k

    @property
    def vocab_rows(self) -> int:
        return len(self.tokenizer)

    def describe(self, count_parameters: Any) -> str:
        return f"teacher served at {self.client.url} (top-{self.top_k})"

    def generate(self, examples: list[Example], settings: GenerationConfig, seed: int, label: str,
                 progress: bool | None = None) -> list[str]:
        return served_responses(self.client, examples, settings, seed, self.concurrency, label=label)

    def interrupt(self) -> None:
        """A signal arrived: every request in flight and every wait for one ends now (`ServerInterrupted`)."""
        self.client.interrupt()

    def prefetch(self, batches: list[ModelBatch]) -> None:
        self._submit([s for tokens in batches for s in unpadded_sequences(tokens)])

    def _submit(self, sequences: list[tuple[int, ...]]) -> None:
        for sequence in sequences:
            if sequence not in self._pending:
                self._pending[sequence] = self._pool.submit(self.client.score, list(sequence), self.top_k)

    def topk(self, tokens: ModelBatch, indices: list[int], k: int, vocab_size: int,
             chunk_size: int | None = None) -> TopKTargets:
        if k != self.top_k:
            raise ModelError(f"top-{k} targets asked of a served teacher set to its top {self.top_k} "
                             "(teacher.server.top_k)")
        sequences = unpadded_sequences(tokens)
        self._submit(sequences)  # those not asked for ahead
        waiting = [self._pending[s] for s in sequences]
        ids, logprobs = [], []
        for b, future in enumerate(waiting):
            scored = future.result()  # re-raises the request's error, if it failed
            positions = tokens.loss_mask[b].nonzero().flatten().cpu().numpy()
            self.displaced += int(scored.displaced[positions].sum())
            self.positions += len(positions)
            if not scored.valid[positions].all():
                raise ModelError(f"the teacher server gives no distribution at position {positions[0]} of a "
                                 "sequence (the first token): a response position must follow some prompt")
            ids.append(scored.ids[positions])
            logprobs.append(scored.logprobs[positions])
        for sequence in sequences:
            self._pending.pop(sequence, None)
        top_ids = torch.from_numpy(np.concatenate(ids)).to(tokens.input_ids.device)  # [N, k]
        if top_ids.numel() and int(top_ids.max()) >= vocab_size:
            raise ModelError(f"the teacher server returned token id {int(top_ids.max())}, outside the student's "
                             f"{vocab_size} rows")
        values = torch.from_numpy(np.concatenate(logprobs)).to(tokens.input_ids.device)  # [N, k] fp32
        return TopKTargets(ids=top_ids, logprobs=values, tail=log_tail_mass(values))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.positions:
            print(f"[dualkd] served teacher: {self.displaced} of {self.positions} response positions "
                  f"({self.displaced / self.positions:.1%}) had a top-{self.top_k} token the server names only by "
                  "a string other tokens share; its mass stayed in the tail bucket", file=sys.stderr)


def served_responses(client: ServerClient, examples: list[Example], settings: GenerationConfig, seed: int,
                     concurrency: int, label: str = "generating") -> list[str]:
    """One response per example, written by the server (SeqKD), prompts tokenized as in training; greedy unless
    `settings.do_sample`. Each example's sampling seed is `seed + its index`, so the set does not depend on the
    request order."""
    if settings.num_beams > 1:
        raise ConfigError("a served teacher cannot search beams: set generation.num_beams: 1 or use a live teacher")
    prompts = prompt_ids(examples, client.tokenizer, settings)
    new = settings.max_new_tokens or settings.max_length - settings.max_prompt_length
    sampling = ({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
                if settings.do_sample else {"temperature": 0.0})
    lines = ProgressLines(len(prompts), label, None)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-server")
    try:
        futures = [pool.submit(client.complete, ids, new, seed=seed + i, **sampling) for i, ids in enumerate(prompts)]
        texts = []
        for future in futures:
            texts.append(future.result().strip())
            lines.advance(1)
    except BaseException:  # Ctrl-C or an error: end the requests in flight now, not after their deadlines
        client.interrupt()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return texts
