"""Exact token alignment on offsets and vocabulary maps: hand-made cases, trained tokenizers, real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dualkd.align import exact_alignment
from dualkd.align.offsets import alignable, exact_alignment_many
from dualkd.align.vocab import shared_vocabulary, teacher_to_student_ids, token_bytes
from tests.helpers import needs_real_models, needs_shared_data


def _pairs(s, t) -> list[tuple[int, int]]:
    a, b = exact_alignment(s, t)
    assert a.dtype == b.dtype == torch.long and a.shape == b.shape
    return list(zip(a.tolist(), b.tolist()))


def test_identical_spans_are_paired_in_order() -> None:
    # "Hello world\nfoo": the student splits " world" in two, the teacher does not
    student = [(0, 5), (5, 8), (8, 11), (11, 12), (12, 15)]
    teacher = [(0, 0), (0, 5), (5, 11), (11, 12), (12, 15), (15, 15)]  # BOS and EOS have empty spans
    assert _pairs(student, teacher) == [(0, 1), (3, 3), (4, 4)]


def test_empty_spans_and_specials_never_align() -> None:
    assert _pairs([(0, 0), (3, 3)], [(0, 0), (3, 3)]) == []
    assert _pairs([], [(0, 1)]) == []


def test_split_multibyte_character_is_not_aligned() -> None:
    # byte-level BPE cut "東" (3 bytes) into two tokens that both report the character's span (4, 5)
    student = [(0, 4), (4, 5), (4, 5), (5, 9)]
    teacher = [(0, 4), (4, 5), (5, 9)]
    assert _pairs(student, teacher) == [(0, 0), (3, 2)]
    assert alignable(np.array(student)).tolist() == [True, False, False, True]


def test_overlapping_spans_are_not_aligned() -> None:
    # a token spanning (2, 6) overlaps (4, 8): neither is the other's text
    assert alignable(np.array([(0, 2), (2, 6), (4, 8), (8, 9)])).tolist() == [True, False, False, True]


def test_leading_space_conventions_differ_in_span() -> None:
    # one tokenizer includes the space in " world" (5, 11), the other trims it (6, 11): different text
    assert _pairs([(0, 5), (5, 11)], [(0, 5), (5, 6), (6, 11)]) == [(0, 0)]


def test_tensor_inputs_and_non_monotone_offsets() -> None:
    s = torch.tensor([[3, 6], [0, 3], [6, 9]])
    t = np.array([[0, 3], [3, 6], [6, 9]])
    assert _pairs(s, t) == [(0, 1), (1, 0), (2, 2)]
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        exact_alignment(torch.zeros(3), t)


def _random_offsets(rng: np.random.Generator, text_len: int) -> np.ndarray:
    """A tokenization of a text of `text_len` characters: random cut points, some tokens split into byte pieces
    that each report the whole character (shared spans), some empty specials; possibly non-monotone."""
    cuts = np.unique(np.concatenate([[0, text_len], rng.integers(0, text_len + 1, size=rng.integers(0, 12))]))
    spans = [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    out: list[tuple[int, int]] = []
    for a, b in spans:
        out += [(a, b)] * (2 if rng.random() < 0.15 else 1)
        if rng.random() < 0.1:
            out.append((b, b))
    arr = np.array(out, dtype=np.int64).reshape(-1, 2)
    if len(arr) > 2 and rng.random() < 0.1:
        arr[[0, 1]] = arr[[1, 0]]
    return arr


def _naive_alignment(s: list[tuple[int, int]], t: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The rules of align/offsets.py, written out: a token aligns when its span is non-empty and no other token
    of its sequence shares or overlaps it; pairs have identical spans."""
    def lonely(offsets: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
        real = [(i, a, b) for i, (a, b) in enumerate(offsets) if b > a]
        return {(a, b): i for i, a, b in real
                if not any(j != i and a2 < b and a < b2 for j, a2, b2 in real)}
    tl = lonely(t)
    return sorted((i, tl[span]) for span, i in lonely(s).items() if span in tl)


def test_compiled_alignment_is_the_naive_rule_as_a_tokenizer_gives_offsets() -> None:
    """The compiled pass on every input form a user has (list of tuples as `offset_mapping`, [1, n, 2] arrays
    as `return_tensors="np"`, tensors) equals the naive rule on random, sometimes non-monotone offsets."""
    rng = np.random.default_rng(1)
    for _ in range(400):
        n = int(rng.integers(1, 40))
        s, t = _random_offsets(rng, n), _random_offsets(rng, n)
        want = _naive_alignment([tuple(x) for x in s.tolist()], [tuple(x) for x in t.tolist()])
        assert _pairs([tuple(x) for x in s.tolist()], [tuple(x) for x in t.tolist()]) == want
        assert _pairs(s[None], torch.from_numpy(t)) == want
    assert _pairs([], [(0, 1)]) == [] and _pairs(np.zeros((1, 0, 2), dtype=np.int64), [(0, 1)]) == []


def test_batched_alignment_equals_one_example_at_a_time() -> None:
    """The alignment of many examples gives each example exactly what `exact_alignment` gives it, empty
    responses included."""
    rng = np.random.default_rng(0)
    students, teachers = [], []
    for _ in range(600):
        n = int(rng.integers(0, 40))
        students.append(_random_offsets(rng, n) if n else np.zeros((0, 2), dtype=np.int64))
        teachers.append(_random_offsets(rng, n) if n and rng.random() > 0.05 else np.zeros((0, 2), dtype=np.int64))
    got = exact_alignment_many(students, teachers)
    assert len(got) == 600
    aligned = 0
    for s, t, (si, ti) in zip(students, teachers, got):
        want_s, want_t = exact_alignment(s, t)
        assert si.tolist() == want_s.tolist() and ti.tolist() == want_t.tolist()
        aligned += len(si)
    assert aligned > 100  # pairs were found (random cuts of one text share a span now and then)


def test_trained_tokenizers_of_two_families(byte_tokenizer_dir: Path, meta_tokenizer_dir: Path,
                                            corpus_texts: list[str]) -> None:
    """Byte-level BPE vs SentencePiece-style BPE trained here: aligned pairs always decode to the same text."""
    s_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    t_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    texts = corpus_texts[:200] + ["naïve café — 東京 ✓\nnew line", "  two  spaces", "tab\there"]
    s_enc = s_tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    t_enc = t_tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    total = aligned = 0
    for text, sid, so, tid, to in zip(texts, s_enc["input_ids"], s_enc["offset_mapping"],
                                      t_enc["input_ids"], t_enc["offset_mapping"]):
        a, b = exact_alignment(so, to)
        total += len(sid)
        aligned += len(a)
        for i, j in zip(a.tolist(), b.tolist()):
            assert so[i] == to[j]
            assert s_tok.decode([sid[i]]) == text[so[i][0]:so[i][1]]
            assert t_tok.decode([tid[j]]).lstrip("▁") == text[to[j][0]:to[j][1]].lstrip(" ")
    assert aligned / total > 0.5


def test_token_bytes_and_maps_on_trained_tokenizers(byte_tokenizer_dir: Path, meta_tokenizer_dir: Path) -> None:
    s_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    t_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    assert sb[s_tok.eos_token_id] is None and tb[t_tok.eos_token_id] is None  # specials have no text
    nl = s_tok("\n", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1 and sb[nl[0]] == b"\n"  # byte-level spells it Ċ
    byte_piece = t_tok.convert_tokens_to_ids("<0x0A>")
    assert tb[byte_piece] == b"\n"
    to_student = teacher_to_student_ids(s_tok, t_tok)
    assert to_student.shape == (len(t_tok),)
    assert to_student[t_tok.eos_token_id] == s_tok.eos_token_id
    for t_id in torch.nonzero(to_student >= 0).squeeze(1).tolist():
        if t_id != t_tok.eos_token_id:
            assert tb[t_id] == sb[int(to_student[t_id])]
    s_ids, t_ids = shared_vocabulary(s_tok, t_tok)
    assert len(set(s_ids.tolist())) == len(s_ids) > 100
    same_s, same_t = shared_vocabulary(s_tok, s_tok)
    assert torch.equal(same_s, same_t)  # one tokenizer: id for id


@pytest.mark.slow
def test_real_tokenizers_on_dolly_outputs() -> None:
    """SmolLM2 vs Gemma-3 on the 500 Dolly test outputs: ~91% of SmolLM2 tokens have an exact partner and
    every aligned pair decodes to identical text."""
    models = needs_real_models()
    data = needs_shared_data()
    s_tok = AutoTokenizer.from_pretrained(models / "smollm2-135m-instruct")
    t_tok = AutoTokenizer.from_pretrained(models / "gemma-3-270m")
    outputs = [json.loads(line)["output"] for line in (data / "dolly" / "test.jsonl").read_text().splitlines()]
    outputs = [o if isinstance(o, str) else o[0] for o in outputs]
    s_enc = s_tok(outputs, add_special_tokens=False, return_offsets_mapping=True)
    t_enc = t_tok(outputs, add_special_tokens=False, return_offsets_mapping=True)
    total = aligned = 0
    for sid, so, tid, to in zip(s_enc["input_ids"], s_enc["offset_mapping"], t_enc["input_ids"],
                                t_enc["offset_mapping"]):
        a, b = exact_alignment(so, to)
        total += len(sid)
        aligned += len(a)
        for i, j in zip(a.tolist(), b.tolist()):
            assert s_tok.decode([sid[i]]) == t_tok.decode([tid[j]])
    assert 0.88 < aligned / total < 0.95, aligned / total
    s_ids, _ = shared_vocabulary(s_tok, t_tok)
    assert len(s_ids) > 40000  # most SmolLM2 tokens exist byte for byte in Gemma-3's vocabulary


# ------------------------------------------------------------------------------------------- MinED


def _naive_dtw_cost(c: np.ndarray) -> float:
    n, m = c.shape
    D = [[float("inf")] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = float(c[i - 1, j - 1]) + min(D[i - 1][j], D[i][j - 1], D[i - 1][j - 1])
    return D[n][m]


def test_batched_dtw_matches_the_naive_recursion() -> None:
    from dualkd.align.mined import dtw_paths

    rng = np.random.default_rng(0)
    costs = [rng.integers(0, 6, size=(rng.integers(1, 25), rng.integers(1, 25))).astype(np.float32)
             for _ in range(120)]
    for c, path in zip(costs, dtw_paths(costs)):
        assert path[0] == (0, 0) and path[-1] == (c.shape[0] - 1, c.shape[1] - 1)
        steps = {(b[0] - a[0], b[1] - a[1]) for a, b in zip(path, path[1:])}
        assert steps <= {(1, 0), (0, 1), (1, 1)}
        assert sum(float(c[i, j]) for i, j in path) == pytest.approx(_naive_dtw_cost(c))


def test_mined_alignment_one_to_one_only() -> None:
    from dualkd.align.mined import mined_alignment

    student = [["The", "cat", "sat"], ["hello", "world"], []]
    teacher = [["The", "cat", "sat"], ["hel", "lo", "world"], ["x"]]
    same, split, empty = mined_alignment(student, teacher)
    assert same.tolist() == [0, 1, 2]
    assert split.tolist() == [-1, 2]  # "hello" spans two teacher tokens: not aligned
    assert empty.tolist() == []


def test_nearest_token_ids(byte_tokenizer_dir: Path, meta_tokenizer_dir: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from dualkd.align.mined import nearest_token_ids, token_texts

    monkeypatch.setenv("DUALKD_CACHE", str(tmp_path))
    s_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    t_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    to_student = nearest_token_ids(t_tok, s_tok)
    exact = teacher_to_student_ids(s_tok, t_tok)
    mapped = exact >= 0
    assert torch.equal(to_student[mapped], exact[mapped])  # exact partners kept
    specials = [i for i in t_tok.all_special_ids if i != t_tok.eos_token_id]
    assert (to_student[specials] == -1).all()
    assert (to_student[~mapped & (torch.arange(len(t_tok)) != t_tok.eos_token_id)].ge(0)).sum() > 0
    s_text, t_text = token_texts(s_tok), token_texts(t_tok)
    from rapidfuzz.distance import Levenshtein

    for i in torch.nonzero(~mapped).squeeze(1).tolist()[:50]:
        j = int(to_student[i])
        if j >= 0:  # nothing in the student vocabulary is closer
            best = min(Levenshtein.distance(t_text[i], x) for x in s_text if x)
            assert Levenshtein.distance(t_text[i], s_text[j]) == best
    assert list(tmp_path.rglob("*.npy"))  # cached
    assert torch.equal(nearest_token_ids(t_tok, s_tok), to_student)
