"""DSKDv2 (same vocabulary, and exact token alignment across two vocabularies) against the formula of
methods/dskdv2.py's docstring, in float64:

    pairs      every response position (one vocabulary) or the ETA pairs of the batch (two)
    label_k    the teacher's argmax at pair k in student ids (the student gold token where the teacher predicts
               its own gold token, else the student token with the same bytes, else none)
    agree_k    argmax(h_t2s,k W_sᵀ) = label_k,  with h_t2s = P_t2s(h_t)
    L = (1 - r)·CE(z_s, y)/#tokens + r·( Σ_K D(z_t2s ‖ z_s)/|K| + Σ_labelled CE(z_t2s, label)/#labels
                                        + Σ_pairs D(z_t ‖ h_s P_s2t W_tᵀ)/#pairs )
    K = the agreeing pairs when #agree/#pairs ≤ t2s_agreement, else every pair;
    P_s2t = W_s[V']ᵀ pinv(W_t[V']ᵀ) (pinv_init) or the trained Linear
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualkd.align.vocab import shared_vocabulary, teacher_to_student_ids
from tests.methods.conftest import student_run
from tests.methods.harness import (
    assert_is_its_formula,
    assert_twin,
    build64,
    ce,
    divergence,
    forward,
    head,
    implementation,
)


def dskdv2_twin(parts, batch) -> torch.Tensor:
    obj = parts.objective
    cfg = obj.config
    s_tok = batch.student
    t_tok = batch.teacher if batch.teacher is not None else s_tok
    z_s, h_s = forward(parts.student, s_tok)
    with torch.no_grad():
        z_t, h_t = forward(parts.teacher.model, t_tok)
    w_s, b_s = head(parts.student)
    w_t, b_t = head(parts.teacher.model)
    w_fixed = w_s.detach()
    same = batch.teacher is None
    if same:  # every response position is a pair; the vocabulary is the student's
        V = len(parts.student_tokenizer)
        b_idx, s_pos = torch.nonzero(s_tok.loss_mask, as_tuple=True)
        t_pos = s_pos
        to_student = torch.arange(V)
        student_ids = teacher_ids = torch.arange(V)
    else:
        al = batch.alignment
        b_idx, s_pos, t_pos = al.batch_index, al.student_pos, al.teacher_pos
        V = None
        to_student = teacher_to_student_ids(parts.student_tokenizer, parts.teacher_tokenizer)
        student_ids, teacher_ids = shared_vocabulary(parts.student_tokenizer, parts.teacher_tokenizer)
    zt = z_t[b_idx, t_pos][:, :V]  # [P, V_t] the teacher at its paired positions
    label = to_student[zt.argmax(-1)]
    if not same:  # the teacher predicts its own gold token: the paired student gold token is the same text
        label = torch.where(zt.argmax(-1) == t_tok.labels[b_idx, t_pos], s_tok.labels[b_idx, s_pos], label)
    h_t2s = obj.t2s(h_t[b_idx, t_pos])
    z_t2s = h_t2s @ w_fixed.T
    agree = (z_t2s.argmax(-1) == label) & (label >= 0)
    P = label.numel()
    K = agree if float(agree.sum()) / P <= cfg.t2s_agreement else torch.ones_like(agree)
    zs = z_s[b_idx, s_pos]
    if obj.pinv_init:
        h_s2t = h_s[b_idx, s_pos] @ (w_fixed[student_ids].T @ torch.linalg.pinv(w_t[teacher_ids].T))
    else:
        h_s2t = obj.s2t(h_s[b_idx, s_pos])
    tau, r = cfg.temperature, cfg.kd_rate
    m = s_tok.loss_mask
    kd_student = divergence(cfg.divergence, z_t2s.detach()[K], zs[K], tau) / K.sum().clamp(min=1)  # none: 0
    ce_t2s = ce(z_t2s[label >= 0], label[label >= 0]) / (label >= 0).sum()
    kd_teacher = divergence(cfg.divergence, zt, (h_s2t @ w_t.T)[:, :V], tau) / P
    loss = (1 - r) * ce(z_s[m], s_tok.labels[m]) / m.sum()
    if cfg.spaces != "teacher":
        loss = loss + r * (kd_student + ce_t2s)
    if cfg.spaces != "student":
        loss = loss + r * kd_teacher
    assert b_s is None and b_t is None  # the formula above has no head biases (GPT-2 and Llama have none)
    return loss


CASES = {  # name -> (objective, teacher: "same" tokenizer or "cross")
    "same_pinv": ({"name": "dskdv2", "temperature": 2.0, "pinv_init": True}, "same"),
    "same_trained_s2t_rkl": ({"name": "dskdv2", "divergence": "rkl", "pinv_init": False}, "same"),
    "eta_pinv": ({"name": "dskdv2", "temperature": 2.0, "divergence": "rkl", "pinv_init": True}, "cross"),
    "eta_trained_s2t": ({"name": "dskdv2", "kd_rate": 0.3}, "cross"),  # auto: a random student gets no pinv
    # no pair agrees and the threshold is 0: share 0 ≤ 0 picks the agreeing pairs (none), not every pair
    "eta_threshold_0": ({"name": "dskdv2", "t2s_agreement": 0.0, "pinv_init": True}, "cross"),
    "eta_student_space_only": ({"name": "dskdv2", "spaces": "student", "pinv_init": True}, "cross"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dskdv2_is_its_formula(case: str, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                               teacher_dir: Path, cross_teacher: Path) -> None:
    objective, kind = CASES[case]
    teacher = teacher_dir if kind == "same" else cross_teacher
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, teacher, objective), tmp_path)
    assert_is_its_formula(parts, dskdv2_twin)


def test_both_agreement_branches_are_taken(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                           teacher_dir: Path) -> None:
    """The student-space KD averages over agreeing pairs when their share is at most t2s_agreement, else over
    all pairs. A student as wide as the teacher (d=48) with pinv-initialized P_t2s agrees on some pairs, not all;
    thresholds on either side of that share take the two branches (each matched by the twin above)."""
    losses = []
    for threshold in (1.0, 0.0):
        objective = {"name": "dskdv2", "t2s_agreement": threshold, "pinv_init": True}
        cfg = student_run(tmp_path / str(threshold), train_file, byte_tokenizer_dir, teacher_dir, objective)
        cfg["student"]["arch"]["n_embd"] = 48
        parts = build64(cfg, tmp_path / str(threshold))
        batch = parts.train_set.collate(list(range(8)))
        _, counts = parts.objective.prepare(batch, parts.objective.teacher_forward(parts.teacher, batch), parts.student)
        assert 0 < float(counts["agree"]) < float(counts["pairs"])
        loss, grads = implementation(parts, [list(range(8))])
        assert_twin(parts, loss, grads, dskdv2_twin(parts, batch))
        losses.append(loss)
    assert abs(float((losses[0] - losses[1]).detach())) > 1e-6
