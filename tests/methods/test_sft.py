"""SFT against the formula of methods/sft.py's docstring, in float64:

    L = Σ_t −log softmax(z_s,t)[y_t] / response tokens
    label_smoothing ε: Σ_t ((1 − ε)·(−log q_y) + (ε / V)·Σ_v (−log q_v)) / response tokens
The dense and the fused (chunked from hidden states) paths each meet the same twin.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualkd.lm import lm_forward
from dualkd.methods.base import StepNorm
from dualkd.methods.sft import SFTConfig
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from tests.helpers import nmt_run, tiny_run
from tests.methods.harness import NO_DROPOUT, assert_is_its_formula, build64, ce, forward


def sft_twin(parts, batch) -> torch.Tensor:
    tok, eps = batch.student, parts.objective.config.label_smoothing
    m, y = tok.loss_mask, tok.labels
    z = forward(parts.student, tok)[0][m]  # [N, V]
    smooth = -torch.log_softmax(z, -1).mean(-1).sum()
    return ((1 - eps) * ce(z, y[m]) + eps * smooth) / m.sum()


@pytest.mark.parametrize("objective", [{"name": "sft", "fused": "off"},
                                       {"name": "sft", "fused": "on", "chunk_size": 7},
                                       {"name": "sft", "label_smoothing": 0.1}],
                         ids=["dense", "fused", "label_smoothing"])
def test_sft_is_its_formula(objective: dict, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    cfg = tiny_run(tmp_path, train_file, byte_tokenizer_dir, objective=dict(objective))
    cfg["student"]["arch"].update(NO_DROPOUT)
    parts = build64(cfg, tmp_path)
    assert parts.objective.fused == (objective.get("fused") == "on")
    assert_is_its_formula(parts, sft_twin)


def test_sft_fused_auto_follows_the_vocabulary(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    """`auto` fuses from `fused_min_vocab` head rows on (the tiny vocabulary is a few hundred rows)."""
    for min_vocab, fused in ((32000, False), (100, True)):
        cfg = tiny_run(tmp_path / str(min_vocab), train_file, byte_tokenizer_dir,
                       objective={"name": "sft", "fused_min_vocab": min_vocab})
        assert build64(cfg, tmp_path / str(min_vocab)).objective.fused is fused
    with pytest.raises(ValueError, match="label_smoothing reads the dense logits"):
        SFTConfig(fused="on", label_smoothing=0.1)


def test_sft_label_smoothing_is_fairseqs(tmp_path: Path, nmt_pairs: tuple[Path, Path], byte_tokenizer_dir: Path
                                         ) -> None:
    """The Transformer baseline's loss: (1 − ε)·NLL + ε·mean_v(−log q_v) per target token; `ce` stays the NLL."""
    parts = build_parts(nmt_run(tmp_path, nmt_pairs, byte_tokenizer_dir, {"name": "sft", "label_smoothing": 0.1}),
                        tmp_path, LocalEngine())
    student, obj = parts.student, parts.objective
    student.eval()
    batch = parts.train_set.collate([0, 1, 2])
    n = float(batch.student.loss_mask.sum())
    loss, metrics = obj(student, batch, None, StepNorm({"tokens": n}))
    tokens = batch.student
    logq = torch.log_softmax(lm_forward(student, tokens).logits.double(), -1)  # the same encoder-decoder call
    mask = tokens.loss_mask
    nll = -logq.gather(-1, tokens.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    smooth = -logq.mean(-1)[mask]
    assert float(loss) == pytest.approx(float((0.9 * nll + 0.1 * smooth).sum() / n), rel=1e-5)
    assert float(metrics["ce"]) == pytest.approx(float(nll.sum() / n), rel=1e-5)
