"""Token maps between two vocabularies, built from the tokenizers themselves (no shipped mapping files).

Two tokens are "the same" when they stand for the same bytes of text. Comparing raw token strings (as
DSKDv2 does after mapping Ġ to ▁) misses most of them: byte-level BPE spells a newline `Ċ` and every non-ASCII
byte as a glyph, SentencePiece spells the real characters and falls back to `<0xNN>` pieces. So every token
is first turned into its bytes:
- byte-level BPE (a ByteLevel decoder: GPT-2, Llama-3, Qwen, SmolLM): each character is one byte through
  GPT-2's byte <-> unicode table;
- SentencePiece-style (Gemma, Llama-2, Mistral): `▁` is a space, `<0xNN>` is byte NN, the rest is UTF-8.
Special tokens (BOS, EOS, chat markers...) have no text and map to nothing, except EOS to EOS.

    student_ids, teacher_ids = shared_vocabulary(student_tokenizer, teacher_tokenizer)   # DSKDv2 pinv init
    to_student = teacher_to_student_ids(student_tokenizer, teacher_tokenizer)          # [V_t] -> id or -1
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def is_byte_level(tokenizer: Any) -> bool:
    """True for byte-level BPE vocabularies (their decoder is ByteLevel)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return '"ByteLevel"' in json.dumps(decoder)


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes of text each token id stands for; None for special tokens and unknown pieces."""
    vocab_size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    byte_level = is_byte_level(tokenizer)
    table = _unicode_to_byte() if byte_level else {}
    out: list[bytes | None] = []
    for i, tok in enumerate(tokens):
        if tok is None or i in special:
            out.append(None)
        elif byte_level:
            try:
                out.append(bytes(table[c] for c in tok))
            except KeyError:  # an added (non-special) token written in plain text
                out.append(tok.encode("utf-8"))
        else:
            m = _BYTE_PIECE.match(tok)
            out.append(bytes([int(m.group(1), 16)]) if m else tok.replace("▁", " ").encode("utf-8"))
    return out


def bytes_index(tokenizer: Any) -> dict[bytes, int]:
    """bytes -> id. When several ids spell the same bytes (a SentencePiece byte piece `<0x74>` and the token
    `t`), the ordinary token wins: it is the one the tokenizer actually produces."""
    index: dict[bytes, int] = {}
    pieces: dict[bytes, int] = {}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for i, (b, tok) in enumerate(zip(token_bytes(tokenizer), tokens)):
        if b is None:
            continue
        target = pieces if tok is not None and _BYTE_PIECE.match(tok) else index
        target.setdefault(b, i)
    for b, i in pieces.items():
        index.setdefault(b, i)
    return index


def teacher_to_student_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> Tensor:
    """[V_t] LongTensor: the student id whose bytes equal each teacher token's, else -1; EOS maps to EOS."""
    index = bytes_index(student_tokenizer)
    mapping = torch.full((len(teacher_tokenizer),), -1, dtype=torch.long)
    for i, b in enumerate(token_bytes(teacher_tokenizer)):
        if b is not None and b in index:
            mapping[i] = index[b]
    if teacher_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
        mapping[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
    return mapping


def shared_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(student_ids, teacher_ids): the token pairs with identical bytes, one pair per student token, plus
    the EOS pair. With one tokenizer on both sides this is the whole vocabulary, id for id."""
    to_student = teacher_to_student_ids(student_tokenizer, teacher_tokenizer)
    teacher_ids = torch.nonzero(to_student >= 0).squeeze(1)
    student_ids = to_student[teacher_ids]
    # several teacher tokens can share bytes with one student token (rare): keep the first of each
    first = torch.ones_like(student_ids, dtype=torch.bool)
    seen: set[int] = set()
    for k, s in enumerate(student_ids.tolist()):
        if s in seen:
            first[k] = False
        seen.add(s)
    return student_ids[first], teacher_ids[first]
