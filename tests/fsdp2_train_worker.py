"""Run by tests/test_sharded_head_readers.py under torchrun (CPU processes, gloo): `dualkd train CONFIG [--resume]` with
the student sharded by torch's FSDP2 (`fully_shard`) directly, because accelerate sets FSDP up only for GPUs.

`CpuFSDP2` is the engine of train/engine.py with what accelerate does for FSDP2 done by hand: one shard unit
per transformer block (the classes the model declares unsplittable), then the root (the student's embeddings
and head, the objective's projectors); the optimizer moved onto the sharded parameters; gradients reduced
only at a step's last micro-batch. Everything else (gathering, the FSDP2 checkpoint helpers, the sharded
teacher, `outside_forward`, `head_gathered`) is the engine's own code, which is what the tests check.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_train_worker.py train \
        [--resume] [--helpers-out=OUT.json] CFG...

Several configs train one after the other under the one process group (start-up paid once); with
`--helpers-out`, the FSDP2 checkpoint helpers are checked first on a small model (tests/fsdp2_worker.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

from dualkd.config import load_config
from dualkd.methods import build_objective
from dualkd.train import loop
from dualkd.train.engine import (
    Engine,
    fsdp2_full_optimizer_state,
    fsdp2_load_full_optimizer_state,
)
from tests.fsdp2_worker import check_helpers


class CpuFSDP2(Engine):
    def __init__(self) -> None:  # no accelerate: torch's process group and fully_shard
        dist.init_process_group("gloo")
        self.is_deepspeed = False
        self._sync = True
        self._frozen_engines = []

    device = property(lambda self: torch.device("cpu"))
    rank = property(lambda self: dist.get_rank())
    world_size = property(lambda self: dist.get_world_size())
    is_main = property(lambda self: dist.get_rank() == 0)
    _fsdp2 = property(lambda self: True)
    optimizer_step_was_skipped = property(lambda self: False)

    def barrier(self) -> None:
        dist.barrier()

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int, grad_accum: int,
                max_grad_norm: float | None) -> tuple[nn.Module, torch.optim.Optimizer]:
        names = {id(p): n for n, p in module.named_parameters()}
        blocks = set(getattr(module.student, "_no_split_modules", None) or [])
        for sub in module.modules():
            if type(sub).__name__ in blocks:
                fully_shard(sub)
        fully_shard(module)
        sharded = dict(module.named_parameters())
        for group in optimizer.param_groups:  # the same parameters, now DTensor shards
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return module, optimizer

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    @contextlib.contextmanager
    def accumulate(self, module: nn.Module, sync: bool) -> Iterator[None]:
        module.set_requires_gradient_sync(sync)
        yield

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm).full_tensor()

    def grad_norm(self, module: nn.Module) -> Tensor:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).full_tensor()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def save_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        state = fsdp2_full_optimizer_state(module, optimizer)
        if self.is_main:
            torch.save(state, directory / "optimizer-full.pt")

    def load_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        fsdp2_load_full_optimizer_state(module, optimizer, torch.load(directory / "optimizer-full.pt",
                                                                      weights_only=True))

    def end(self) -> None:
        dist.destroy_process_group()


def main() -> None:
    assert sys.argv[1] == "train"
    resume = "--resume" in sys.argv[2:]
    helpers_out = next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--helpers-out=")), None)
    engine = CpuFSDP2()
    try:
        if helpers_out is not None:
            check_helpers(Path(helpers_out))
        for path in (a for a in sys.argv[2:] if not a.startswith("--")):
            cfg = load_config(Path(path))
            loop._train(cfg, resume or cfg.checkpoint.resume, False, engine, build_objective(cfg.objective))
    finally:
        engine.end()


if __name__ == "__main__":
    main()
