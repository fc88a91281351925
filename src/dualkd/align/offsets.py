"""Exact token alignment (ETA) on character offsets: pair the tokens of two tokenizations of the same text
whose character spans are identical.

    student_index, teacher_index = exact_alignment(student_offsets, teacher_offsets)

DSKDv2 aligns by walking the two token-string lists, which breaks as soon as the tokenizers spell the same
text differently (`Ċ` vs a real newline, byte glyphs vs characters; methods/dskd.md §5): after the first
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
It runs in O(n + m) after a sort that is a no-op for the usual monotone offsets (NumPy, no Python loop).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Offsets = Tensor | np.ndarray | Sequence[tuple[int, int]] | Sequence[Sequence[int]]


def _as_array(offsets: Offsets) -> np.ndarray:
    if isinstance(offsets, Tensor):
        arr = offsets.detach().cpu().numpy()
    else:
        arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets must have shape [n, 2], got {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def alignable(offsets: np.ndarray) -> np.ndarray:
    """Bool [n]: tokens with a non-empty span that no other token of the sequence shares or overlaps."""
    out = np.zeros(offsets.shape[0], dtype=bool)
    real = np.flatnonzero(offsets[:, 1] > offsets[:, 0])  # empty spans (added specials) never align
    if real.size == 0:
        return out
    start, end = offsets[real, 0], offsets[real, 1]
    order = np.lexsort((end, start))  # by start, then end
    s, e = start[order], end[order]
    # in start order a token clashes with an earlier one iff it starts before the running max of their ends;
    # if token k+1 clashes with some earlier token, token k clashes too (or is that earlier token)
    prev_end = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], e[:-1]]))
    clash_prev = s < prev_end
    clash_next = np.concatenate([clash_prev[1:], [False]])
    out[real[order]] = ~(clash_prev | clash_next)
    return out


def exact_alignment(student_offsets: Offsets, teacher_offsets: Offsets) -> tuple[Tensor, Tensor]:
    """Indices (student_index, teacher_index), equal-length LongTensors, of the token pairs whose character
    spans over the same text are identical. Offsets: [n, 2] / [m, 2] (start, end) pairs."""
    s = _as_array(student_offsets)
    t = _as_array(teacher_offsets)
    s_idx = np.flatnonzero(alignable(s))
    t_idx = np.flatnonzero(alignable(t))
    if s_idx.size == 0 or t_idx.size == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    # a span is one integer key; the alignable spans of a sequence are unique, so intersect1d pairs them
    width = int(max(s[s_idx, 1].max(), t[t_idx, 1].max())) + 1
    s_key = s[s_idx, 0] * width + s[s_idx, 1]
    t_key = t[t_idx, 0] * width + t[t_idx, 1]
    _, s_pos, t_pos = np.intersect1d(s_key, t_key, assume_unique=True, return_indices=True)
    s_out, t_out = s_idx[s_pos], t_idx[t_pos]
    order = np.argsort(s_out, kind="stable")
    return torch.from_numpy(s_out[order]).long(), torch.from_numpy(t_out[order]).long()
