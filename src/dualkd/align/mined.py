"""MinED alignment (FuseLLM / DSKD's `min_edit_dis_kld` baseline): dynamic time warping between the two
token sequences with edit distance as the cost, and a teacher -> student vocabulary map by edit distance.

    partner = mined_alignment([student_texts...], [teacher_texts...])   # per student token: teacher pos or -1
    to_student = nearest_token_ids(teacher_tokenizer, student_tokenizer, teacher_ids_seen_in_data)
    to_teacher = nearest_token_ids(student_tokenizer, teacher_tokenizer)   # re-indexes teacher logits

Speed: the official code runs a pure-Python O(n·m) DTW per sample (≈30 pairs/s here). Here the cost matrix
comes from rapidfuzz's C++ `cdist`, and the DTW recursion runs one row at a time as a vectorized min-plus
prefix scan over a whole batch of sequence pairs at once:
    D[i, j] = C[i, j] + min(D[i-1, j], D[i-1, j-1], D[i, j-1])
    a_j = C[i, j] + min(D[i-1, j], D[i-1, j-1]);  D[i, j] = S_j + min_{k<=j} (a_k - S_k),  S = cumsum(C[i])
The vocabulary maps are computed once per tokenizer pair (exact bytes first, rapidfuzz for the rest) and
cached on disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualkd.align.vocab import teacher_to_student_ids, token_bytes

_INF = np.float32(1e30)


def token_texts(tokenizer: Any) -> list[str]:
    """Each token's text for edit distances: its bytes as UTF-8 (lossy for partial characters), without the
    leading space marker (FuseLLM strips Ġ / ▁); special tokens are empty."""
    return [b.decode("utf-8", errors="replace").lstrip(" ") if b is not None else "" for b in token_bytes(tokenizer)]


# ----------------------------------------------------------------------------------------------- DTW


def dtw_paths(costs: Sequence[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Minimal-cost monotone paths from (0, 0) to (n-1, m-1) through each cost matrix [n_k, m_k]
    (steps: down, right, diagonal). All matrices are processed together, row by row."""
    if not costs:
        return []
    n_max = max(c.shape[0] for c in costs)
    m_max = max(c.shape[1] for c in costs)
    B = len(costs)
    C = np.full((B, n_max, m_max), _INF, dtype=np.float32)
    for k, c in enumerate(costs):
        C[k, : c.shape[0], : c.shape[1]] = c
    D = np.empty((B, n_max + 1, m_max + 1), dtype=np.float32)
    D[:, 0, :] = _INF
    D[:, 0, 0] = 0.0
    D[:, 1:, 0] = _INF
    for i in range(1, n_max + 1):
        row = C[:, i - 1, :]  # [B, m]
        a = row + np.minimum(D[:, i - 1, 1:], D[:, i - 1, :-1])
        prefix = np.cumsum(row, axis=1, dtype=np.float64)  # float64: sums of 1e30 padding stay ordered
        D[:, i, 1:] = (np.minimum.accumulate(a - prefix, axis=1) + prefix).astype(np.float32)
    return [_traceback(D[k], c.shape[0], c.shape[1]) for k, c in enumerate(costs)]


def _traceback(D: np.ndarray, n: int, m: int) -> list[tuple[int, int]]:
    i, j = n, m
    path = [(i - 1, j - 1)]
    while (i, j) != (1, 1):
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
        path.append((i - 1, j - 1))
    path.reverse()
    return path


def _groups(costs: list[np.ndarray], max_cells: int = 1 << 21) -> list[list[int]]:
    """Batches of similar shapes whose padded size stays under `max_cells`: long pairs go alone, short ones
    share the row loop."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i].shape[0], costs[i].shape[1]))
    groups: list[list[int]] = []
    current: list[int] = []
    n_max = m_max = 0
    for i in order:
        n, m = costs[i].shape
        if current and (len(current) + 1) * max(n_max, n) * max(m_max, m) > max_cells:
            groups.append(current)
            current, n_max, m_max = [], 0, 0
        current.append(i)
        n_max, m_max = max(n_max, n), max(m_max, m)
    if current:
        groups.append(current)
    return groups


def mined_alignment(student_texts: Sequence[Sequence[str]], teacher_texts: Sequence[Sequence[str]]
                    ) -> list[Tensor]:
    """For each sequence pair, a LongTensor [n_student]: the teacher position that student position j is
    matched with when the DTW path gives it exactly one teacher token, else -1."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    out: list[Tensor | None] = [None] * len(student_texts)
    costs, which = [], []
    for k, (s, t) in enumerate(zip(student_texts, teacher_texts)):
        if not s or not t:
            out[k] = torch.full((len(s),), -1, dtype=torch.long)
            continue
        costs.append(cdist(list(s), list(t), scorer=Levenshtein.distance, dtype=np.int32).astype(np.float32))
        which.append(k)
    for group in _groups(costs):
        for i, path in zip(group, dtw_paths([costs[i] for i in group])):
            n = costs[i].shape[0]
            partner = np.full(n, -1, dtype=np.int64)
            count = np.zeros(n, dtype=np.int64)
            for s_pos, t_pos in path:
                count[s_pos] += 1
                partner[s_pos] = t_pos
            partner[count != 1] = -1
            out[which[i]] = torch.from_numpy(partner)
    return out  # type: ignore[return-value]


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
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, nearest)
            tmp.replace(path)
    out = exact.clone()
    out[torch.from_numpy(missing)] = torch.from_numpy(nearest)
    return out


def _nearest_by_edit_distance(source_texts: list[str], target_texts: list[str], ids: np.ndarray) -> np.ndarray:
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    candidates = np.asarray([i for i, t in enumerate(target_texts) if t], dtype=np.int64)
    choices = [target_texts[i] for i in candidates]
    nearest = np.empty(ids.size, dtype=np.int64)
    for start in range(0, ids.size, 256):
        queries = [source_texts[i] for i in ids[start:start + 256]]
        dist = cdist(queries, choices, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        nearest[start:start + 256] = candidates[dist.argmin(axis=1)]
    return nearest
