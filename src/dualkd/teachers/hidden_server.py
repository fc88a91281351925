"""`dualkd serve-teacher`: llama.cpp's Python server plus one route, the teacher's last hidden states of given tokens.

    dualkd serve-teacher teacher.gguf --port 8080                     # needs `pip install dualkd[serve]`
    teacher: {kind: server, path: teacher-hf/, server: {url: "http://127.0.0.1:8080", hidden: true}}

Every route of `python -m llama_cpp.server` is there (completions, /extras/tokenize: top-k scoring and SeqKD
work as against that server), and one more:

    POST /dualkd/hidden  {"tokens": [ids]}
        -> {"rows": T, "n_embd": d, "hidden": base64 of the [T, d] little-endian float32 array}

The hidden states are the input of the teacher's LM head (llama.cpp's embeddings with no pooling: after the final
norm), so the student's side multiplies them by the head, loaded there from the same weights
(teachers/served.py): the full vocabulary at d floats per token instead of a capped top-k, and every objective
that reads hidden states or the head (DSKD, DSKDv2, ULD, MinED, GOLD, fused KD) runs against a remote teacher.

Why a route of our own: llama-cpp-python's /v1/embeddings takes text and tokenizes it with special tokens off
(a chat template's `<|im_start|>` comes back as several plain-text tokens: docs/served-teacher.md), so it
cannot return the hidden states of a chat sequence; llama.cpp's C++ `llama-server` takes
token ids at /embeddings (`--pooling none`) but pip does not install it, so dualkd does not speak to it yet.
Token ids in also means no text round trip: what the server runs is exactly the student's teacher view.

The route runs a second llama.cpp context on the same GGUF (its weights are memory-mapped once, shared), in
embedding mode with no pooling; requests take turns on it.
"""

from __future__ import annotations

import argparse
import base64
import threading
from typing import Any

import numpy as np
from pydantic import BaseModel

ROUTE = "/dualkd/hidden"


class HiddenRequest(BaseModel):
    tokens: list[int]


class HiddenStates:
    """The last hidden states [T, d] of token sequences, from a GGUF model on this machine (llama.cpp)."""

    def __init__(self, model_path: str, n_ctx: int, n_threads: int | None = None):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                                   n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads, verbose=False)
        self.n_ctx, self.n_embd = n_ctx, self.llm.n_embd()
        self.n_vocab = self.llm.n_vocab()
        self._lock = threading.Lock()

    def __call__(self, ids: list[int]) -> np.ndarray:
        if not ids:
            raise ValueError("an empty sequence has no hidden states")
        if len(ids) > self.n_ctx:
            raise ValueError(f"the sequence of {len(ids)} tokens exceeds the server's context n_ctx {self.n_ctx}")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {self.n_vocab}")
        lc = self._llama_cpp
        with self._lock:
            lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
            batch = lc.llama_batch_init(len(ids), 0, 1)
            try:
                for t, token in enumerate(ids):  # one sequence (id 0); every position is an output
                    batch.token[t], batch.pos[t], batch.n_seq_id[t] = token, t, 1
                    batch.seq_id[t][0], batch.logits[t] = 0, 1
                batch.n_tokens = len(ids)
                code = lc.llama_decode(self.llm.ctx, batch)
                if code != 0:
                    raise RuntimeError(f"llama_decode failed with code {code}")
                pointer = lc.llama_get_embeddings(self.llm.ctx)
                return np.ctypeslib.as_array(pointer, shape=(len(ids) * self.n_embd,)).reshape(
                    len(ids), self.n_embd).astype(np.float32, copy=True)  # [T, d], copied before the next call
            finally:
                lc.llama_batch_free(batch)


def encode_hidden(hidden: np.ndarray) -> dict[str, Any]:
    """The route's answer for one sequence's hidden states [T, d]."""
    data = np.ascontiguousarray(hidden, dtype="<f4")
    return {"rows": int(data.shape[0]), "n_embd": int(data.shape[1]), "hidden": base64.b64encode(data).decode()}


def decode_hidden(answer: dict[str, Any]) -> np.ndarray:
    """The [T, d] float32 array of an answer (ValueError/KeyError/TypeError on a malformed one)."""
    rows, width = int(answer["rows"]), int(answer["n_embd"])
    data = np.frombuffer(base64.b64decode(answer["hidden"], validate=True), dtype="<f4")
    if data.size != rows * width:
        raise ValueError(f"{data.size} floats for {rows} x {width}")
    return data.reshape(rows, width).astype(np.float32)


def build_app(model_path: str, n_ctx: int, n_threads: int | None, host: str, port: int) -> Any:
    """llama-cpp-python's FastAPI app for `model_path`, with the hidden-state route added."""
    from fastapi import HTTPException
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = {"n_threads": n_threads, "n_threads_batch": n_threads} if n_threads else {}
    app = create_app(server_settings=ServerSettings(host=host, port=port),
                     model_settings=[ModelSettings(model=model_path, n_ctx=n_ctx, verbose=False, **threads)])
    states = HiddenStates(model_path, n_ctx, n_threads)

    @app.post(ROUTE)
    def hidden(request: HiddenRequest) -> dict[str, Any]:  # a plain def: FastAPI runs it in a worker thread
        try:
            return encode_hidden(states(request.tokens))
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    return app


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args.model, args.n_ctx, args.threads, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

