"""Optimizer parameter groups and learning-rate schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualkd.config import OptimConfig
from dualkd.train.optim import build_optimizer, build_scheduler, lr_multiplier


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_decay_only_matrices_and_objective_groups_keep_their_lr() -> None:
    student = Tiny()
    projector = nn.Linear(4, 6)
    opt = build_optimizer(student, OptimConfig(lr=1e-3, weight_decay=0.1),
                          [{"params": list(projector.parameters()), "lr": 5e-3}])
    groups = {g["name"]: g for g in opt.param_groups}
    decay = {id(p) for p in groups["student"]["params"]}
    no_decay = {id(p) for p in groups["student_no_decay"]["params"]}
    assert decay == {id(student.emb.weight), id(student.lin.weight)}
    assert no_decay == {id(student.lin.bias), id(student.norm.weight), id(student.norm.bias)}
    assert groups["student"]["weight_decay"] == 0.1 and groups["student_no_decay"]["weight_decay"] == 0.0
    assert groups["objective_0"]["lr"] == 5e-3 and len(groups["objective_0"]["params"]) == 2
    all_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(student.frozen.weight) not in all_ids


def test_nothing_to_train_is_an_error() -> None:
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, OptimConfig(), [])


def test_cosine_with_warmup_down_to_min_lr_per_group() -> None:
    student = Tiny()
    projector = nn.Linear(4, 6)
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, scheduler="cosine", min_lr=1e-5)
    opt = build_optimizer(student, cfg, [{"params": list(projector.parameters()), "lr": 1e-2}])
    sched = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    student_lr = [x[0] for x in lrs]
    assert student_lr[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup
    assert student_lr[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(student_lr[4:], student_lr[5:]))  # then decays monotonically
    end = lr_multiplier(20, 20, 4, "cosine", 1e-5 / 1e-3)
    assert end * 1e-3 == pytest.approx(1e-5)  # reaches min_lr at the end
    assert [x[2] for x in lrs][4] == pytest.approx(1e-2)  # the projector group follows its own peak


@pytest.mark.parametrize("kind,mid", [("linear", 0.5), ("constant", 1.0), ("cosine", 0.5)])
def test_schedule_shapes(kind: str, mid: float) -> None:
    assert lr_multiplier(50, 100, 0, kind, 0.0) == pytest.approx(mid)
    assert lr_multiplier(0, 100, 0, kind, 0.0) == pytest.approx(1.0)


def test_warmup_ratio() -> None:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_ratio=0.1, scheduler="constant"), total_steps=50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # step 0 of a 5-step warmup
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
