"""Exact token alignment (ETA) on character offsets: pair the tokens of two tokenizations of the same text
whose character spans are identical.

    student_index, teacher_index = exact_alignment(student_offsets, teacher_offsets)

DSKDv2 aligns by walking the two token-string lists, which breaks as soon as the tokenizers spell the same
text differently (`Ċ` vs a real newline, byte glyphs vs characters; docs/benchmark-align.md): after the first
newline nothing aligns. Character offsets of one text do not depend on how a vocabulary spells its pieces,
so aligning them is right for byte-level BPE (Ġ), SentencePiece (▁, byte fallback), leading spaces and
multi-byte characters alike, and two aligned tokens always cover the same text.

Rules:
- a token with an empty span (BOS/EOS and other added specials) is never aligned here; objectives pair the
  two EOS tokens explicitly;
- a token whose span is shared with, or overlaps, another token of its own sequence is never aligned: byte
  fallback and byte-level BPE may split one character into several tokens that each report the whole
  character, and none of them alone is that text;
- the result is in increasing order on both sides.
One call runs one compiled pass (numba) over the two offset arrays: a sort only for non-monotone offsets, then a
merge of the two sorted span lists. The offsets may come as a tokenizer gives them: a list of (start, end)
pairs (`offset_mapping`), or, cheaper to read, the array of `return_tensors="np"` ([n, 2] or [1, n, 2]).
Many examples at once: `exact_alignment_many`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

Offsets = Tensor | np.ndarray | Sequence[tuple[int, int]] | Sequence[Sequence[int]]


def _as_array(offsets: Offsets) -> np.ndarray:
    """[n, 2] int64 (C-contiguous) from a tensor, an array ([n, 2], or [1, n, 2] as a tokenizer's
    `return_tensors="np"` gives it) or a list of pairs."""
    if isinstance(offsets, Tensor):
        arr = offsets.detach().cpu().numpy()
    elif isinstance(offsets, np.ndarray):
        arr = offsets
    else:  # a list of pairs: flattened by an iterator, faster than np.array's shape discovery (docs/benchmark-align.md)
        n = len(offsets)
        try:
            arr = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * n).reshape(n, 2)
        except (TypeError, ValueError):
            arr = np.array(offsets, dtype=np.int64)  # ragged or odd input: let NumPy say what is wrong
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets must have shape [n, 2], got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def alignable(offsets: Offsets) -> np.ndarray:
    """Bool [n]: tokens with a non-empty span that no other token of the sequence shares or overlaps."""
    arr = _as_array(offsets)
    out = np.zeros(arr.shape[0], dtype=bool)
    if arr.shape[0]:
        out[_lonely_spans(arr)[2]] = True
    return out


def exact_alignment(student_offsets: Offsets, teacher_offsets: Offsets) -> tuple[Tensor, Tensor]:
    """Indices (student_index, teacher_index), equal-length LongTensors, of the token pairs whose character
    spans over the same text are identical. Offsets: [n, 2] / [m, 2] (start, end) pairs, as a list, an array
    or a tensor (module docstring)."""
    s_out, t_out = _align_pair(_as_array(student_offsets), _as_array(teacher_offsets))
    return torch.from_numpy(s_out), torch.from_numpy(t_out)


@numba.njit(cache=True, nogil=True)
def _lonely_spans(off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, token indices) of the alignable tokens, ascending by (start, end), in one compiled pass
    (a sort only when the offsets are not monotone)."""
    n = off.shape[0]
    start, end, idx = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    m = 0
    monotone = True
    for i in range(n):
        if off[i, 1] > off[i, 0]:  # empty spans (added specials) never align
            start[m], end[m], idx[m] = off[i, 0], off[i, 1], i
            if m > 0 and (start[m] < start[m - 1] or (start[m] == start[m - 1] and end[m] <= end[m - 1])):
                monotone = False
            m += 1
    start, end, idx = start[:m], end[:m], idx[:m]
    if not monotone:
        width = end.max() + 1
        order = np.argsort(start * width + end, kind="mergesort")
        start, end, idx = start[order], end[order], idx[order]
    # in start order a token clashes with an earlier one iff it starts before the running max of their ends
    lonely = np.ones(m, np.bool_)
    running = -1
    for k in range(m):
        if k > 0 and start[k] < running:
            lonely[k] = False
            lonely[k - 1] = False
        running = max(running, end[k])
    return start[lonely], end[lonely], idx[lonely]


@numba.njit(cache=True, nogil=True)
def _align_pair(s_off: np.ndarray, t_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge the two sorted span lists; pairs sorted by student index (so by teacher index too)."""
    s_start, s_end, s_idx = _lonely_spans(s_off)
    t_start, t_end, t_idx = _lonely_spans(t_off)
    s_out = np.empty(min(s_idx.size, t_idx.size), np.int64)
    t_out = np.empty_like(s_out)
    i = j = m = 0
    while i < s_idx.size and j < t_idx.size:
        if s_start[i] == t_start[j] and s_end[i] == t_end[j]:
            s_out[m], t_out[m] = s_idx[i], t_idx[j]
            m += 1
            i += 1
            j += 1
        elif s_start[i] < t_start[j] or (s_start[i] == t_start[j] and s_end[i] < t_end[j]):
            i += 1
        else:
            j += 1
    s_out, t_out = s_out[:m], t_out[:m]
    order = np.argsort(s_out, kind="mergesort")
    return s_out[order], t_out[order]


def exact_alignment_many(students: Sequence[np.ndarray], teachers: Sequence[np.ndarray]
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`exact_alignment` of every (student, teacher) pair of offset arrays ([n_i, 2], [m_i, 2], int64), as int64
    index arrays: one compiled pass per pair (~80k pairs/s on one core for Dolly-length responses)."""
    return [_align_pair(_as_array(s), _as_array(t)) for s, t in zip(students, teachers, strict=True)]
