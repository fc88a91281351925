"""What every distillation objective does, whatever its formula (each formula is pinned by its own file's
float64 twin): gradients reach the student and the objective's projectors, never the teacher; `ce_weight` 0
removes exactly the gold CE. Tiny random-init models, two tokenizers trained in the test (byte-level BPE,
vocab 400, for the student; SentencePiece-style BPE, vocab 600, for the cross-tokenizer teacher)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualkd.config import validate_config
from dualkd.methods.base import StepNorm
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.step import TrainModule
from tests.helpers import DISTILLATION_CASES, KD_CASES, case_run
from tests.methods.harness import NO_DROPOUT


@pytest.mark.parametrize("case", sorted(DISTILLATION_CASES))
def test_gradients_reach_student_and_projectors_never_teacher(case: str, tmp_path: Path, train_file: Path,
                                                             byte_tokenizer_dir: Path, teacher_dir: Path,
                                                             cross_teacher: Path) -> None:
    cfg = validate_config(case_run(tmp_path, case, train_file, byte_tokenizer_dir, teacher_dir, cross_teacher))
    engine = LocalEngine()
    parts = build_parts(cfg, tmp_path / case, engine)
    module = TrainModule(parts.student, parts.objective)
    batch = parts.train_set.collate(list(range(6)))
    with torch.no_grad():
        teacher_out = parts.objective.teacher_forward(parts.teacher, batch)
        teacher_out, counts = parts.objective.prepare(batch, teacher_out, parts.student)
    loss, metrics = module(batch, teacher_out, StepNorm({k: float(v) for k, v in counts.items()}))
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    loss.backward()
    student_grads = [p.grad for p in parts.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    for name, p in parts.objective.named_parameters():
        assert p.grad is not None, f"projector {name} got no gradient"
    assert all(p.grad is None and not p.requires_grad for p in parts.teacher.model.parameters())


@pytest.mark.parametrize("case", sorted(DISTILLATION_CASES) + sorted(KD_CASES))
def test_ce_weight_removes_exactly_the_gold_ce(case: str, tmp_path: Path, train_file: Path,
                                               byte_tokenizer_dir: Path, teacher_dir: Path,
                                               cross_teacher: Path) -> None:
    """A student-sampled step (`StepNorm.ce_weight` 0) keeps every distillation term and drops only (1 - r)·CE."""
    from dataclasses import replace

    cfg = validate_config(case_run(tmp_path, case, train_file, byte_tokenizer_dir, teacher_dir, cross_teacher,
                                  student={"arch": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                                    "n_positions": 256, **NO_DROPOUT}}))
    parts = build_parts(cfg, tmp_path / case, LocalEngine())
    module = TrainModule(parts.student, parts.objective)
    batch = parts.train_set.collate(list(range(6)))
    with torch.no_grad():
        teacher_out = parts.objective.teacher_forward(parts.teacher, batch)
        teacher_out, counts = parts.objective.prepare(batch, teacher_out, parts.student)
        norm = StepNorm({k: float(v) for k, v in counts.items()})
        full, metrics = module(batch, teacher_out, norm)
        kd_only, _ = module(batch, teacher_out, replace(norm, ce_weight=0.0))
    rate = cfg.objective.kd_rate
    torch.testing.assert_close(full - kd_only, (1 - rate) * metrics["ce"], rtol=1e-4, atol=1e-5)


