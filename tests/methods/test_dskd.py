"""DSKD (same vocabulary) against the formula of methods/dskd.py's docstring, in float64:

    L = (1 - r)·CE(z_s, y) + r·( D(softmax(z_t2s / τ) detached ‖ softmax(z_s / τ)) + CE(z_t2s, y)
                                + FKL(softmax(z_t / τ) ‖ softmax(z_s2t / τ)) )          / response tokens
    z_t2s = P_t2s(h_t) W_sᵀ (W_s detached),  z_s2t = P_s2t(h_s) W_tᵀ
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import student_run
from tests.methods.harness import (
    assert_is_its_formula,
    build64,
    ce,
    divergence,
    forward,
    head,
)


def dskd_twin(parts, batch) -> torch.Tensor:
    cfg, obj = parts.objective.config, parts.objective
    tokens = batch.student
    m, y = tokens.loss_mask, tokens.labels[tokens.loss_mask]
    z_s, h_s = (x[m] for x in forward(parts.student, tokens))
    with torch.no_grad():
        z_t, h_t = (x[m] for x in forward(parts.teacher.model, tokens))
    w_s, b_s = head(parts.student)
    w_t, b_t = head(parts.teacher.model)
    V = w_s.shape[0]
    z_t2s = obj.t2s(h_t) @ w_s.detach().T + (b_s.detach() if b_s is not None else 0)
    z_s2t = obj.s2t(h_s) @ w_t.T + (b_t if b_t is not None else 0)
    tau, r = cfg.temperature, cfg.kd_rate
    kd_student = divergence(cfg.divergence, z_t2s.detach(), z_s, tau)
    kd_teacher = divergence("fkl", z_t[:, :V], z_s2t[:, :V], tau)
    return ((1 - r) * ce(z_s, y) + r * (kd_student + ce(z_t2s, y) + kd_teacher)) / m.sum()


@pytest.mark.parametrize("objective", [{"name": "dskd", "temperature": 2.0},
                                       {"name": "dskd", "divergence": "rkl", "kd_rate": 0.3}], ids=["fkl", "rkl"])
def test_dskd_is_its_formula(objective: dict, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                             teacher_dir: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, objective), tmp_path)
    assert_is_its_formula(parts, dskd_twin)
