"""The `kd` objective: every divergence selectable from the config, fused and plain paths equal."""

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
from tests.conftest import make_model_dir, synthetic_records

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


