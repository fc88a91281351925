"""KD over the shared vocabulary against the formula of methods/shared_vocab_kd.py's docstring, in float64:

    S = shared_vocabulary(student, teacher) (token pairs of identical bytes, EOS <-> EOS)
    pairs = the batch's exact alignment (ETA on offsets + the EOS pair); one tokenizer: every response position
    L = (1 - r)·CE(z_s, y)/n + r·Σ_pairs D(softmax(z_t[S_t]/τ) ‖ softmax(z_s[S_s]/τ))/n
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualkd.align.vocab import shared_vocabulary
from dualkd.errors import DualKDError
from tests.helpers import student_run
from tests.methods.harness import assert_is_its_formula, build64, ce, divergence, forward


def shared_vocab_twin(parts, batch) -> torch.Tensor:
    cfg = parts.objective.config
    s_tok = batch.student
    t_tok = batch.teacher if batch.teacher is not None else s_tok
    z_s = forward(parts.student, s_tok)[0]
    with torch.no_grad():
        z_t = forward(parts.teacher.model, t_tok)[0]
    if batch.alignment is None:
        b_idx, s_pos = torch.nonzero(s_tok.loss_mask, as_tuple=True)
        t_pos = s_pos
    else:
        al = batch.alignment
        b_idx, s_pos, t_pos = al.batch_index, al.student_pos, al.teacher_pos
    s_ids, t_ids = shared_vocabulary(parts.student_tokenizer, parts.teacher_tokenizer)
    zs = z_s[b_idx, s_pos][:, s_ids]  # [P, |S|]
    zt = z_t[b_idx, t_pos][:, t_ids]
    m = s_tok.loss_mask
    n = m.sum()
    r = cfg.kd_rate
    return (1 - r) * ce(z_s[m], s_tok.labels[m]) / n + r * divergence(cfg.divergence, zt, zs, cfg.temperature) / n


@pytest.mark.parametrize("objective", [
    {"name": "shared_vocab_kd"},
    {"name": "shared_vocab_kd", "divergence": "rkl", "temperature": 2.0, "kd_rate": 0.8},
], ids=["fkl", "rkl-t2"])
def test_shared_vocab_kd_across_tokenizers_is_its_formula(objective: dict, tmp_path: Path, train_file: Path,
                                                         byte_tokenizer_dir: Path, cross_teacher: Path) -> None:
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, cross_teacher, objective), tmp_path)
    assert parts.train_set.collate(list(range(8))).alignment is not None  # the cross-tokenizer path is tested
    assert_is_its_formula(parts, shared_vocab_twin)


def test_shared_vocab_kd_with_one_tokenizer_is_its_formula(tmp_path: Path, train_file: Path,
                                                           byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    """One tokenizer: S is the whole vocabulary and every response position a pair (plain KD)."""
    parts = build64(student_run(tmp_path, train_file, byte_tokenizer_dir, teacher_dir,
                                {"name": "shared_vocab_kd", "divergence": "js"}), tmp_path)
    assert_is_its_formula(parts, shared_vocab_twin)


def test_trains_from_a_cache_with_hidden_states(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                cross_teacher: Path) -> None:
    """It reads the teacher at response positions only: a cache written with --hidden serves it."""
    import yaml

    from dualkd.cli import main
    from tests.helpers import read_metrics

    cfg = student_run(tmp_path / "run", train_file, byte_tokenizer_dir, cross_teacher,
                      {"name": "shared_vocab_kd"}, optimization={"max_steps": 3})
    cfg["data"]["max_examples"] = 16
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["cache-teacher", str(config), "--out", str(tmp_path / "cache"), "--top-k", "4", "--hidden"]) == 0
    assert main(["train", str(config), f"teacher.cache={tmp_path / 'cache'}"]) == 0
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3 and all(0 < m["aligned"] <= 1 for m in metrics)
    assert main(["train", str(config), f"teacher.cache={tmp_path / 'cache'}", f"output_dir={tmp_path / 'r2'}",
                 "objective.divergence=akl"]) == 0
    with pytest.raises(DualKDError):  # a cache without hidden states cannot serve it: refused before training
        assert main(["cache-teacher", str(config), "--out", str(tmp_path / "c2"), "--top-k", "4"]) == 0
        from dualkd.config import load_config
        from dualkd.train.build import build_parts
        from dualkd.train.engine import LocalEngine

        build_parts(load_config(config, [f"teacher.cache={tmp_path / 'c2'}"]), tmp_path / "r3", LocalEngine())
