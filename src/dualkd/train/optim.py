"""AdamW with parameter groups and a warmup + cosine/linear/constant schedule down to `min_lr`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dualkd.config import OptimConfig


def build_optimizer(student: nn.Module, cfg: OptimConfig, extra_groups: list[dict[str, Any]]) -> torch.optim.AdamW:
    """Student parameters in two groups (weight decay on matrices only, never on biases and norm weights),
    then the objective's own groups (projectors...), each with its own learning rate."""
    decay, no_decay = [], []
    for p in student.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "student"},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "name": "student_no_decay"},
    ]
    for i, g in enumerate(extra_groups):
        params = [p for p in g["params"] if p.requires_grad]
        groups.append({"weight_decay": cfg.weight_decay, "name": f"objective_{i}", **g, "params": params})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_multiplier(step: int, total: int, warmup: int, kind: str, floor: float) -> float:
    """Multiplier of a group's peak lr at `step` (0-based): linear warmup, then decay to `floor`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    lambdas = []
    for g in optimizer.param_groups:
        floor = min(cfg.min_lr / g["lr"], 1.0)
        lambdas.append(lambda s, f=floor: lr_multiplier(s, total_steps, warmup, cfg.scheduler, f))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
