"""The packed encoding of a teacher cache's top-k rows: 299 bytes per token at k = 128 (V = 49,152) where the
plain float16 encoding takes 516; the KD loss moves by ~1e-4 nats per token on average, ~1e-3 at one token.

One row (one response position) is the teacher's k most likely token ids, their log-probabilities sorted from
the largest down (l_1 ≥ l_2 ≥ … ≥ l_k, as `topk` returns them) and the log of the remaining mass. The row's
bytes, in order (the tail mass stays in its own fp32 array):

    ids      each id split as id = hi · 2^b + lo: lo in b bits, bit-packed; hi < R as base-R digits, g per
             byte (R^g ≤ 256). b is chosen per vocabulary to spend the fewest bytes: V = 49,152 → b = 14, R = 3,
             g = 5, 15.6 bits per id (a plain uint16 spends 16); V = 262,144 → 18 bits (a plain int32 spends 32).
    exact    l_1 … l_m in float16 (m = 4): the few tokens that hold most of the mass, stored as the plain cache
             stores them.
    bins     ranks [4, 16) in 6 bits, [16, 32) in 4, [32, 64) in 2, [64, k) in 1 (cut at k). A bin stores a
             scale s (one byte: s = 2^(e/16 − 12), the smallest such s ≥ its largest gap / (2^bits − 1)) and, per
             rank, a code c_r ∈ [0, 2^bits) with

                 l̂_r = l̂_(r−1) − c_r · s,   c_r = clip(round((l̂_(r−1) − l_r) / s), 0, 2^bits − 1)

             i.e. the gaps between sorted log-probabilities, quantized against the *reconstructed* previous
             value (error diffusion): every l̂_r stays within s/2 of l_r wherever the gaps fit the bin's range,
             errors never accumulate, and l̂ is non-increasing by construction.

Decoding adds one constant per row so that Σ exp(l̂) + exp(tail) = 1 exactly (the stored tail is the fp32 one):
the quantization, and the float16 rounding of the exact values, move mass between the top-k tokens, never into
or out of the tail.

Why these bins: an error in log p_r enters the KD loss weighted by p_r·(log p_r − log q_r + 1), so the bits go
to the top ranks; ranks past 64 hold little mass each and one bit is enough. The layout was chosen among
others of ≤ 300 bytes by the KD loss error on SmolLM2-135M-Instruct's top-128 over Dolly (benchmarks/
cache_layouts.py); the effect on the loss is in docs/benchmark-cache.md.

Learnt from DistillKit's compressed format (bit-packed ids, exact top values, coded rest); the coding of the
rest (error-diffused gap codes in bins) and the id split are ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from dualkd.teachers.checks import SLACK

EXACT = 4
BINS = ((16, 6), (32, 4), (64, 2), (None, 1))
"""(end rank, bits) of each coded bin after the EXACT ranks; None: up to k."""
_SCALE_MIN_LOG2 = -12.0
_SCALES = 2.0 ** (np.arange(256) / 16 + _SCALE_MIN_LOG2)
"""The scale each byte value e stands for."""
_FLOOR = -1e4
"""Log-probabilities below are coded as this value (a −inf entry of a tiny vocabulary; e^-1e4 = 0 in fp32)."""


def _id_split(vocab: int) -> tuple[int, int, int]:
    """(b, R, g): lo bits, hi radix, hi digits per byte, the cheapest per id for this vocabulary."""
    full = max(1, math.ceil(math.log2(vocab)))
    best = (float(full), full, 1, 0)  # plain b-bit ids
    for b in range(full - 1, max(0, full - 5), -1):
        radix = -(-vocab // (1 << b))
        per_byte = int(math.floor(8 / math.log2(radix) + 1e-9))
        if per_byte and b + 8 / per_byte < best[0]:
            best = (b + 8 / per_byte, b, radix, per_byte)
    return best[1], best[2], best[3]


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, n] non-negative ints < 2^bits → [N, ceil(n·bits / 8)] uint8, little-endian bit order."""
    planes = (codes[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.reshape(codes.shape[0], -1).astype(np.uint8), axis=-1, bitorder="little")


def _unpack_bits(data: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of _pack_bits: [N, bytes] uint8 → [N, n] int64."""
    planes = np.unpackbits(data, axis=-1, count=n * bits, bitorder="little").reshape(data.shape[0], n, bits)
    return planes.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


@dataclass(frozen=True)
class PackedRows:
    """The packed layout for top-k rows of a vocabulary of `vocab` tokens. `exact` and `bins` are the layout
    (a cache always uses the defaults; other values serve benchmarks/cache_layouts.py, which chose them)."""

    k: int
    vocab: int
    exact: int = EXACT
    bins: tuple[tuple[int | None, int], ...] = BINS

    def __post_init__(self) -> None:
        if self.k < 1 or self.exact < 1 or any(not 1 <= bits <= 6 for _, bits in self.bins):
            raise ValueError(f"packed rows need k ≥ 1, exact ≥ 1 and 1–6 bits per bin: {self}")

    @cached_property
    def _ids(self) -> tuple[int, int, int, int, int]:
        b, radix, per_byte = _id_split(self.vocab)
        lo_bytes = -(-self.k * b // 8)
        hi_bytes = -(-self.k // per_byte) if per_byte else 0
        return b, radix, per_byte, lo_bytes, hi_bytes

    @cached_property
    def spans(self) -> list[tuple[int, int, int]]:
        """(first rank, end rank, bits) of each coded bin present at this k."""
        out, start = [], self.m
        for end, bits in self.bins:
            end = self.k if end is None else min(end, self.k)
            if end > start:
                out.append((start, end, bits))
                start = end
        return out

    @cached_property
    def row_bytes(self) -> int:
        b, radix, per_byte, lo_bytes, hi_bytes = self._ids
        coded = sum(1 + -(-(end - start) * bits // 8) for start, end, bits in self.spans)
        return lo_bytes + hi_bytes + 2 * self.m + coded

    @property
    def m(self) -> int:
        """How many log-probabilities are stored exactly (float16)."""
        return min(self.exact, self.k)

    # --------------------------------------------------------------------------------------------- encode

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
        """ids [N, k] (ints in [0, vocab)), logprobs [N, k] sorted non-increasing per row → [N, row_bytes]."""
        n, k = ids.shape
        assert k == self.k and logprobs.shape == ids.shape
        if (np.diff(logprobs, axis=1) > 1e-6).any():
            raise ValueError("packed top-k rows need log-probabilities sorted from the largest down")
        b, radix, per_byte, _, _ = self._ids
        ids = ids.astype(np.int64)
        parts = [_pack_bits(ids & ((1 << b) - 1), b)]
        if per_byte:
            hi = ids >> b  # [N, k] digits < radix
            pad = (-k) % per_byte
            hi = np.pad(hi, ((0, 0), (0, pad))).reshape(n, -1, per_byte)
            parts.append((hi @ (radix ** np.arange(per_byte, dtype=np.int64))).astype(np.uint8))
        lp = np.maximum(np.asarray(logprobs, dtype=np.float64), _FLOOR)
        m = self.m
        exact = lp[:, :m].astype(np.float16)
        parts.append(exact.view(np.uint8).reshape(n, 2 * m))
        prev = exact[:, -1].astype(np.float64) if m else np.zeros(n)
        for start, end, bits in self.spans:
            top = (1 << bits) - 1
            seg = lp[:, start:end]
            gaps = np.diff(np.concatenate([prev[:, None], seg], axis=1), axis=1)  # ≤ 0 up to the exact's rounding
            widest = np.maximum(-gaps.min(axis=1), 0.0) / top
            e = np.clip(np.ceil((np.log2(np.maximum(widest, 1e-30)) - _SCALE_MIN_LOG2) * 16), 0, 255).astype(np.int64)
            scale = _SCALES[e]
            codes = np.empty(seg.shape, dtype=np.int64)
            for j in range(seg.shape[1]):  # error diffusion: each code against the reconstructed previous value
                codes[:, j] = np.clip(np.rint((prev - seg[:, j]) / scale), 0, top)
                prev = prev - codes[:, j] * scale
            parts.append(e.astype(np.uint8)[:, None])
            parts.append(_pack_bits(codes, bits))
        out = np.concatenate(parts, axis=1)
        assert out.shape[1] == self.row_bytes
        return out

    # --------------------------------------------------------------------------------------------- decode

    def decode(self, rows: np.ndarray, tail: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[N, row_bytes] uint8 and the fp32 log tail masses [N] → ids [N, k] int64, logprobs [N, k] fp32
        (shifted per row so that the top-k and the tail hold all the mass; tail None: not shifted, l̂ as coded)
        and ok [N] bool: False where a row breaks what teachers/checks.py asks (an id past the vocabulary, a
        non-finite value, a tail mass above 1), found while decoding so that a clean batch needs no second
        pass. One compiled pass over the rows."""
        b, radix, per_byte, lo_bytes, hi_bytes = self._ids
        m, at = self.m, lo_bytes + hi_bytes
        exact = np.ascontiguousarray(rows[:, at:at + 2 * m]).view(np.float16).astype(np.float64)  # [N, m]
        bins = np.asarray(self.spans, dtype=np.int64).reshape(-1, 3)
        shift = tail is not None
        tail = np.zeros(len(rows)) if tail is None else np.asarray(tail, dtype=np.float64)
        ids, lp, ok = _decode(np.ascontiguousarray(rows), exact, tail, shift, self.k, b, per_byte, self._digits,
                              lo_bytes, at + 2 * m, bins, _SCALES, self.vocab, SLACK)
        return ids, lp, ok

    @cached_property
    def _digits(self) -> np.ndarray:
        """[256, g] the base-R digits of every byte value, << b (a table: no division while decoding)."""
        b, radix, per_byte, _, _ = self._ids
        values = np.arange(256, dtype=np.int64)[:, None] // radix ** np.arange(max(per_byte, 1)) % radix
        return np.ascontiguousarray(values << b)


@numba.njit(cache=True, nogil=True)
def _decode(rows: np.ndarray, exact: np.ndarray, tail: np.ndarray, renormalize: bool, k: int, b: int,
            per_byte: int, digits: np.ndarray, lo_bytes: int, coded_at: int, bins: np.ndarray, scales: np.ndarray,
            vocab: int, slack: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = rows.shape[0]
    ids = np.empty((n, k), dtype=np.int64)
    out = np.empty((n, k), dtype=np.float32)
    ok = np.ones(n, dtype=np.bool_)
    lp = np.empty(k, dtype=np.float64)
    codes = np.empty(k, dtype=np.int64)
    power = np.empty(64, dtype=np.float64)  # exp(−c·s) for the codes c of one bin
    for r in range(n):
        row = rows[r]
        buffer, held, at = 0, 0, 0  # a little-endian bit stream: refill whole bytes, take b bits at a time
        for j in range(k):
            while held < b:
                buffer |= np.int64(row[at]) << held
                at += 1
                held += 8
            ids[r, j] = buffer & ((1 << b) - 1)
            buffer >>= b
            held -= b
        if per_byte:
            for byte in range((k + per_byte - 1) // per_byte):
                value, first = row[lo_bytes + byte], byte * per_byte
                for t in range(min(per_byte, k - first)):
                    ids[r, first + t] += digits[value, t]
        for j in range(k):
            if ids[r, j] >= vocab:
                ok[r] = False
        # l̂, and Σ exp(l̂ − l̂_1) for the shift: in a bin of more ranks than codes, exp(l̂_j − l̂_1) is the
        # previous one times exp(−c_j·s) from a table of 2^bits entries, so a row costs ~40 exp, not k
        top, total, prev = exact[r, 0], 0.0, 0.0
        for j in range(exact.shape[1]):
            prev = exact[r, j]
            lp[j] = prev
            total += np.exp(prev - top)
            if not np.isfinite(prev):
                ok[r] = False
        at = coded_at
        for i in range(bins.shape[0]):
            start, end, bits = bins[i, 0], bins[i, 1], bins[i, 2]
            scale = scales[row[at]]
            buffer, held, byte = 0, 0, at + 1
            for j in range(start, end):  # prev runs in float64 as in the encoder
                if held < bits:
                    buffer |= np.int64(row[byte]) << held
                    byte += 1
                    held += 8
                codes[j] = buffer & ((1 << bits) - 1)
                prev -= codes[j] * scale
                buffer >>= bits
                held -= bits
                lp[j] = prev
            if renormalize:
                if (1 << bits) >= end - start:
                    for j in range(start, end):
                        total += np.exp(lp[j] - top)
                else:
                    for c in range(1 << bits):
                        power[c] = np.exp(-c * scale)
                    weight = np.exp(lp[start - 1] - top)
                    for j in range(start, end):
                        weight *= power[codes[j]]
                        total += weight
            at += 1 + ((end - start) * bits + 7) // 8
        shift = 0.0  # the shift that gives the top-k all the mass but the tail's: log(1 − e^tail) − logsumexp(l̂)
        if renormalize:
            if not (tail[r] <= slack):  # NaN included
                ok[r] = False
            shift = np.log(-np.expm1(min(tail[r], -1e-12))) - top - np.log(total)
            if not (top + shift <= slack):
                ok[r] = False
        for j in range(k):
            out[r, j] = lp[j] + shift
    return ids, out, ok
