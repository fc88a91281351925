"""GOLD's cross-tokenizer loss against the formula of methods/gold.py's docstring, in float64, dense, one group
at a time:

    groups: span_groups on each example's response token spans (EOS and empty spans left out)
    P_g(v) = p(v | last position) · Π p(earlier tokens)      (p = softmax(z/τ) over each tokenizer's tokens)
    per group  w·JSD_β(P_t[S_t], P_s[S_s]) + (1 − w)·Σ|sort↓ P_s[U_s] − sort↓ P_t[U_t]|,  w = |S|/V_t or fixed
    L = (1 − r)·CE/n + r·Σ_groups/n
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualkd.align.groups import span_groups
from dualkd.align.vocab import shared_vocabulary
from tests.helpers import student_run
from tests.methods.harness import assert_is_its_formula, build64, ce, forward, implementation


def _groups_of(tokens, b: int) -> list[tuple[list[int], list[int]]]:
    """(positions, labels) of each response token with a non-empty span, for example b."""
    pos = [p for p in range(tokens.loss_mask.shape[1]) if tokens.loss_mask[b, p]]
    spans = [tuple(tokens.offsets[b, p + 1].tolist()) for p in pos]
    return [(p, s) for p, s in zip(pos, spans) if s[1] > s[0]]


def _jsd(ps: torch.Tensor, pt: torch.Tensor, beta: float) -> torch.Tensor:
    a_s, a_t = ps.clamp(min=1e-8), pt.clamp(min=1e-8)
    if beta == 0:
        return (a_t * (a_t.log() - a_s.log())).sum()
    if beta == 1:
        return (a_s * (a_s.log() - a_t.log())).sum()
    m = beta * a_t + (1 - beta) * a_s
    return beta * (a_t * (a_t.log() - m.log())).sum() + (1 - beta) * (a_s * (a_s.log() - m.log())).sum()


def gold_twin(parts, batch) -> torch.Tensor:
    cfg = parts.objective.config
    s_tok = batch.student
    t_tok = batch.teacher if batch.teacher is not None else s_tok
    v_s, v_t = len(parts.student_tokenizer), len(parts.teacher_tokenizer)
    z_s = forward(parts.student, s_tok)[0][..., :v_s]
    with torch.no_grad():
        z_t = forward(parts.teacher.model, t_tok)[0][..., :v_t]
    p_s, p_t = torch.softmax(z_s / cfg.temperature, -1), torch.softmax(z_t / cfg.temperature, -1)
    s_ids, t_ids = shared_vocabulary(parts.student_tokenizer, parts.teacher_tokenizer)
    keep = (s_ids < v_s) & (t_ids < v_t)
    s_ids, t_ids = s_ids[keep], t_ids[keep]
    u_s = torch.tensor([v for v in range(v_s) if v not in set(s_ids.tolist())], dtype=torch.long)
    u_t = torch.tensor([v for v in range(v_t) if v not in set(t_ids.tolist())], dtype=torch.long)
    w = (cfg.shared_weight, cfg.unshared_weight) if cfg.shared_weight is not None else \
        (len(s_ids) / v_t, 1 - len(s_ids) / v_t)

    def merged(p, tokens, b, positions):
        out = p[b, positions[-1]].clone()
        for q in positions[:-1]:
            out = out * p[b, q, tokens.labels[b, q]]
        return out

    kd = torch.zeros((), dtype=torch.float64)
    for b in range(len(batch.indices)):
        s_list, t_list = _groups_of(s_tok, b), _groups_of(t_tok, b)
        for s_g, t_g in span_groups([s for _, s in s_list], [s for _, s in t_list]):
            ps = merged(p_s, s_tok, b, [s_list[k][0] for k in s_g])
            pt = merged(p_t, t_tok, b, [t_list[k][0] for k in t_g])
            shared = _jsd(ps[s_ids], pt[t_ids], cfg.beta)
            a = ps[u_s].sort(descending=True).values
            c = pt[u_t].sort(descending=True).values
            width = max(len(a), len(c))
            a, c = torch.nn.functional.pad(a, (0, width - len(a))), torch.nn.functional.pad(c, (0, width - len(c)))
            kd = kd + w[0] * shared + w[1] * (a - c).abs().sum()
    m = s_tok.loss_mask
    n = m.sum()
    r = cfg.kd_rate
    return (1 - r) * ce(z_s[m], s_tok.labels[m]) / n + r * kd / n


@pytest.mark.parametrize("objective", [
    {"name": "gold"},
    {"name": "gold", "temperature": 2.0, "beta": 0.0, "kd_rate": 0.8},
    {"name": "gold", "beta": 1.0, "shared_weight": 0.3, "unshared_weight": 2.0},
], ids=["default", "t2-kl", "fixed-weights"])
def test_gold_across_tokenizers_is_its_formula(objective: dict, tmp_path: Path, train_file: Path,
                                              byte_tokenizer_dir: Path, cross_teacher: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, objective), tmp_path)
    batch = parts.train_set.collate(list(range(8)))
    groups = parts.objective.teacher_forward(parts.teacher, batch).student
    sizes = torch.diff(groups.bounds)
    assert (sizes > 1).any()  # multi-token groups: the merge is tested
    assert_is_its_formula(parts, gold_twin)


def test_gold_with_one_tokenizer_is_generalized_jsd(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                    teacher_dir: Path) -> None:
    """One tokenizer: every group one token, S the whole vocabulary but the added specials other than EOS, which
    have no text (w ≈ 1: nearly GOLD's plain JSD)."""
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, {"name": "gold"}), tmp_path)
    assert 0.99 < parts.objective.weights[0] < 1.0
    assert_is_its_formula(parts, gold_twin)


def test_chunks_change_nothing(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                               cross_teacher: Path) -> None:
    results = []
    for chunk in (None, 1, 7):
        parts = build64(student_run(tmp_path / str(chunk), train_file, byte_tokenizer_dir, cross_teacher,
                                    {"name": "gold", "chunk_size": chunk}), tmp_path / str(chunk))
        results.append(implementation(parts, [list(range(8))]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=0.0)
        for k in grads:
            torch.testing.assert_close(grads[k], results[0][1][k], rtol=1e-9, atol=1e-12)


def test_span_groups_cut_at_shared_boundaries() -> None:
    # "ab cd": student a|b| c|d, teacher ab| cd ; byte pieces of one character (same span) stay together
    assert span_groups([(0, 1), (1, 2), (2, 4), (4, 5)], [(0, 2), (2, 5)]) == [([0, 1], [0]), ([2, 3], [1])]
    assert span_groups([(0, 3), (0, 3), (3, 4)], [(0, 3), (3, 4)]) == [([0, 1], [0]), ([2], [1])]
    assert span_groups([(0, 2), (2, 6)], [(0, 2), (2, 4)]) == [([0], [0])]  # a truncated side: no shared end
    assert span_groups([(1, 2)], [(0, 2)]) == []  # the sides start at different characters
    assert span_groups([], [(0, 1)]) == []
    assert math.isfinite(len(span_groups([(0, 1)], [(0, 1)])))
