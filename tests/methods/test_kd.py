"""KD and word-level KD against the formula of methods/kd.py's docstring, in float64:

    L = ((1 − r)·Σ_t CE(z_s,t, y_t) + r·Σ_t D(p_t^τ ‖ q_t^τ)) / response tokens,  D over the shared rows
    top_k: D = KL over k + 1 buckets (the teacher's top-k ids by p, then the tail); the teacher's buckets
           tempered as buckets (p_b^(1/τ), renormalized), the student tempered over V then folded
The dense, fused (chunked from hidden states) and sparse paths each meet the same twin; `word_kd` is `kd` on
an encoder-decoder model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.methods.conftest import marian_run, student_run
from tests.methods.harness import (
    assert_is_its_formula,
    build64,
    ce,
    divergence,
    forward,
)


def bucket_kl(z_t: torch.Tensor, z_s: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    p = torch.softmax(z_t, -1)
    top = p.topk(k, -1).indices
    p_b = torch.cat([p.gather(-1, top), 1 - p.gather(-1, top).sum(-1, keepdim=True)], -1) ** (1 / tau)
    p_b = p_b / p_b.sum(-1, keepdim=True)
    q = torch.softmax(z_s / tau, -1)
    q_b = torch.cat([q.gather(-1, top), 1 - q.gather(-1, top).sum(-1, keepdim=True)], -1)
    return (p_b * (p_b.log() - q_b.log())).sum()


def kd_twin(parts, batch) -> torch.Tensor:
    cfg, tok = parts.objective.config, batch.student
    m, y = tok.loss_mask, tok.labels
    if parts.student.config.is_encoder_decoder:
        start = torch.full_like(y[:, :1], parts.student.config.decoder_start_token_id)
        inputs = torch.cat([start, y.masked_fill(~m, parts.student.config.pad_token_id)[:, :-1]], 1)
        run = lambda model: model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,  # noqa: E731
                                  decoder_input_ids=inputs).logits
    else:
        run = lambda model: forward(model, tok)[0]  # noqa: E731
    z_s = run(parts.student)[m]
    with torch.no_grad():
        z_t = run(parts.teacher.model)[m]
    V = min(z_s.shape[-1], z_t.shape[-1], len(parts.student_tokenizer))
    if cfg.top_k:
        kd = bucket_kl(z_t[:, :V], z_s[:, :V], cfg.top_k, cfg.temperature)
    else:
        kd = divergence(cfg.divergence, z_t[:, :V], z_s[:, :V], cfg.temperature)
    return ((1 - cfg.kd_rate) * ce(z_s, y[m]) + cfg.kd_rate * kd) / m.sum()


@pytest.mark.parametrize("objective", [{"name": "kd", "fused": "off"},
                                       {"name": "kd", "fused": "on", "divergence": "rkl", "chunk_size": 7},
                                       {"name": "kd", "top_k": 5, "temperature": 2.0, "kd_rate": 0.7},
                                       {"name": "kd", "fused": "on", "divergence": "js", "temperature": 2.0},
                                       {"name": "kd", "fused": "off", "divergence": "akl"}],
                         ids=["dense_fkl", "fused_rkl", "top5", "fused_js", "dense_akl"])
def test_kd_is_its_formula(objective: dict, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                           teacher_dir: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, objective), tmp_path)
    assert_is_its_formula(parts, kd_twin)


@pytest.mark.parametrize("objective", [{"name": "word_kd"}, {"name": "word_kd", "divergence": "rkl", "fused": "on"}],
                         ids=["fkl", "fused_rkl"])
def test_word_kd_is_its_formula(objective: dict, tmp_path: Path, mt_pairs: Path, byte_tokenizer_dir: Path,
                                marian_teacher: Path) -> None:
    parts = build64(marian_run(tmp_path, mt_pairs, byte_tokenizer_dir, marian_teacher, objective), tmp_path)
    for model in (parts.student, parts.teacher.model):  # trained Marian models have one: the fused loss must add it
        model.final_logits_bias.normal_(generator=torch.Generator().manual_seed(0))
    assert_is_its_formula(parts, kd_twin)
