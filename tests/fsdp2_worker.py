"""The engine's FSDP2 helpers on a model sharded with torch's `fully_shard` directly (accelerate sets FSDP up
only for GPUs), in 2 CPU processes (gloo): `check_helpers`, called by tests/fsdp2_train_worker.py
(`--helpers-out=OUT`) before it trains, in its process group.

A step, a checkpoint of the whole model and optimizer state (gathered to rank 0, written, read back by every
process), a second step; then the checkpoint loaded into the shards and the second step repeated: the same
parameters. Writes the comparison to OUT (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from dualkd.train.engine import (
    fsdp2_full_optimizer_state,
    fsdp2_load_full_optimizer_state,
    fsdp2_load_full_state,
    fsdp2_unsharded,
)


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    with fsdp2_unsharded(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed + dist.get_rank()))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def check_helpers(out: Path) -> None:
    """The check, in the process group already set up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))  # 5 rows: uneven shards
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    for unit in (model[0], model[2], model):
        fully_shard(unit)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    same_after_shard = all(torch.equal(initial[n], t) for n, t in whole(model).items())

    step(model, opt, seed=1)
    saved_model, saved_opt = whole(model), fsdp2_full_optimizer_state(model, opt)
    if dist.get_rank() == 0:
        torch.save({"model": saved_model, "opt": saved_opt}, out.with_suffix(".pt"))
    dist.barrier()
    step(model, opt, seed=2)
    reference = whole(model)

    ckpt = torch.load(out.with_suffix(".pt"), weights_only=True)  # every process reads the same file
    fsdp2_load_full_state(model, ckpt["model"])
    fsdp2_load_full_optimizer_state(model, opt, ckpt["opt"])
    restored = all(torch.equal(saved_model[n], t) for n, t in whole(model).items())
    step(model, opt, seed=2)
    again = whole(model)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({
            "same_after_shard": same_after_shard, "restored": restored,
            "state_keys": sorted(saved_opt["state"]),
            "max_diff": max(float((reference[n] - again[n]).abs().max()) for n in reference),
            "moved": max(float((reference[n] - saved_model[n]).abs().max()) for n in reference)}))
    dist.barrier()
