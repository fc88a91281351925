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

Every request is retried with exponential backoff and bounded by a timeout; `ServerUnavailable` says which
server, what failed and how often. Results are cached on disk by (server model, sequence hash, k).
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualkd.atomic import atomic_open
from dualkd.errors import ModelError


class ServerUnavailable(ModelError):
    """The teacher server did not answer (refused, timed out, or failed) after every retry."""


class ServerMismatch(ModelError):
    """The server's answer does not fit the teacher's tokenizer or the request (another model, too few entries)."""


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
    """Requests to one server, with retries, a timeout and a disk cache (see the module docstring)."""

    def __init__(self, url: str, tokenizer: Any, *, timeout_s: float, retries: int, backoff_s: float,
                 margin: int, cache_dir: Path | None):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout_s, self.retries, self.backoff_s, self.margin = timeout_s, retries, backoff_s, margin
        self.cache_dir = cache_dir
        self._strings: StringIds | None = None
        self._model: str | None = None

    # ------------------------------------------------------------------ transport
    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request, retried `retries` times with backoff_s, 2 backoff_s, ... between tries."""
        data = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code < 500:  # the server understood and said no: retrying will not help
                    raise ServerMismatch(f"teacher server {self.url}{path} answered {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise ServerUnavailable(f"teacher server {self.url} did not answer {path} after {self.retries + 1} tries "
                                f"(timeout {self.timeout_s:g} s each; last: {last})")

    @property
    def model(self) -> str:
        """The served model's id (`/v1/models`), part of every cache key."""
        if self._model is None:
            listed = self._request("/v1/models").get("data") or [{}]
            self._model = str(listed[0].get("id", "unknown"))
        return self._model

    def check_tokenizer(self, probe: str = "Distillation, in 3 words: the teacher's knowledge -> a student.") -> None:
        """Refuse a server whose tokenizer differs from ours, before training."""
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        self._bos(ours, self.tokenizer.decode(ours))

    def _bos(self, ids: list[int], text: str) -> int:
        """1 when the server puts a BOS before the text, 0 when not; refuses a tokenization other than `ids`."""
        theirs = self._request("/extras/tokenize", {"input": text})["tokens"]
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
        return str(self._request("/v1/completions", body)["choices"][0]["text"])

    # ------------------------------------------------------------------ scoring
    def score(self, ids: list[int], k: int) -> Scored:
        """The top-k at every position of `ids` (cached on disk by server model, sequence and k)."""
        path = self._cache_path(ids, k)
        if path is not None and path.exists():
            with np.load(path) as f:
                return Scored(f["ids"], f["logprobs"], f["valid"], f["displaced"])
        scored = self._score(ids, k)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.savez(f, ids=scored.ids, logprobs=scored.logprobs, valid=scored.valid, displaced=scored.displaced)
        return scored

    def _cache_path(self, ids: list[int], k: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.model, k, ids]).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npz"

    def _score(self, ids: list[int], k: int) -> Scored:
        if self._strings is None:
            self._strings = StringIds(self.tokenizer)
        text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        bos = self._bos(ids, text)
        answer = self._request("/v1/completions", {"prompt": text, "echo": True, "logprobs": k + self.margin,
                                                   "max_tokens": 1, "temperature": 0.0})
        entries = answer["choices"][0]["logprobs"]["top_logprobs"]
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
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[: k + self.margin]
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
