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
from transformers import AutoTokenizer

from dualkd.config import ModelConfig, validate_config
from dualkd.data.collate import Batch, pad_batch
from dualkd.data.dataset import TruncationRules, tokenize_examples
from dualkd.data.formats import parse_record
from dualkd.errors import ConfigError, ModelError
from dualkd.methods.base import SetupContext, StepNorm
from dualkd.methods.kd import KD, KDConfig
from dualkd.models import load_model
from dualkd.teachers import LiveTeacher
from tests.helpers import make_model_dir, marian_run, student_run, synthetic_records
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


NAMES = ["fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path):
    """Student (vocab rows 416) and teacher (448) for the 400-token byte tokenizer; no dropout."""
    tmp = tmp_path_factory.mktemp("kdobj")
    nodrop = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    s = make_model_dir(tmp / "s", byte_tokenizer_dir, vocab_size=416, seed=3, **nodrop)
    t = make_model_dir(tmp / "t", byte_tokenizer_dir, vocab_size=448, n_embd=48, seed=4, **nodrop)
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    return tok, s, t

def _batch(tok) -> Batch:
    examples = [parse_record(r, f"m:{i}") for i, r in enumerate(synthetic_records(6, seed=12))]
    return Batch(student=pad_batch(tokenize_examples(examples, tok, TruncationRules(64, 48)), tok.pad_token_id),
                 teacher=None, indices=list(range(6)))

@pytest.mark.parametrize("name", NAMES)
def test_fused_and_plain_kd_agree(models, name: str) -> None:
    tok, s_dir, t_dir = models
    batch = _batch(tok)
    norm = StepNorm({"tokens": float(batch.student.loss_mask.sum())})
    results = []
    for fused in ("off", "on"):
        student = load_model(ModelConfig(path=str(s_dir)), tok, role="student")
        teacher = load_model(ModelConfig(path=str(t_dir)), tok, role="teacher")
        kd = KD(KDConfig(name="kd", divergence=name, temperature=2.0, kd_rate=0.4, fused=fused, chunk_size=7))
        kd.setup(SetupContext(student, LiveTeacher(teacher, tok), tok, tok, same_tokenizer=True))
        assert kd.fused == (fused == "on") and kd.vocab_size == 400
        loss, metrics = kd(student, batch, kd.teacher_forward(LiveTeacher(teacher, tok), batch), norm)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((loss.detach(), metrics, grads))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for k in ("ce", "kd", "acc"):
        torch.testing.assert_close(m1[k].float(), m0[k].float(), atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)

def test_auto_uses_fused_from_the_threshold(models) -> None:
    tok, s_dir, t_dir = models
    student = load_model(ModelConfig(path=str(s_dir)), tok, role="student")
    teacher = load_model(ModelConfig(path=str(t_dir)), tok, role="teacher")
    for threshold, expected in ((400, True), (401, False)):
        kd = KD(KDConfig(name="kd", fused_min_vocab=threshold))
        kd.setup(SetupContext(student, LiveTeacher(teacher, tok), tok, tok, same_tokenizer=True))
        assert kd.fused is expected

def test_divergence_parameters_in_config() -> None:
    base = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train": "x.jsonl"}}
    cfg = validate_config({**base, "objective": {"name": "kd", "divergence": "js", "beta": 0.3}})
    assert cfg.objective.divergence_params == {"beta": 0.3}
    cfg = validate_config({**base, "objective": {"name": "kd", "divergence": "akl"}})
    assert cfg.objective.divergence_params == {"akl_alpha": 0.5}
    with pytest.raises(ConfigError, match=r"\['beta'\] do\(es\) not apply to divergence 'fkl'"):
        validate_config({**base, "objective": {"name": "kd", "beta": 0.3}})
    with pytest.raises(ConfigError, match="objective.divergence: expected one of 'fkl', 'rkl'"):
        validate_config({**base, "objective": {"name": "kd", "divergence": "kl"}})

def test_post_processed_logits_are_refused_by_the_fused_path(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    spec = ModelConfig(init="random", tokenizer=str(byte_tokenizer_dir), arch={
        "model_type": "gemma2", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "final_logit_softcapping": 1.0})
    capped = load_model(spec, tok, role="teacher")
    kd = KD(KDConfig(name="kd", fused="on"))
    with pytest.raises(ModelError, match="set objective.fused: off"):
        kd.setup(SetupContext(capped, LiveTeacher(capped, tok), tok, tok, same_tokenizer=True))
