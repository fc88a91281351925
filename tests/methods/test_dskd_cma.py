"""DSKD with cross-model attention, versions 1 and 2 (and `dskdv2` with `alignment: cma`, which is version 2),
against the formula of methods/dskd_cma.py's docstring, in float64. The twin works one sequence at a time
on its response positions only, so masks and padding never enter it:

    Q = P_query([e_s(x); e_s(y)])    K = N([e_t(x_t); e_t(y_t)])    A = softmax(Q Kᵀ / sqrt(2 d_t))
    h_t2s = A · P_t2s(N(h_t) + N(e_t(v_t)))   v_t = y_t (v1) or argmax z_t (v2)     h_s2t = softmax(Aᵀ) · P_s2t(h_s)
    L = (1 - r)·CE(z_s, y)/n + r·( Σ_{argmax z_t2s = y} D(z_t2s / τ_t ‖ z_s)/n + CE(z_t2s, y)/n + D_t(z_t ‖ z_s2t)/n_t )
    N(x) = x / std(x) over the sequence's response positions
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualkd.align.vocab import shared_vocabulary
from tests.helpers import student_run
from tests.methods.harness import (
    assert_is_its_formula,
    build64,
    ce,
    divergence,
    forward,
    head,
    implementation,
)


def cma_twin(parts, batch) -> torch.Tensor:
    obj = parts.objective
    cfg = obj.config
    v2 = cfg.version == 2
    s_tok, t_tok = batch.student, batch.teacher
    z_s_all, h_s_all = forward(parts.student, s_tok)
    with torch.no_grad():
        z_t_all, h_t_all = forward(parts.teacher.model, t_tok)
    e_s, e_t = parts.student.get_input_embeddings().weight.detach(), parts.teacher.model.get_input_embeddings().weight
    w_s, b_s = head(parts.student)
    w_t, b_t = head(parts.teacher.model)
    w_fixed, b_fixed = w_s.detach(), (b_s.detach() if b_s is not None else 0)
    if v2:  # P_s2t = W_s[V']ᵀ pinv(W_t[V']ᵀ) over the shared vocabulary
        student_ids, teacher_ids = shared_vocabulary(parts.student_tokenizer, parts.teacher_tokenizer)
        s2t = lambda h: h @ (w_fixed[student_ids].T @ torch.linalg.pinv(w_t[teacher_ids].T))  # noqa: E731
    else:
        s2t = obj.s2t
    tau, tau_t, r = cfg.temperature, cfg.teacher_temperature, cfg.kd_rate
    n, n_t = s_tok.loss_mask.sum(), t_tok.loss_mask.sum()
    loss = 0.0
    for b in range(len(batch.indices)):
        s_pos = torch.nonzero(s_tok.loss_mask[b]).squeeze(1)
        t_pos = torch.nonzero(t_tok.loss_mask[b]).squeeze(1)
        x_s, y = s_tok.input_ids[b, s_pos], s_tok.labels[b, s_pos]
        x_t, y_t = t_tok.input_ids[b, t_pos], t_tok.labels[b, t_pos]
        z_s, h_s = z_s_all[b, s_pos], h_s_all[b, s_pos]
        z_t, h_t = z_t_all[b, t_pos], h_t_all[b, t_pos]
        v_t = z_t.argmax(-1) if v2 else y_t
        query = obj.query(torch.cat([e_s[x_s], e_s[y]], -1))
        key = torch.cat([e_t[x_t], e_t[y_t]], -1)
        key = key / key.std()
        attn = query @ key.T / math.sqrt(key.shape[-1])  # [S, T]
        h_t2s = torch.softmax(attn, -1) @ obj.t2s(h_t / h_t.std() + e_t[v_t] / e_t[v_t].std())
        h_s2t = torch.softmax(attn.T, -1) @ s2t(h_s)
        z_t2s = h_t2s @ w_fixed.T + b_fixed
        z_s2t = h_s2t @ w_t.T + (b_t if b_t is not None else 0)
        agree = z_t2s.argmax(-1) == y
        kd_student = divergence(cfg.divergence, z_t2s.detach()[agree] / tau_t, z_s[agree], tau)
        kd_teacher = divergence("fkl" if not v2 else cfg.divergence, z_t, z_s2t, tau)
        loss = loss + (1 - r) * ce(z_s, y) / n + r * ((kd_student + ce(z_t2s, y)) / n + kd_teacher / n_t)
    return loss


CASES = {
    "v1": {"name": "dskd_cma", "temperature": 2.0},
    "v1_rkl_teacher_temperature": {"name": "dskd_cma", "divergence": "rkl", "teacher_temperature": 0.5},
    "v2": {"name": "dskd_cma", "version": 2, "divergence": "rkl", "temperature": 2.0},
    "dskdv2_cma": {"name": "dskdv2", "alignment": "cma", "kd_rate": 0.7},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cma_is_its_formula(case: str, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                            cross_teacher: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, CASES[case]), tmp_path)
    assert_is_its_formula(parts, cma_twin)


def test_v2_keys_are_gold_and_values_argmax(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                            cross_teacher: Path) -> None:
    """Version 2 changes only the values' next-token embeddings: its teacher states carry the gold embeddings
    (for the keys) and the argmax ones (for the values), which differ where the teacher is wrong."""
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, CASES["v2"]), tmp_path)
    batch = parts.train_set.collate(list(range(4)))
    states = parts.objective.teacher_forward(parts.teacher, batch)
    t_tok = batch.teacher
    m = t_tok.loss_mask
    embed = parts.teacher.model.get_input_embeddings().weight
    torch.testing.assert_close(states.gold[m], embed[t_tok.labels[m]])
    argmax = forward(parts.teacher.model, t_tok)[0].argmax(-1)
    torch.testing.assert_close(states.values[m], embed[argmax[m]])
    assert bool((argmax[m] != t_tok.labels[m]).any())  # a random teacher is often wrong: the two differ


def test_an_examples_loss_does_not_depend_on_its_batch(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                       cross_teacher: Path) -> None:
    """The same example alone and next to a longer one (more padding) contributes the same loss: N(·) is taken
    over the example's own response positions, not over the padded batch."""
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, CASES["v1"]), tmp_path)
    lengths = [int(parts.train_set.collate([i]).student.input_ids.shape[1]) for i in range(16)]
    short, long = min(range(16), key=lengths.__getitem__), max(range(16), key=lengths.__getitem__)
    assert lengths[long] > lengths[short]
    together, _ = implementation(parts, [[short, long]])
    apart, _ = implementation(parts, [[short], [long]])
    torch.testing.assert_close(together, apart, rtol=1e-9, atol=0.0)
