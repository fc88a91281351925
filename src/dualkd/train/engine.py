"""The distributed engine: the only file that knows about accelerate (and through it DDP, FSDP2, DeepSpeed).

Everything else sees plain modules and tensors. Which engine runs is chosen by how the program is launched
(`torchrun` / `accelerate launch --config_file configs/accelerate/<engine>.yaml ...`), not by dualkd flags;
docs/scale-out.md lists the launch lines.

Gradient accumulation is done here, not by accelerate: the loop normalizes every micro-batch loss by the
token count of the whole global batch (see methods/base.py), so gradients must be summed, never averaged
over micro-batches; `accumulate(sync=False)` only skips the gradient all-reduce of non-final micro-batches.
Under DeepSpeed the same holds: losses go to its engine unscaled (`scale_wrt_gas=False`), the last
micro-batch of a step is marked as its accumulation boundary, and its `step()` (clip, update, zero) runs
there; the batch sizes and clipping in its config are filled from dualkd's config.

DeepSpeed on CPU: accelerate sets a process group up only for GPU-like devices (or `cpu=True`, which turns
DeepSpeed off). Passing the `gloo` backend explicitly (`InitProcessGroupKwargs`, public API) gives it one, and
DeepSpeed's own CPU accelerator does the rest; that is how the ZeRO-2/3 tests run on 2 CPU processes.
FSDP is not set up by accelerate for CPU processes at all: that is refused with a clear error.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from dualkd.errors import ConfigError
from dualkd.train.deepspeed_load import weights_only_loads

if not torch.cuda.is_available():  # DeepSpeed (imported by accelerate) would warn that it fell back to the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@functools.cache  # once per process, however many runs end in it
def _release_process_group_at_exit() -> None:
    atexit.register(_destroy_process_group)


def _launched_with(engine: str) -> bool:
    """Whether `accelerate launch` was told to use `engine` (it passes the choice on in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def _place_whole(model: nn.Module, placement: str, device: torch.device) -> nn.Module:
    """A frozen model kept whole: on `device`, or (`cpu_offload`) in CPU memory with each layer copied to
    `device` as it runs."""
    if placement == "cpu_offload":
        from accelerate import cpu_offload

        return cpu_offload(model, execution_device=device)
    return model.to(device)


class LocalEngine:
    """One process on this machine, without accelerate: what building a run's parts needs of an engine (data
    preparation, SeqKD generation, the cache writer, tests that build parts without training)."""

    is_main = True
    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def barrier(self) -> None:
        """Nothing to wait for: one process."""

    @contextlib.contextmanager
    def gathered(self, module: nn.Module) -> Iterator[None]:
        """Whole parameters already: nothing to gather."""
        yield

    def place_teacher(self, teacher: nn.Module, placement: str = "auto") -> nn.Module:
        """A frozen model where its `placement` says; one process has nothing to shard it over."""
        if placement == "sharded":
            raise ConfigError("teacher.placement: sharded needs DeepSpeed ZeRO-3 or FSDP2 under `accelerate "
                              "launch`; one process keeps whole models")
        return _place_whole(teacher, placement, self.device)


class Engine:
    def __init__(self, mixed_precision: str = "no", find_unused_parameters: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

        no_gpu = not torch.cuda.is_available()
        if no_gpu and mixed_precision == "fp16":
            raise ConfigError("optimization.mixed_precision: fp16 needs a GPU; use `no` or `bf16` on CPU")
        if no_gpu and _launched_with("FSDP") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("FSDP needs GPUs: accelerate sets FSDP up only for GPU-like devices, so on CPU "
                              "processes it would silently train unsharded. Use DDP or DeepSpeed ZeRO on CPU "
                              "(configs/accelerate/), FSDP on GPUs.")
        handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
        deepspeed_on_cpu = no_gpu and _launched_with("DEEPSPEED")
        if deepspeed_on_cpu:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(cpu=no_gpu and not deepspeed_on_cpu, mixed_precision=mixed_precision,
                                       kwargs_handlers=handlers)
        self.is_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.is_deepspeed:  # DeepSpeed calls torch's old collective names: two warnings per step, not ours
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
        if self.world_size == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up no "
                              "distributed engine: they would train unsynchronized copies")
        self._sync = True  # whether the current micro-batch ends the optimizer step (DeepSpeed boundary)
        self._frozen_engines: list[Any] = []
        # wrapped module -> the module inside, found once: accelerate's `unwrap_model` probes installed packages
        # on every call (~10 ms on CPU), and the loop asks every step
        self._unwrapped: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()

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
    @property
    def name(self) -> str:
        if self.is_deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        if self._fsdp2:
            return "FSDP2"
        return "DDP" if self.world_size > 1 else "single process"

    @staticmethod
    def count_parameters(module: nn.Module, trainable: bool = False) -> int:
        """Parameter count, also of a model ZeRO-3 partitioned at load (its tensors are empty there)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable)

    @property
    def shards_parameters(self) -> bool:
        """Parameters live split over processes (ZeRO-3, FSDP2): every forward is a collective call."""
        return self.zero_stage == 3 or self._fsdp2

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage, None under other engines."""
        if not self.is_deepspeed:
            return None
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int, grad_accum: int,
                max_grad_norm: float | None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the trainable module (student + objective extras) and its optimizer for this engine."""
        if self.is_deepspeed:
            self._fill_deepspeed_config(micro_batch_size, grad_accum, max_grad_norm)
        wrapped, optimizer = self.accelerator.prepare(module, optimizer)
        self._unwrapped[wrapped] = self.accelerator.unwrap_model(wrapped)
        return wrapped, optimizer

    def _fill_deepspeed_config(self, micro_batch_size: int, grad_accum: int, max_grad_norm: float | None) -> None:
        """dualkd's batch sizes and clipping are the truth; a DeepSpeed config may say `auto` or the same."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        wanted = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
                  "train_batch_size": micro_batch_size * grad_accum * self.world_size,
                  "gradient_clipping": float(max_grad_norm or 0.0)}
        for key, value in wanted.items():
            given = ds.get(key, "auto")
            if given != "auto" and given != value:
                raise ConfigError(f"the DeepSpeed config sets {key}={given}, dualkd's config means {value}: "
                                  "set it to `auto` there (dualkd fills it)")
            ds[key] = value

    @property
    def _fsdp2(self) -> bool:
        return bool(self.accelerator.is_fsdp2)

    @contextlib.contextmanager
    def gathered(self, module: nn.Module) -> Iterator[None]:
        """Full parameters of `module` on every process for the duration, to read (ZeRO-3 and FSDP2 keep them
        split otherwise; what is written into them is lost at the end). All processes must enter."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield
        elif self._fsdp2:
            with fsdp2_unsharded(module):
                yield
        else:
            yield

    @contextlib.contextmanager
    def outside_forward(self, module: nn.Module) -> Iterator[None]:
        """For work on the wrapped module outside its forward that reads what lies outside its transformer
        blocks (an objective's `prepare`: the LM head, the projectors). FSDP2 keeps those in the root unit,
        whole only while the root runs its forward: unsharded here for the duration (only that unit, not the
        blocks). Under ZeRO-3 each submodule's own hooks gather it when called (the head through
        `lm.through_head`); other engines hold whole parameters."""
        with fsdp2_unsharded(self.unwrap(module), recurse=False) if self._fsdp2 else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def head_gathered(self, model: nn.Module) -> Iterator[None]:
        """The LM head of a frozen model this engine placed (a sharded teacher) whole for the duration: ZeRO-3
        gathers the head's parameters only, FSDP2 unshards the unit that holds it (the model's root unit, the
        head's own if it has one). All processes must enter."""
        head = model.get_output_embeddings()
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
                yield
        elif self._fsdp2:
            with fsdp2_unsharded(model, recurse=False), fsdp2_unsharded(head, recurse=False):
                yield
        else:
            yield

    def load_state(self, module: nn.Module, state: dict[str, Tensor]) -> None:
        """Load whole tensors (a subset of the state, by name) into a module however it is split. All
        processes call it, each with the same `state`."""
        raw = self.unwrap(module)
        if self._fsdp2:
            fsdp2_load_full_state(raw, state)
        elif self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(raw.parameters()), modifier_rank=0):
                raw.load_state_dict(state, strict=False)
        else:
            raw.load_state_dict(state, strict=False)

    def save_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Save the optimizer state into a checkpoint folder. All processes call it: under DeepSpeed each
        writes its partition (through DeepSpeed's own checkpointing, which also stores the module); under
        FSDP2 the whole state is gathered to the main process (`optimizer-full.pt`)."""
        if self.is_deepspeed:
            module.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)
        elif self._fsdp2:
            state = fsdp2_full_optimizer_state(self.unwrap(module), optimizer.optimizer)
            if self.is_main:
                torch.save(state, directory / "optimizer-full.pt")
        elif self.is_main:
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        wanted = "deepspeed" if self.is_deepspeed else "optimizer-full.pt" if self._fsdp2 else "optimizer.pt"
        if not (directory / wanted).exists():
            written = next((f for f in ("deepspeed", "optimizer-full.pt", "optimizer.pt") if (directory / f).exists()),
                           "nothing")
            raise ConfigError(f"{directory} holds {written}, not the {wanted} this engine ({self.name}) resumes "
                              "from: resume under the engine that wrote it (its trainable weights, "
                              "trainable.safetensors, load under any)")
        if self.is_deepspeed:
            with weights_only_loads(module):  # DeepSpeed would unpickle them: train/deepspeed_load.py
                module.load_checkpoint(str(directory / "deepspeed"), tag="state", load_lr_scheduler_states=False)
        elif self._fsdp2:
            state = torch.load(directory / "optimizer-full.pt", weights_only=True)
            fsdp2_load_full_optimizer_state(self.unwrap(module), optimizer.optimizer, state)
        else:
            optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))

    def place_teacher(self, teacher: nn.Module | None, placement: str = "auto") -> nn.Module | None:
        """Put a frozen model where its `placement` says (teachers/spec.py); returns the module to
        call (the same object, changed in place, for every placement)."""
        if teacher is None:
            return None
        if self.zero_stage == 3:
            if placement in ("same", "cpu_offload"):
                raise ConfigError(f"teacher.placement: {placement} is impossible under ZeRO-3: transformers "
                                  "partitions every model as it loads there; use `sharded` (or `auto`)")
            return self._zero3_inference(teacher)
        if placement == "sharded":
            if self._fsdp2:
                return self._fsdp2_inference(teacher)
            raise ConfigError("teacher.placement: sharded needs DeepSpeed ZeRO-3 or FSDP2 "
                              "(configs/accelerate/zero3.yaml, fsdp2.yaml); this engine keeps whole models")
        return _place_whole(teacher, placement, self.device)

    def _fsdp2_inference(self, model: nn.Module) -> nn.Module:
        """A frozen model under FSDP2, sharded like the student: one shard unit per transformer block (the
        classes the model declares unsplittable), then the rest; each unit is gathered as it runs."""
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for sub in model.modules():
            if type(sub).__name__ in blocks:
                fully_shard(sub)
        fully_shard(model)
        return model

    def _zero3_inference(self, model: nn.Module) -> nn.Module:
        """A frozen model under ZeRO-3. Transformers partitioned it at load (accelerate registers the ZeRO-3
        config, so every model built afterwards is created partitioned); a DeepSpeed engine without optimizer
        gathers each layer as it runs, through hooks on the module itself, so the plain module is returned."""
        import deepspeed

        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  **{k: ds[k] for k in ("bf16", "fp16") if k in ds}}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        self._frozen_engines.append(engine)  # keeps its hooks alive
        return model

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The plain module inside an engine's wrapper (the module itself if not wrapped)."""
        known = self._unwrapped.get(module)
        return known if known is not None else self.accelerator.unwrap_model(module)

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
        self._sync = sync
        if sync or self.world_size == 1 or self.is_deepspeed:
            yield
        else:
            with self.accelerator.no_sync(module):
                yield

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: Tensor) -> None:
        if self.is_deepspeed:  # summed micro-batch gradients; DeepSpeed's step (clip, update) at the boundary
            self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=self._sync, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, module: nn.Module, max_norm: float) -> Tensor:
        """Clip and return the norm before clipping (DeepSpeed clipped in its step: its norm is returned)."""
        return torch.as_tensor(self.accelerator.clip_grad_norm_(module.parameters(), max_norm))

    def grad_norm(self, module: nn.Module) -> Tensor:
        """Global gradient norm without clipping (for logging when clipping is off)."""
        if self.is_deepspeed:  # the gradients live partitioned in DeepSpeed's optimizer
            return torch.as_tensor(self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm() or 0.0)
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
        """The run is over. The process group stays up, so that another `train()` in this process (several runs
        under one launch) finds it, and is released when the process exits: DeepSpeed ZeRO-3 aborts at exit
        without that, and destroying it here would leave accelerate's state naming a group that is gone."""
        if dist.is_available() and dist.is_initialized():
            _release_process_group_at_exit()


# ----------------------------------------------------------------------------------------------- FSDP2
# Plain functions of torch's FSDP2 (`fully_shard`) modules, so that they are tested on CPU processes without
# accelerate (which sets FSDP up only for GPUs): tests/test_distributed.py.


@contextlib.contextmanager
def fsdp2_unsharded(module: nn.Module, recurse: bool = True) -> Iterator[None]:
    """Every FSDP2 unit inside `module` all-gathered (`recurse=False`: only `module`'s own unit, if it is one):
    its parameters are whole plain tensors until the end (then freed again; writes into them do not reach the
    shards)."""
    units = [m for m in (module.modules() if recurse else [module]) if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def fsdp2_load_full_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load whole tensors (by name, a subset) into the shards of an FSDP2 module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))


def fsdp2_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a sharded module as whole tensors keyed by parameter name, on the main process
    (an empty dict elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def fsdp2_load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
                                    ) -> None:
    """Load a whole optimizer state (every process passes the same one) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
