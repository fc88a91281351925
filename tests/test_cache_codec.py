"""The packed top-k encoding of the teacher cache (teachers/cache_codec.py): ids round-trip exactly for every
vocabulary size, the compiled decoder equals a naive one written from the docstring, each log-probability stays
within its bin's step of the truth, the rows hold all the mass with the tail, and the bytes are what the docstring
says. The cache-level tests (old formats, damage, training from it) are in test_teacher_cache.py and
test_non_finite.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from dualkd.teachers.cache_codec import BINS, EXACT, PackedRows, _id_split


def _rows(n: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n top-k rows of random peaked distributions over `vocab` tokens: ids, sorted log-probs, log tail mass."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4
    logp = torch.log_softmax(logits, -1)
    top, ids = logp.topk(k, -1)
    covered = torch.logsumexp(top, -1).clamp(max=0)
    tail = torch.log((-torch.expm1(covered)).clamp(min=1e-12))
    return ids.numpy(), top.numpy(), tail.numpy().astype(np.float32)


def _naive_decode(codec: PackedRows, row: np.ndarray, tail: float | None) -> tuple[list[int], list[float]]:
    """One row, read bit by bit as the module docstring lays it out."""
    k, vocab = codec.k, codec.vocab
    b, radix, per_byte = _id_split(vocab)
    bits = "".join(format(int(byte), "08b")[::-1] for byte in row)  # little-endian bit order within each byte

    def field(start: int, width: int) -> int:
        return sum(int(bits[start + i]) << i for i in range(width))

    ids = [field(j * b, b) for j in range(k)]
    at = -(-k * b // 8)
    if per_byte:
        for j in range(k):
            digit = int(row[at + j // per_byte]) // radix ** (j % per_byte) % radix
            ids[j] += digit << b
        at += -(-k // per_byte)
    lp = [struct.unpack("<e", bytes(row[at + 2 * j:at + 2 * j + 2]))[0] for j in range(codec.m)]
    at += 2 * codec.m
    for start, end, width in codec.spans:
        scale = 2.0 ** (int(row[at]) / 16 - 12)
        for j in range(start, end):
            lp.append(lp[-1] - field(8 * (at + 1) + (j - start) * width, width) * scale)
        at += 1 + -(-(end - start) * width // 8)
    assert at == len(row)
    if tail is not None:
        top_mass = np.log(-np.expm1(min(tail, -1e-12)))
        shift = top_mass - np.logaddexp.reduce(np.asarray(lp))
        lp = [x + shift for x in lp]
    return ids, lp


@pytest.mark.parametrize("vocab", [2, 50, 256, 257, 400, 32000, 49152, 65536, 65537, 151936, 262144])
def test_ids_round_trip_for_every_vocabulary(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    for k in (1, 3, 4, 5, 16, 33, 128):
        k = min(k, vocab)
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(7)])
        ids[0, 0] = vocab - 1  # the largest id
        lp = np.sort(-rng.exponential(2.0, (7, k)), axis=1)[:, ::-1]
        codec = PackedRows(k, vocab)
        rows = codec.encode(ids, lp)
        assert rows.shape == (7, codec.row_bytes) and rows.dtype == np.uint8
        assert np.array_equal(codec.decode(rows, None)[0], ids), (vocab, k)


def test_the_id_split_spends_the_fewest_bits() -> None:
    assert _id_split(49152) == (14, 3, 5)  # 14 + 8/5 = 15.6 bits, below 16
    assert _id_split(65536) == (16, 1, 0)  # a power of two: plain
    assert _id_split(262144) == (18, 1, 0)
    for vocab in (2, 50, 257, 400, 32000, 49152, 151936):
        b, radix, per_byte = _id_split(vocab)
        assert radix << b >= vocab and (per_byte == 0 or radix ** per_byte <= 256)
        assert b + (8 / per_byte if per_byte else 0) <= np.ceil(np.log2(vocab))


@pytest.mark.parametrize("k,vocab", [(128, 49152), (64, 400), (16, 262144), (4, 400), (3, 50), (200, 1000)])
def test_the_compiled_decoder_is_the_naive_one(k: int, vocab: int) -> None:
    ids, lp, tail = _rows(6, k, vocab, seed=k)
    codec = PackedRows(k, vocab)
    rows = codec.encode(ids, lp)
    for shifted in (False, True):
        got_ids, got_lp, ok = codec.decode(rows, tail if shifted else None)
        assert ok.all()
        for r in range(len(rows)):
            want_ids, want_lp = _naive_decode(codec, rows[r], float(tail[r]) if shifted else None)
            assert got_ids[r].tolist() == want_ids
            np.testing.assert_allclose(got_lp[r], want_lp, rtol=0, atol=2e-5)


def test_every_log_probability_stays_within_its_bin_step() -> None:
    ids, lp, tail = _rows(200, 128, 49152)
    codec = PackedRows(128, 49152)
    rows = codec.encode(ids, lp)
    raw = codec.decode(rows, None)[1].astype(np.float64)
    np.testing.assert_allclose(raw[:, :EXACT], lp[:, :EXACT].astype(np.float16), rtol=0, atol=1e-6)
    at = codec.row_bytes
    for start, end, bits in reversed(codec.spans):  # each bin's scale byte sits before its codes
        at -= 1 + -(-(end - start) * bits // 8)
        scale = 2.0 ** (rows[:, at].astype(np.float64) / 16 - 12)
        err = np.abs(raw[:, start:end] - lp[:, start:end])
        assert (err <= scale[:, None] + 1e-6).all(), (start, float((err / scale[:, None]).max()))
        assert (err <= scale[:, None] / 2 + 1e-6).mean() > 0.99  # the step is ±s/2 unless a code saturates
    assert (np.diff(raw, axis=1) <= 1e-9).all()  # non-increasing by construction


def test_decoded_rows_hold_all_the_mass_and_stay_close_to_the_truth() -> None:
    ids, lp, tail = _rows(300, 128, 49152, seed=3)
    codec = PackedRows(128, 49152)
    got_ids, got, ok = codec.decode(codec.encode(ids, lp), tail)
    assert ok.all() and np.array_equal(got_ids, ids)
    total = np.exp(got.astype(np.float64)).sum(1) + np.exp(tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    # forward KL between the true and the decoded buckets (top-k + tail): tiny against the entropy
    p, q = np.exp(lp), np.exp(got.astype(np.float64))
    kl = (p * (lp - np.log(q))).sum(1)
    assert np.abs(kl).mean() < 2e-3 and np.abs(kl).max() < 2e-2


def test_bytes_per_row() -> None:
    # SmolLM2's vocabulary at k = 128: 250 bytes of ids + 8 exact + 4 bins (1 + 9, 1 + 8, 1 + 8, 1 + 8)
    assert PackedRows(128, 49152).row_bytes == 295  # + the 4-byte tail = 299 bytes per token, plain float16 516
    assert PackedRows(128, 262144).row_bytes == 333  # plain: 772
    assert [end for end, _ in BINS][-1] is None


def test_unsorted_log_probabilities_are_refused() -> None:
    ids, lp, _ = _rows(2, 8, 50)
    with pytest.raises(ValueError, match="sorted"):
        PackedRows(8, 50).encode(ids, lp[:, ::-1])


def test_the_decoder_flags_the_rows_the_checks_refuse() -> None:
    """A damaged row is flagged while decoding (the cache reader then lets teachers/checks.py name it)."""
    from dualkd.teachers.checks import TeacherOutputError, check_topk

    ids, lp, tail = _rows(5, 8, 400)
    codec = PackedRows(8, 400)  # ids 8 x 9 bits = 9 bytes, then the 4 exact float16
    rows = codec.encode(ids, lp)
    rows[1, :2] = 0xFF  # the first id 511: past the vocabulary
    rows[2, 9:11] = np.array([0x00, 0x7E], dtype=np.uint8)  # the first exact log-probability a NaN
    tail[3] = np.nan
    tail[4] = 0.5  # a tail mass above 1
    got_ids, got, ok = codec.decode(rows, tail)
    assert ok.tolist() == [True, False, False, False, False]
    for r in range(1, 5):
        with pytest.raises(TeacherOutputError):
            check_topk(got_ids[r:r + 1], got[r:r + 1], tail[r:r + 1], k=8, vocab_size=400, where="row")
