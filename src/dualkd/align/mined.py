"""MinED alignment (FuseLLM / DSKD's `min_edit_dis_kld` baseline): dynamic time warping between the two
token sequences with edit distance as the cost, and a teacher -> student vocabulary map by edit distance.

    partner = mined_alignment([student_texts...], [teacher_texts...])   # per student token: teacher pos or -1
    vocab = mined_vocab_map(student_tokenizer, teacher_tokenizer)
    vocab.to_student   # [V_t] each teacher token's student token (same bytes, else nearest by edit distance)
    vocab.partner      # [V_s] the one teacher token whose logit each student id receives, or -1

The vocabulary map goes teacher -> student (FuseLLM's direction, as DSKD's official code uses it): every
teacher token names one student token, so a teacher logit reaches at most one student id. A student id
receives the logit of its exact-bytes partner when it has one, else of the lowest teacher id that names it;
student ids no teacher token names receive nothing (the objective gives them a -1e5 logit).

Speed: the official code runs a pure-Python O(n·m) DTW per sample, one edit-distance call per cell (≈30
pairs/s here). Here each pair's cost matrix comes from rapidfuzz's C++ `cdist` over the pair's *distinct*
token texts (text repeats a lot: "the", ",", "Ġ"), and the DTW recursion and traceback run compiled (numba):
    D[i, j] = C[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])
The vocabulary maps are computed once per tokenizer pair (exact bytes first, rapidfuzz for the rest) and
cached on disk.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from dualkd.align.vocab import bytes_index, teacher_to_student_ids, token_bytes
from dualkd.atomic import atomic_open


def token_texts(tokenizer: Any) -> list[str]:
    """Each token's text for edit distances: its bytes as UTF-8 (lossy for partial characters), without the
    leading space marker (FuseLLM strips Ġ / ▁); special tokens are empty."""
    return [b.decode("utf-8", errors="replace").lstrip(" ") if b is not None else "" for b in token_bytes(tokenizer)]


# ----------------------------------------------------------------------------------------------- DTW

_BIG = np.int64(1) << 60  # "unreachable"; costs are small integers, so sums stay exact


@numba.njit(cache=True, nogil=True)
def _dtw_table(cost: np.ndarray) -> np.ndarray:
    """Cumulative costs D [n+1, m+1] of the monotone paths from (0, 0), steps down/right/diagonal."""
    n, m = cost.shape
    D = np.full((n + 1, m + 1), _BIG, dtype=np.int64)
    D[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i, j] = cost[i - 1, j - 1] + min(D[i - 1, j - 1], D[i - 1, j], D[i, j - 1])
    return D


@numba.njit(cache=True, nogil=True)
def _dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The minimal-cost path as (rows, cols) from (0, 0) to (n-1, m-1); ties prefer diagonal, then up."""
    n, m = cost.shape
    D = _dtw_table(cost)
    rows = np.empty(n + m, dtype=np.int64)
    cols = np.empty(n + m, dtype=np.int64)
    i, j, k = n, m, 0
    while True:
        rows[k], cols[k] = i - 1, j - 1
        k += 1
        if i == 1 and j == 1:
            break
        if i == 1:
            j -= 1
        elif j == 1:
            i -= 1
        else:
            diag, up, left = D[i - 1, j - 1], D[i - 1, j], D[i, j - 1]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
    return rows[:k][::-1].copy(), cols[:k][::-1].copy()


@numba.njit(cache=True, nogil=True)
def _one_to_one_partners(cost: np.ndarray) -> np.ndarray:
    """Per row of `cost`: the column the DTW path pairs it with when it pairs it with exactly one, else -1."""
    rows, cols = _dtw_path(cost)
    n = cost.shape[0]
    count = np.zeros(n, dtype=np.int64)
    partner = np.full(n, -1, dtype=np.int64)
    for k in range(rows.size):
        count[rows[k]] += 1
        partner[rows[k]] = cols[k]
    for i in range(n):
        if count[i] != 1:
            partner[i] = -1
    return partner


def dtw_paths(costs: Sequence[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Minimal-cost monotone paths from (0, 0) to (n-1, m-1) through each integer cost matrix [n_k, m_k]."""
    out = []
    for c in costs:
        rows, cols = _dtw_path(np.ascontiguousarray(c, dtype=np.int64))
        out.append(list(zip(rows.tolist(), cols.tolist())))
    return out


def _edit_costs(student: Sequence[str], teacher: Sequence[str]) -> np.ndarray:
    """Levenshtein distances [n, m] between the token texts, computed once per distinct pair of texts."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    s_uniq, s_inv = np.unique(np.asarray(student, dtype=object), return_inverse=True)
    t_uniq, t_inv = np.unique(np.asarray(teacher, dtype=object), return_inverse=True)
    small = cdist(s_uniq.tolist(), t_uniq.tolist(), scorer=Levenshtein.distance, dtype=np.int64)
    return small[s_inv[:, None], t_inv[None, :]]


def mined_alignment(student_texts: Sequence[Sequence[str]], teacher_texts: Sequence[Sequence[str]]
                    ) -> list[Tensor]:
    """For each sequence pair, a LongTensor [n_student]: the teacher position that student position j is
    matched with when the DTW path gives it exactly one teacher token, else -1."""
    out = []
    for s, t in zip(student_texts, teacher_texts):
        if not s or not t:
            out.append(torch.full((len(s),), -1, dtype=torch.long))
        else:
            out.append(torch.from_numpy(_one_to_one_partners(_edit_costs(s, t))))
    return out


# ----------------------------------------------------------------------------------------------- vocab map


def _cache_dir() -> Path:
    return Path(os.environ.get("DUALKD_CACHE", Path.home() / ".cache" / "dualkd")) / "vocab-maps"


_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def _fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (computed once per tokenizer object)."""
    hit = _FINGERPRINTS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    h = hashlib.sha256()
    for tok in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        h.update((tok or "").encode("utf-8", errors="replace") + b"\x00")
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, h.hexdigest()[:16])
    return _FINGERPRINTS[id(tokenizer)][1]


def nearest_token_ids(source_tokenizer: Any, target_tokenizer: Any, source_ids: Sequence[int] | None = None,
                      cache: bool = True) -> Tensor:
    """[V_source] LongTensor mapping source tokens to target tokens: the target token with the same bytes,
    else (for the ids in `source_ids`, default all) the one whose text is at the smallest edit distance;
    -1 for special tokens and ids not asked for. EOS maps to EOS. The edit-distance part is cached on disk
    per tokenizer pair and id set."""
    exact = teacher_to_student_ids(target_tokenizer, source_tokenizer)  # source id -> target id or -1
    wanted = np.arange(len(source_tokenizer)) if source_ids is None else np.unique(np.asarray(source_ids))
    special = np.array(sorted(set(source_tokenizer.all_special_ids)), dtype=np.int64)
    missing = wanted[(exact[torch.from_numpy(wanted)] < 0).numpy()]
    missing = missing[~np.isin(missing, special)]
    if missing.size == 0:
        return exact
    key = hashlib.sha256(
        f"{_fingerprint(source_tokenizer)}>{_fingerprint(target_tokenizer)}:".encode() + missing.tobytes()
    ).hexdigest()[:24]
    path = _cache_dir() / f"{key}.npy"
    if cache and path.exists():
        nearest = np.load(path)
    else:
        nearest = _nearest_by_edit_distance(token_texts(source_tokenizer), token_texts(target_tokenizer), missing)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.save(f, nearest, allow_pickle=False)
    out = exact.clone()
    out[torch.from_numpy(missing)] = torch.from_numpy(nearest)
    return out


def _nearest_by_edit_distance(source_texts: list[str], target_texts: list[str], ids: np.ndarray) -> np.ndarray:
    """For each source id in `ids`, the target id whose text is at the smallest edit distance (the lowest id
    on ties). Large jobs (Gemma-3's 262k tokens against a 49k vocabulary: about a minute here) print a
    progress line on stderr every 10 seconds."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    candidates = np.asarray([i for i, t in enumerate(target_texts) if t], dtype=np.int64)
    choices = [target_texts[i] for i in candidates]
    nearest = np.empty(ids.size, dtype=np.int64)
    started = last = time.monotonic()
    for start in range(0, ids.size, 256):
        queries = [source_texts[i] for i in ids[start:start + 256]]
        dist = cdist(queries, choices, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        nearest[start:start + 256] = candidates[dist.argmin(axis=1)]
        now = time.monotonic()
        if now - last >= 10:
            last = now
            done = min(start + 256, ids.size)
            print(f"vocabulary map: {done:,}/{ids.size:,} tokens by edit distance ({now - started:.0f} s)",
                  file=sys.stderr, flush=True)
    return nearest


@dataclass(frozen=True)
class MinEDVocabMap:
    to_student: Tensor  # [V_t] long: the student token each teacher token names (-1: special tokens)
    partner: Tensor  # [V_s] long: the teacher token whose logit each student id receives, or -1


def mined_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> MinEDVocabMap:
    """The teacher -> student vocabulary map of MinED and the one-to-one re-indexing it induces.

    to_student[t]: the student token with t's bytes, else the one nearest by edit distance (EOS -> EOS).
    partner[s]: among the teacher tokens that name s, the one with s's exact bytes (the ordinary token, not a
    `<0xNN>` byte piece, when both exist), else the lowest teacher id; -1 when none names s. Since each
    teacher token names one student token, no teacher id is the partner of two student ids."""
    to_student = nearest_token_ids(teacher_tokenizer, student_tokenizer)  # [V_t]
    V_s = len(student_tokenizer)
    named = torch.nonzero((to_student >= 0) & (to_student < V_s)).squeeze(1)  # teacher ids that name one
    none = len(teacher_tokenizer)
    partner = torch.full((V_s,), none, dtype=torch.long).scatter_reduce_(0, to_student[named], named, "amin")
    partner[partner == none] = -1
    # the exact-bytes partner wins over a nearest one
    teacher_index = bytes_index(teacher_tokenizer)
    for s, b in enumerate(token_bytes(student_tokenizer)):
        t = teacher_index.get(b) if b is not None else None
        if t is not None and int(to_student[t]) == s:
            partner[s] = t
    return MinEDVocabMap(to_student, partner)
