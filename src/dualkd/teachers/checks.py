"""What a teacher's answer must be before a loss reads it, checked where it enters (a server's answer, a cache's
arrays), so that a broken teacher stops the run with a message naming the source instead of training NaN.

A top-k answer at N positions is ids [N, k] (integers in [0, V)), log-probabilities [N, k] and, from a cache,
the log of the tail mass [N]. Per position:

    log p_i ∈ [−inf, 0 + SLACK]                 no NaN, no +inf; −inf is a token of probability 0
    Σ_i p_i ≤ 1 + MASS_SLACK                    the top-k cannot hold more than all of the mass
    Σ_i p_i + exp(tail) ∈ [1 − MASS_SLACK, 1 + MASS_SLACK]   (when a tail is stored) the buckets are a distribution

The slacks cover fp16 storage: a log-probability rounded to fp16 is off by ≤ 2⁻¹¹ relative, so 64–128 of them
sum to within ~1e-3 of the true mass; 1e-2 leaves room and still refuses "probabilities" that sum to 2.
"""

from __future__ import annotations

import numpy as np

from dualkd.errors import ModelError

SLACK = 1e-3
"""How far above 0 a stored log-probability may round (fp16 rounding of values near 0)."""
MASS_SLACK = 1e-2
"""How far from 1 the buckets' total mass may be (fp16 rounding summed over k entries)."""


class TeacherOutputError(ModelError):
    """A teacher answered something that is not a probability distribution over its vocabulary."""


def check_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray | None, *, k: int, vocab_size: int,
               where: str) -> None:
    """Raise TeacherOutputError, naming `where` (the server and sequence, the cache file and example) and the
    first bad position, unless the arrays are a top-k answer as the module docstring says."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.ndim != 2 or ids.shape[1] != k or logprobs.shape != ids.shape:
        raise TeacherOutputError(f"{where}: top-{k} arrays of shapes {list(ids.shape)} (ids) and "
                                 f"{list(logprobs.shape)} (log-probabilities); expected [N, {k}] each")
    if tail is not None and np.asarray(tail).shape != (ids.shape[0],):
        raise TeacherOutputError(f"{where}: the tail masses have shape {list(np.shape(tail))}, expected "
                                 f"[{ids.shape[0]}] (one per position)")
    if ids.size == 0:
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise TeacherOutputError(f"{where}: token ids of type {ids.dtype}, expected integers")
    out = (ids < 0) | (ids >= vocab_size)
    if out.any():
        t, j = np.argwhere(out)[0]
        raise TeacherOutputError(f"{where}: token id {int(ids[t, j])} at position {t} lies outside the teacher's "
                                 f"vocabulary of {vocab_size}")
    if tail is not None:  # first: a packed cache's log-probabilities are renormalized against it
        tl = np.asarray(tail, dtype=np.float64)
        bad = np.isnan(tl) | (tl > SLACK)
        if bad.any():
            t = int(np.argmax(bad))
            raise TeacherOutputError(f"{where}: tail log-mass {float(tl[t])!r} at position {t}; it is a number ≤ 0")
    lp = logprobs.astype(np.float64)
    bad = np.isnan(lp) | (lp > SLACK)  # +inf included
    if bad.any():
        t, j = np.argwhere(bad)[0]
        raise TeacherOutputError(f"{where}: log-probability {float(lp[t, j])!r} at position {t} (entry {j}); a "
                                 "log-probability is a number ≤ 0")
    mass = np.exp(lp).sum(-1)  # [N]
    over = mass > 1.0 + MASS_SLACK
    if over.any():
        t = int(np.argmax(over))
        raise TeacherOutputError(f"{where}: the top-{k} probabilities at position {t} sum to {mass[t]:.4f}, above 1")
    if tail is None:
        return
    total = mass + np.exp(tl)
    off = np.abs(total - 1.0) > MASS_SLACK
    if off.any():
        t = int(np.argmax(off))
        raise TeacherOutputError(f"{where}: the top-{k} and tail masses at position {t} sum to {total[t]:.4f}, not 1")


def check_finite(values: np.ndarray, *, what: str, where: str) -> None:
    """Raise TeacherOutputError unless every value is finite (hidden states, a head)."""
    finite = np.isfinite(values)
    if not finite.all():
        first = np.argwhere(~finite)[0].tolist()
        raise TeacherOutputError(f"{where}: {what} holds a non-finite value ({values[tuple(first)]!r} at "
                                 f"{first})")
