"""X-Token against the formulas of methods/xtoken.py's and align/projection.py's docstrings, in float64, dense,
one chunk at a time:

    chunks: span_groups on each example's response token spans (EOS and empty spans left out)
    P-KL  per chunk  Σ e^{t̄}(t̄ − log(q̂ + ε)),  q̂ = q̄ / (Σ q̄ + ε),
          q̄ = mean_i softmax(z_s,i/τ)·W,  t̄ = mean_j log_softmax(z_t,j/τ)
    H-KL  per chunk  Σ_pairs e^{t̄_t}(t̄_t − s̄_s) + Σ_k |sort↓ e^{s̄}[U_s] − sort↓ e^{t̄}[U_t]|_k (first m)
    L = (1 − r)·CE/n + r·τ²·Σ_chunks / chunks

W comes from the objective (a dense [V_s, V_t] matrix); the projection's own rules are checked against a plain
dictionary build of them below.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dualkd.align.groups import span_groups
from dualkd.align.projection import _decay, xtoken_projection
from dualkd.align.vocab import shared_vocabulary
from tests.helpers import student_run
from tests.methods.harness import assert_is_its_formula, build64, ce, forward, implementation

EPS = 1e-10


def _groups_of(tokens, b: int) -> list[tuple[int, tuple[int, int]]]:
    """(position, span) of each response token with a non-empty span, for example b."""
    pos = [p for p in range(tokens.loss_mask.shape[1]) if tokens.loss_mask[b, p]]
    spans = [tuple(tokens.offsets[b, p + 1].tolist()) for p in pos]
    return [(p, s) for p, s in zip(pos, spans) if s[1] > s[0]]


def _exact_pairs(w: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Each student row's largest entry if ≥ threshold; a teacher token claimed twice goes to the larger entry,
    then to the lower student id."""
    best: dict[int, tuple[float, int]] = {}
    for s in range(w.shape[0]):
        value, t = w[s].max(0)
        if float(value) >= threshold:
            key = (float(value), -s)
            if int(t) not in best or key > (best[int(t)][0], -best[int(t)][1]):
                best[int(t)] = (float(value), s)
    return sorted((s, t) for t, (_, s) in best.items())


def xtoken_twin(parts, batch) -> torch.Tensor:
    cfg = parts.objective.config
    s_tok = batch.student
    t_tok = batch.teacher if batch.teacher is not None else s_tok
    v_s, v_t = parts.objective.v_s, parts.objective.v_t
    w = parts.objective.projection.dense(v_t).double()  # [V_s, V_t]
    z_s = forward(parts.student, s_tok)[0][..., :v_s]
    with torch.no_grad():
        z_t = forward(parts.teacher.model, t_tok)[0][..., :v_t]
    tau = cfg.temperature
    pairs = _exact_pairs(w, cfg.exact_threshold)
    c_s = [s for s, _ in pairs]
    c_t = [t for _, t in pairs]
    u_s = [v for v in range(v_s) if v not in set(c_s)]
    u_t = [v for v in range(v_t) if v not in set(c_t)]
    kd = torch.zeros((), dtype=torch.float64)
    chunks = 0
    for b in range(len(batch.indices)):
        s_list, t_list = _groups_of(s_tok, b), _groups_of(t_tok, b)
        for s_g, t_g in span_groups([s for _, s in s_list], [s for _, s in t_list]):
            chunks += 1
            s_pos = [s_list[k][0] for k in s_g]
            t_pos = [t_list[k][0] for k in t_g]
            t_bar = torch.stack([torch.log_softmax(z_t[b, p] / tau, -1) for p in t_pos]).mean(0)
            if cfg.loss == "pkl":
                q_bar = torch.stack([torch.softmax(z_s[b, p] / tau, -1) @ w for p in s_pos]).mean(0)
                log_q = torch.log(q_bar / (q_bar.sum() + EPS) + EPS)
                kd = kd + (t_bar.exp() * (t_bar - log_q)).sum()
            else:
                s_bar = torch.stack([torch.log_softmax(z_s[b, p] / tau, -1) for p in s_pos]).mean(0)
                kd = kd + (t_bar[c_t].exp() * (t_bar[c_t] - s_bar[c_s])).sum()
                m = min(len(u_s), len(u_t), cfg.uncommon_top_k)
                a = s_bar[u_s].exp().sort(descending=True).values[:m]
                c = t_bar[u_t].exp().sort(descending=True).values[:m]
                kd = kd + (a - c).abs().sum()
    m = s_tok.loss_mask
    r = cfg.kd_rate
    return (1 - r) * ce(z_s[m], s_tok.labels[m]) / m.sum() + r * tau**2 * kd / chunks


@pytest.mark.parametrize("objective", [
    {"name": "xtoken"},
    {"name": "xtoken", "temperature": 2.0, "kd_rate": 0.8, "top_k": 2},
    {"name": "xtoken", "loss": "hkl"},
    {"name": "xtoken", "loss": "hkl", "temperature": 2.0, "exact_threshold": 0.3, "uncommon_top_k": 40},
], ids=["pkl", "pkl-t2-top2", "hkl", "hkl-t2-threshold-tail"])
def test_xtoken_across_tokenizers_is_its_formula(objective: dict, tmp_path: Path, train_file: Path,
                                                byte_tokenizer_dir: Path, cross_teacher: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, objective), tmp_path)
    batch = parts.train_set.collate(list(range(8)))
    groups = parts.objective.teacher_forward(parts.teacher, batch).student
    assert (torch.diff(groups.bounds) > 1).any()  # multi-token chunks: the averages are tested
    w = parts.objective.projection.dense(parts.objective.v_t)
    assert ((w > 0).sum(1) > 1).any()  # rows spread over several teacher tokens: the projection is tested
    assert_is_its_formula(parts, xtoken_twin)


def test_slices_change_nothing(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                               cross_teacher: Path) -> None:
    for loss in ("pkl", "hkl"):
        results = []
        for chunk in (None, 1, 7):
            out = tmp_path / f"{loss}-{chunk}"
            parts = build64(student_run(out, train_file, byte_tokenizer_dir, cross_teacher,
                                        {"name": "xtoken", "loss": loss, "chunk_size": chunk}), out)
            results.append(implementation(parts, [list(range(8))]))
        for value, grads in results[1:]:
            torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=0.0)
            for k in grads:
                torch.testing.assert_close(grads[k], results[0][1][k], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ the projection's rules


def _projection_twin(student, teacher, top_k: int = 4) -> torch.Tensor:
    """align/projection.py's rules written out on dictionaries: a dense [V_s, V_t] W."""
    ignored = ("<|endoftext|>", "<eos>")
    counts: dict[tuple[int, int], float] = defaultdict(float)

    def walk(source, target, student_side: bool) -> None:
        skip_s = {source.convert_tokens_to_ids(t) for t in ignored if t in source.get_vocab()}
        skip_t = {target.convert_tokens_to_ids(t) for t in ignored if t in target.get_vocab()}
        for i in range(len(source)):
            text = source.decode([i])
            if i in skip_s or (text.startswith("<|") and text.endswith("|>")):
                continue
            ids = target.encode(text, add_special_tokens=False)
            if not ids or any(t in skip_t for t in ids):
                continue
            ids = ids[:4]
            raw = [0.9 * 0.1**k for k in range(len(ids))]
            for t, x in zip(ids, raw):
                counts[(i, t) if student_side else (t, i)] += x / sum(raw)

    walk(student, teacher, True)
    walk(teacher, student, False)
    for s, s_text in zip(student.all_special_ids, student.all_special_tokens):
        for t, t_text in zip(teacher.all_special_ids, teacher.all_special_tokens):
            wa = {x for x in re.sub(r"[<>|_]", " ", s_text.lower()).split() if len(x) > 2}
            wb = {x for x in re.sub(r"[<>|_]", " ", t_text.lower()).split() if len(x) > 2}
            sim = 0.6 * difflib.SequenceMatcher(None, s_text, t_text).ratio() + \
                0.4 * (len(wa & wb) / len(wa | wb) if wa or wb else 0.0)
            if sim >= 0.3:
                counts[(s, t)] += 0.8 * sim
    w = torch.zeros(len(student), len(teacher), dtype=torch.float64)
    for (s, t), x in counts.items():
        w[s, t] = x
    s_ids, t_ids = shared_vocabulary(student, teacher)
    w[s_ids] = 0.0
    w[s_ids, t_ids] = 1.0
    out = torch.zeros_like(w)
    for s in range(w.shape[0]):
        row = sorted(((float(x), t) for t, x in enumerate(w[s]) if x > 0), key=lambda e: (-e[0], e[1]))[:top_k]
        total = sum(x for x, _ in row)
        for x, t in row:
            out[s, t] = x / total
    return out


def test_projection_follows_its_rules(byte_tokenizer_dir: Path, meta_tokenizer_dir: Path) -> None:
    student = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    teacher = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    proj = xtoken_projection(student, teacher)
    w = proj.dense(len(teacher)).double()
    torch.testing.assert_close(w, _projection_twin(student, teacher), rtol=1e-6, atol=1e-7)
    rows = w.sum(1)
    assert ((rows - 1).abs() < 1e-6).logical_or(rows == 0).all()  # a row sums to 1 or projects nothing
    assert ((w > 0).sum(1) <= 4).all()
    s_ids, t_ids = shared_vocabulary(student, teacher)
    assert (w[s_ids, t_ids] == 1).all()  # exact pairs are one-hot
    p = torch.softmax(torch.randn(3, len(student), dtype=torch.float64), -1)
    torch.testing.assert_close(proj.project(p, len(teacher)), p @ proj.dense(len(teacher)).double())


def test_a_token_split_in_two_spreads_by_the_decay() -> None:
    """Two-token re-encodings weigh 0.9 : 0.09 (0.909 and 0.091 after normalizing), before the reverse walk
    adds its own entries: checked on the raw rule."""
    assert _decay(1) == [1.0]
    torch.testing.assert_close(torch.tensor(_decay(2)), torch.tensor([0.9 / 0.99, 0.09 / 0.99]))
