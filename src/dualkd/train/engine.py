"""The distributed engine: the only file that knows about accelerate (and through it DDP, FSDP2, DeepSpeed).

Everything else sees plain modules and tensors. Which engine runs is chosen by how the program is launched
(`torchrun` / `accelerate launch --config_file ...`), not by dualkd flags.

Gradient accumulation is done here, not by accelerate: the loop normalizes every micro-batch loss by the
token count of the whole global batch (see methods/base.py), so gradients must be summed, never averaged
over micro-batches; `accumulate(sync=False)` only skips the gradient all-reduce of non-final micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dualkd.errors import ConfigError


class Engine:
    def __init__(self, mixed_precision: str = "no", find_unused_parameters: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cpu = not torch.cuda.is_available()
        if cpu and mixed_precision == "fp16":
            raise ConfigError("optimization.mixed_precision: fp16 needs a GPU; use `no` or `bf16` on CPU")
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )

    # ------------------------------------------------------------------------------------------- topology
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------- modules
    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the trainable module (student + objective extras) and its optimizer for this engine."""
        return self.accelerator.prepare(module, optimizer)

    def place_teacher(self, teacher: nn.Module | None) -> nn.Module | None:
        """Put the frozen teacher beside the student (replicated on every process)."""
        return teacher.to(self.device) if teacher is not None else None

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    @contextlib.contextmanager
    def for_generation(self, module: nn.Module) -> Iterator[nn.Module]:
        """The plain module to sample from during training. Under DDP it holds full parameters. Under FSDP2
        and DeepSpeed ZeRO-3 they stay sharded and Hugging Face `generate` gathers each layer as it runs
        (`synced_gpus`, on by itself when it sees either engine), so every process must generate together."""
        yield self.unwrap(module)

    # ------------------------------------------------------------------------------------------- step
    @contextlib.contextmanager
    def accumulate(self, module: nn.Module, sync: bool) -> Iterator[None]:
        """Run one micro-batch; gradients are all-reduced only when `sync` (the last micro-batch of a step)."""
        if sync or self.world_size == 1:
            yield
        else:
            with self.accelerator.no_sync(module):
                yield

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> Tensor:
        return self.accelerator.clip_grad_norm_(module.parameters(), max_norm)

    def grad_norm(self, module: nn.Module) -> Tensor:
        """Global gradient norm without clipping (for logging when clipping is off)."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    @property
    def optimizer_step_was_skipped(self) -> bool:
        """True when fp16 loss scaling found inf/NaN gradients and skipped the update."""
        return self.accelerator.optimizer_step_was_skipped

    # ------------------------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum")

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.to(self.device).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def end(self) -> None:
        """Release the process group (DeepSpeed ZeRO-3 aborts at exit without this)."""
        self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
