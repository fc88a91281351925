"""ULD against the formula of methods/uld.py's docstring, in float64, with the pairing written out:

    k-th response position of the student <-> k-th response position of the teacher (per sequence)
    L = (1 - r)·CE(z_s, y)/n + r·Σ_k Σ_v |sort↓(softmax(z_s,k))_v − sort↓(softmax(z_t,k))_v| / n
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import student_run
from tests.methods.harness import (
    assert_close_grads,
    assert_is_its_formula,
    build64,
    ce,
    forward,
    implementation,
)


def uld_twin(parts, batch) -> torch.Tensor:
    s_tok, t_tok = batch.student, batch.teacher
    z_s = forward(parts.student, s_tok)[0]
    with torch.no_grad():
        z_t = forward(parts.teacher.model, t_tok)[0]
    r = parts.objective.config.kd_rate
    n = s_tok.loss_mask.sum()
    loss = 0.0
    for b in range(len(batch.indices)):
        zs = z_s[b, s_tok.loss_mask[b]]
        zt = z_t[b, t_tok.loss_mask[b]]
        k = min(len(zs), len(zt))
        q = torch.softmax(zs[:k], -1).sort(-1, descending=True).values
        p = torch.softmax(zt[:k], -1).sort(-1, descending=True).values
        width = max(q.shape[-1], p.shape[-1])
        uld = (F.pad(q, (0, width - q.shape[-1])) - F.pad(p, (0, width - p.shape[-1]))).abs().sum()
        loss = loss + (1 - r) * ce(zs, s_tok.labels[b, s_tok.loss_mask[b]]) / n + r * uld / n
    return loss


@pytest.mark.parametrize("objective", [{"name": "uld"}, {"name": "uld", "kd_rate": 0.8}], ids=["r0.5", "r0.8"])
def test_uld_is_its_formula(objective: dict, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                            cross_teacher: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, objective), tmp_path)
    assert_is_its_formula(parts, uld_twin)


def test_one_row_chunks_equal_one_chunk(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                        cross_teacher: Path) -> None:
    """The checkpointed chunks change nothing: chunk_size 1 (a chunk per pair) equals the default (one chunk)."""
    results = []
    for chunk in (None, 1):
        parts = build64(student_run(tmp_path / str(chunk), train_file, byte_tokenizer_dir, cross_teacher,
                                    {"name": "uld", "chunk_size": chunk}), tmp_path / str(chunk))
        results.append(implementation(parts, [list(range(8))]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0.0)
    assert_close_grads(results[1][1], results[0][1], rtol=1e-10)
