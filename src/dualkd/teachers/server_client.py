"""Scoring a token sequence on an OpenAI-compatible completions server: the teacher's top-k log-probabilities
at every position of a given sequence (prompt-logprob scoring), as llama.cpp's Python server returns them.

The wire protocol (llama-cpp-python's server, `python -m llama_cpp.server --model M.gguf`):

    POST /extras/tokenize   {"input": text}                       -> {"tokens": [ids]}    (its BOS first if it adds one)
    POST /v1/completions    {"prompt": text, "echo": true, "logprobs": k, "max_tokens": 1, "temperature": 0}
        -> choices[0].logprobs.top_logprobs: one {token string: logprob} per prompt token (None for the first)

Three quirks of that server shape the client:
- the prompt is text, not token ids: the sequence is decoded, and the server's tokenization of the text
  (`/extras/tokenize`) must give back exactly our ids, else the sequence is refused (`ServerMismatch`);
- entry i of `top_logprobs` is the distribution after the server's prompt tokens 0..i, its BOS included when it
  adds one: the distribution that predicts x[t + 1] (our position t) is entry t + bos, with bos = 1 or 0;
- the top-k come keyed by token *string* (`detokenize([id])` decoded with errors ignored): ids are recovered
  from the strings of our tokenizer (`StringIds`), and a string several tokens print cannot be placed: " " is
  the space token and also "space + a lone UTF-8 byte", "" every special token (EOS included) and lone byte,
  and the server keeps one value per string, which may be either token's. The client asks for k + `margin`
  entries and keeps the k most likely it can place; where an unplaceable entry ranks inside the top k, its
  mass stays in the tail bucket (a coarser target, not a wrong one) and the position is marked
  (`Scored.displaced`). Fewer than k placeable entries refuses the position. SmolLM2 (byte-level BPE) at k = 8
  on 6 Dolly examples: 13-32% of positions displaced, nearly all by " ".

`complete` writes a response to a prompt (SeqKD's teacher outputs): greedy at temperature 0, else sampled with
the given temperature / top-p / top-k and seed; the server's own defaults that HF `generate` lacks (repeat
penalty, min-p) are switched off. It cannot block repeated n-grams (`no_repeat_ngram_size`) or search beams.

Every request is bounded: a total deadline (`timeout_s`, however slowly the answer trickles in), a size bound
on the answer, no redirects; a failed one is retried with exponential backoff, and `ServerUnavailable` says
which server, what failed and how often. An answer that says the sequence exceeds the server's context is not
retried. Every answer is checked before a loss reads it (teachers/checks.py). Results are cached on disk by
(the served model's fingerprint, sequence, k): the fingerprint hashes the model id and the model's own
top-k on a fixed probe text, so a GGUF replaced under the same name never mixes old and new answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualkd.atomic import atomic_open
from dualkd.errors import ConfigError, ModelError
from dualkd.schema import server_root
from dualkd.teachers.checks import TeacherOutputError, check_finite, check_topk
from dualkd.teachers.hidden_server import ROUTE as HIDDEN_ROUTE
from dualkd.teachers.hidden_server import decode_hidden


class ServerUnavailable(ModelError):
    """The teacher server did not answer (refused, timed out, or failed) after every retry."""


class ServerMismatch(ModelError):
    """The server's answer does not fit the teacher's tokenizer or the request (another model, too few entries)."""


class ServerInterrupted(ModelError):
    """A wait for the server was cut short by SIGTERM/SIGINT (the run then stops with a checkpoint)."""


_CONTEXT_WORDS = ("context window", "context length", "n_ctx", "exceed")


def _parse_error(what: str, url: str, e: Exception) -> ServerMismatch:
    return ServerMismatch(f"the teacher server {url} answered {what} in a form dualkd does not understand "
                          f"({type(e).__name__}: {e}); is it llama.cpp's Python server (llama_cpp.server)?")


@dataclass
class Scored:
    """A sequence x [T] scored by the server: at each position t, the top-k ids [T, k] and log-probabilities
    [T, k] of the distribution that predicts x[t + 1]; `valid` [T] is False where the server gives none (the
    first entry, and t = T - 1 when it adds no BOS)."""

    ids: np.ndarray
    logprobs: np.ndarray
    valid: np.ndarray
    displaced: np.ndarray
    """[T] bool: a top-k entry could not be placed there (its mass stays in the tail bucket)."""


def server_strings(tokenizer: Any) -> list[tuple[str, bool]]:
    """How the server prints each of our token ids inside a sequence, and whether that print is the whole token:
    the piece a token adds after a plain anchor token (so SentencePiece's leading space is kept), U+FFFD (a lone
    UTF-8 byte) dropped as the server's `errors="ignore"` drops it, special tokens empty (the server
    detokenizes without them)."""
    anchor = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[:1]
    base = tokenizer.decode(anchor)
    pieces = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    out = []
    for i, piece in enumerate(pieces):
        piece = piece[len(base):] if piece.startswith(base) else piece
        out.append(("", False) if i in special else (piece.replace("\ufffd", ""), "\ufffd" not in piece))
    return out


class StringIds:
    """Our id for each string the server prints; a string several tokens print (or "") names none. No guess is
    made for those: " " is the space token and also "space + a lone UTF-8 byte" (a curly quote's first byte),
    "" every special token and lone byte, and the server's one value for the string may be either's."""

    def __init__(self, tokenizer: Any):
        owners: dict[str, list[int]] = {}
        for i, (text, _) in enumerate(server_strings(tokenizer)):
            owners.setdefault(text, []).append(i)
        self.ids = {text: ids[0] for text, ids in owners.items() if len(ids) == 1 and text != ""}

    def get(self, text: str) -> int | None:
        return self.ids.get(text)


class ServerClient:
    """Requests to one server, each bounded (deadline, size, no redirects), retried, cached on disk (see the
    module docstring). `stop`: an Event that, once set (SIGTERM/SIGINT), ends every wait at once."""

    def __init__(self, url: str, tokenizer: Any, *, timeout_s: float, retries: int, backoff_s: float,
                 margin: int, cache_dir: Path | None, max_answer_mib: float = 64.0,
                 stop: threading.Event | None = None):
        try:
            self.url = server_root(url)
        except ValueError as e:
            raise ConfigError(f"teacher.server.url: {e}") from None
        self.tokenizer = tokenizer
        self.timeout_s, self.retries, self.backoff_s, self.margin = timeout_s, retries, backoff_s, margin
        self.max_answer_bytes = int(max_answer_mib * 2**20)
        self.cache_dir = cache_dir
        self.stop = stop or threading.Event()
        self._open: set[http.client.HTTPConnection] = set()  # connections in flight (several with prefetching)
        self._open_lock = threading.RLock()  # re-entrant: `interrupt` may run in a signal handler of a holder
        self._strings: StringIds | None = None
        self._model: str | None = None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ transport
    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request, retried `retries` times with backoff_s, 2 backoff_s, ... between tries."""
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt and self.stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                raise ServerInterrupted(f"stopped while waiting to retry {self.url}{path}")
            try:
                status, answer = self._exchange(path, data)
            except _Transient as e:
                last = str(e)
                continue
            text = answer.decode(errors="replace")
            if status >= 400 and any(w in text.lower() for w in _CONTEXT_WORDS):
                raise ServerMismatch(f"teacher server {self.url}{path}: the sequence is longer than the server's "
                                     f"context ({text[:200]}); start the server with a larger context (llama.cpp: "
                                     "--n_ctx) or lower data.max_length")
            if 300 <= status < 400:
                raise ServerMismatch(f"teacher server {self.url}{path} answered {status} (a redirect); dualkd "
                                     "follows none: set teacher.server.url to the address that answers")
            if status == 404 and path == HIDDEN_ROUTE:
                raise ServerMismatch(f"teacher server {self.url} has no {path} (404): the teacher's hidden states "
                                     "(teacher.server.hidden) come from `dualkd serve-teacher MODEL.gguf`, "
                                     "llama.cpp's Python server with that route added")
            if status == 404 and path.startswith("/extras"):
                raise ServerMismatch(f"teacher server {self.url} has no {path} (404): dualkd needs llama.cpp's "
                                     "Python server (`python -m llama_cpp.server`), which tokenizes there; other "
                                     "OpenAI-compatible servers (vLLM, llama.cpp's C++ llama-server) do not")
            if 400 <= status < 500:  # the server understood and said no: retrying will not help
                raise ServerMismatch(f"teacher server {self.url}{path} answered {status}: {text[:300]}")
            if status >= 500:
                last = f"HTTP {status}: {text[:300]}"
                continue
            try:
                return json.loads(answer)
            except ValueError as e:
                raise _parse_error(path, self.url, e) from None
        raise ServerUnavailable(f"teacher server {self.url} did not answer {path} after {self.retries + 1} tries "
                                f"(deadline {self.timeout_s:g} s each; last: {last})")

    def _exchange(self, path: str, data: bytes | None) -> tuple[int, bytes]:
        """(status, body) of one HTTP exchange, within `timeout_s` in all and `max_answer_bytes`; _Transient
        for what a retry may cure (refused, reset, past the deadline)."""
        parsed = urllib.parse.urlsplit(self.url)
        deadline = time.monotonic() + self.timeout_s
        cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        conn = cls(parsed.hostname, parsed.port, timeout=min(self.timeout_s, 10.0))  # the connect itself
        with self._open_lock:
            self._open.add(conn)
        try:
            if self.stop.is_set():
                raise ServerInterrupted(f"stopped before asking {self.url}{path}")
            conn.request("POST" if data is not None else "GET", parsed.path + path, body=data,
                         headers={"Content-Type": "application/json"})
            response = self._until(deadline, conn, conn.getresponse, path)
            declared = int(response.getheader("Content-Length") or 0)
            if declared > self.max_answer_bytes:
                raise self._too_large(path, declared)
            chunks, size = [], 0
            while True:
                chunk = self._until(deadline, conn, lambda: response.read1(1 << 16), path)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_answer_bytes:
                    raise self._too_large(path, size)
                chunks.append(chunk)
            return response.status, b"".join(chunks)
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            if self.stop.is_set():  # `interrupt` shut the socket down under the read
                raise ServerInterrupted(f"stopped while waiting for {self.url}{path}") from None
            raise _Transient(f"{type(e).__name__}: {e}") from None
        finally:
            with self._open_lock:
                self._open.discard(conn)
            conn.close()

    def _until(self, deadline: float, conn: http.client.HTTPConnection, read: Any, path: str) -> Any:
        """`read()` with the socket's timeout set to what is left of the deadline (checked between chunks too, so
        a trickle does not extend it). A stop does not wait for the timeout: `interrupt` shuts the socket down,
        which ends a blocked read at once. (Short socket timeouts polled in a loop would not do: after one
        timeout, Python's socket file refuses every further read.)"""
        if self.stop.is_set():
            raise ServerInterrupted(f"stopped while waiting for {self.url}{path}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Transient(f"no complete answer within {self.timeout_s:g} s")
        if conn.sock is not None:
            conn.sock.settimeout(left)
        try:
            result = read()
        except TimeoutError:
            raise _Transient(f"no complete answer within {self.timeout_s:g} s") from None
        if self.stop.is_set():  # the read may have ended because the socket was shut down
            raise ServerInterrupted(f"stopped while waiting for {self.url}{path}")
        return result

    def interrupt(self) -> None:
        """End every request in flight and every wait for one now (`ServerInterrupted`): safe from a signal
        handler and from another thread."""
        self.stop.set()
        with self._open_lock:
            open_now = list(self._open)
        for conn in open_now:
            if conn.sock is not None:
                with contextlib.suppress(OSError):  # already closed
                    conn.sock.shutdown(socket.SHUT_RDWR)

    def _too_large(self, path: str, size: int) -> ServerMismatch:
        return ServerMismatch(f"teacher server {self.url}{path}: the answer exceeds {self.max_answer_bytes / 2**20:g} "
                              f"MiB ({size / 2**20:.1f} MiB so far); raise teacher.server.max_answer_mib if the "
                              "sequences are that long")

    @property
    def model(self) -> str:
        """The served model's id (`/v1/models`)."""
        if self._model is None:
            answer = self._request("/v1/models")
            try:
                listed = answer.get("data") or [{}]
                self._model = str(listed[0].get("id", "unknown"))
            except (AttributeError, IndexError, TypeError) as e:
                raise _parse_error("/v1/models", self.url, e) from None
        return self._model

    @property
    def fingerprint(self) -> str:
        """The served model's identity by content: its id and its top-8 on a fixed probe, hashed (16 hex digits).
        Log-probabilities are rounded to 2 decimals, so that thread counts do not change it and another model
        does."""
        if self._fingerprint is None:
            probe = self.tokenizer("The teacher's knowledge, in a few words:", add_special_tokens=False)["input_ids"]
            scored = self._score(probe, 4)
            digest = hashlib.sha256(self.model.encode())
            digest.update(scored.ids[scored.valid].astype(np.int64).tobytes())
            digest.update(np.round(scored.logprobs[scored.valid].astype(np.float64), 2).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def check_tokenizer(self, probe: str = "Distillation, in 3 words: the teacher's knowledge -> a student.") -> None:
        """Refuse a server whose tokenizer differs from ours, before training."""
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        self._bos(ours, self.tokenizer.decode(ours))

    def _bos(self, ids: list[int], text: str) -> int:
        """1 when the server puts a BOS before the text, 0 when not; refuses a tokenization other than `ids`."""
        answer = self._request("/extras/tokenize", {"input": text})
        try:
            theirs = [int(t) for t in answer["tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise _parse_error("/extras/tokenize", self.url, e) from None
        for bos in (0, 1):
            if theirs[bos:] == ids:
                return bos
        text_ids = theirs[1:] if len(theirs) == len(ids) + 1 else theirs  # without a BOS the server may add
        first = next((i for i, (a, b) in enumerate(zip(text_ids, ids)) if a != b), min(len(text_ids), len(ids)))
        raise ServerMismatch(
            f"the teacher server {self.url} ({self.model}) tokenizes the sequence differently from the teacher "
            f"tokenizer ({len(theirs)} vs {len(ids)} tokens; first difference near token {first}: server "
            f"{text_ids[max(0, first - 2):first + 3]}, ours {ids[max(0, first - 2):first + 3]}): it serves another "
            f"model or tokenizer, or the text does not round-trip through this tokenizer")

    # ------------------------------------------------------------------ generation
    def complete(self, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None) -> str:
        """The server's continuation of the prompt `ids` (temperature 0: greedy), as text."""
        text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        self._bos(ids, text)
        body: dict[str, Any] = {"prompt": text, "max_tokens": max_new_tokens, "temperature": temperature,
                                "top_p": top_p, "top_k": top_k, "min_p": 0.0, "repeat_penalty": 1.0}
        if seed is not None:
            body["seed"] = seed
        answer = self._request("/v1/completions", body)
        try:
            return str(answer["choices"][0]["text"])
        except (KeyError, IndexError, TypeError) as e:
            raise _parse_error("/v1/completions", self.url, e) from None

    # ------------------------------------------------------------------ scoring
    def score(self, ids: list[int], k: int) -> Scored:
        """The top-k at every position of `ids` (cached on disk by server model, sequence and k)."""
        path = self._cache_path(ids, k)
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    scored = Scored(f["ids"], f["logprobs"], f["valid"], f["displaced"])
                self._check(scored, k, f"{path} (the request cache of {self.url})")
                return scored
            except (ValueError, OSError, KeyError, EOFError, TeacherOutputError):
                pass  # a damaged cache entry is asked again (and rewritten)
        scored = self._score(ids, k)
        self._check(scored, k, f"teacher server {self.url}, sequence of {len(ids)} tokens starting {ids[:8]}")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.savez(f, ids=scored.ids, logprobs=scored.logprobs, valid=scored.valid, displaced=scored.displaced)
        return scored

    def _cache_path(self, ids: list[int], k: int | str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.fingerprint, k, ids]).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npz"

    def hidden(self, ids: list[int]) -> np.ndarray:
        """The teacher's last hidden states [T, d] float32 at every position of `ids` (`dualkd serve-teacher`'s
        route: the ids go as they are, no text round trip), cached on disk like the top-k."""
        path = self._cache_path(ids, "hidden")
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    hidden = f["hidden"]
                self._check_hidden(hidden, ids, f"{path} (the request cache of {self.url})")
                return hidden
            except (ValueError, OSError, KeyError, EOFError, TeacherOutputError, ServerMismatch):
                pass  # a damaged cache entry is asked again (and rewritten)
        answer = self._request(HIDDEN_ROUTE, {"tokens": [int(i) for i in ids]})
        try:
            hidden = decode_hidden(answer)
        except (KeyError, TypeError, ValueError) as e:
            raise _parse_error(HIDDEN_ROUTE, self.url, e) from None
        self._check_hidden(hidden, ids, f"teacher server {self.url}, sequence of {len(ids)} tokens starting {ids[:8]}")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.savez(f, hidden=hidden)
        return hidden

    @staticmethod
    def _check_hidden(hidden: np.ndarray, ids: list[int], where: str) -> None:
        if hidden.ndim != 2 or hidden.shape[0] != len(ids):
            raise ServerMismatch(f"{where}: hidden states of shape {list(hidden.shape)} for {len(ids)} tokens")
        check_finite(hidden, what="hidden state", where=where)

    def _check(self, scored: Scored, k: int, where: str) -> None:
        """The answer at the valid positions is a top-k of the teacher's vocabulary (teachers/checks.py)."""
        if scored.ids.ndim != 2 or scored.valid.shape != scored.ids.shape[:1]:
            raise TeacherOutputError(f"{where}: arrays of shapes {list(scored.ids.shape)}, {list(scored.valid.shape)}")
        check_topk(scored.ids[scored.valid], scored.logprobs[scored.valid], None, k=k,
                   vocab_size=len(self.tokenizer), where=where)

    def _score(self, ids: list[int], k: int) -> Scored:
        if self._strings is None:
            self._strings = StringIds(self.tokenizer)
        text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        bos = self._bos(ids, text)
        answer = self._request("/v1/completions", {"prompt": text, "echo": True, "logprobs": k + self.margin,
                                                   "max_tokens": 1, "temperature": 0.0})
        try:
            entries = answer["choices"][0]["logprobs"]["top_logprobs"]
            if not isinstance(entries, list) or not all(e is None or isinstance(e, dict) for e in entries):
                raise TypeError("top_logprobs is not a list of {token: logprob} objects")
        except (KeyError, IndexError, TypeError) as e:
            raise _parse_error("/v1/completions", self.url, e) from None
        if len(entries) < len(ids) + bos - 1:
            raise ServerMismatch(f"the teacher server {self.url} returned {len(entries)} prompt positions for a "
                                 f"sequence of {len(ids)} tokens (it skips its BOS token inside a prompt?)")
        T = len(ids)
        out_ids = np.zeros((T, k), dtype=np.int64)
        out_lp = np.full((T, k), -np.inf, dtype=np.float32)
        valid = np.zeros(T, dtype=bool)
        displaced = np.zeros(T, dtype=bool)
        for t in range(T):
            entry = entries[t + bos] if t + bos < len(entries) else None
            if not entry:
                continue
            try:
                ranked = sorted(((str(s), float(v)) for s, v in entry.items()), key=lambda kv: -kv[1])
            except (TypeError, ValueError, AttributeError) as e:
                raise _parse_error(f"/v1/completions (position {t})", self.url, e) from None
            ranked = ranked[: k + self.margin]
            if any(math.isnan(v) for _, v in ranked):
                raise TeacherOutputError(f"teacher server {self.url}: NaN log-probability at position {t} of a "
                                         f"sequence of {T} tokens starting {ids[:8]}")
            placed = [(i, lp) for i, lp in ((self._strings.get(s), lp) for s, lp in ranked) if i is not None]
            if len(placed) < k:
                raise ServerMismatch(
                    f"the teacher server {self.url} gave {len(ranked)} entries at position {t}, of which "
                    f"{len(placed)} name one token of the teacher tokenizer; top-{k} needs {k} (ask for a smaller "
                    f"k or a larger teacher.server.margin)")
            displaced[t] = any(self._strings.get(s) is None for s, _ in ranked[:k])
            out_ids[t] = [i for i, _ in placed[:k]]
            out_lp[t] = [lp for _, lp in placed[:k]]
            valid[t] = True
        return Scored(out_ids, out_lp, valid, displaced)


class _Transient(Exception):
    """A failure a retry may cure (connection refused or reset, no complete answer before the deadline)."""
