"""Atomic checkpoints for exact resume.

A checkpoint is a folder `checkpoints/step-00000120/` holding:
    trainable.safetensors   every parameter that requires grad (student, LoRA adapters, projectors)
    optimizer.pt            optimizer state (our own file; loaded with weights_only=True)
    scheduler.pt            learning-rate schedule state
    rng-rank{r}.pt          RNG streams of each process (torch, CUDA, python, numpy)
    source-rank{r}.json     state private to each process's batch source (the replay buffer), if any
    trainer_state.json      step, data position, best dev loss, ...
    deepspeed/              under DeepSpeed: its own checkpoint (module and optimizer partitions), with
                            dualkd-manifest.json, the SHA-256 of each file, checked before DeepSpeed unpickles them
It is written under `.tmp-step-...`, every file fsync'ed, then renamed into place: a crash (even SIGKILL)
leaves either the previous complete checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dualkd.atomic import fsync_dir, replace_dir
from dualkd.errors import DualKDError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps done."""
    source: dict[str, Any] = field(default_factory=dict)
    """Data position of the batch source."""
    best_dev_loss: float | None = None
    """Dev loss at `best_step`."""
    best_value: float | None = None
    """The selection metric (`eval.select_by`) at `best_step`."""
    best_step: int | None = None
    tokens_seen: int = 0
    """Response tokens trained on, over all processes."""
    resume_key: dict[str, Any] = field(default_factory=dict)
    """Settings that must match for an exact resume (seed, global batch, data, objective)."""


# ----------------------------------------------------------------------------------------------- files


def remove_dir(path: Path) -> None:
    """Delete a checkpoint crash-safely: renamed out of the `step-N` namespace first (one atomic step), so a
    kill during the deletion leaves a `.deleting-` folder that no listing counts, never a half-deleted
    `step-N/`. Leftovers are removed at the next rotation."""
    doomed = path.with_name(f".deleting-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


_COMPLETE = ("trainer_state.json", "trainable.safetensors", "scheduler.pt")


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save or deletion are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and all((p / name).is_file() for name in _COMPLETE):
            found.append((int(m.group(1)), p))
    return sorted(found)


# ----------------------------------------------------------------------------------------------- DeepSpeed

DEEPSPEED_DIR = "deepspeed"
MANIFEST = "dualkd-manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """SHA-256 of every file DeepSpeed wrote into `folder`: DeepSpeed reads its checkpoints back with
    `torch.load(weights_only=False)` (pickle, which can run code), so a resume loads only files this run
    wrote. Costs one read of the optimizer state per checkpoint (about 1 GB/s)."""
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1))


def verify_manifest(folder: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose files are not exactly the ones this run's manifest lists."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DualKDError(f"{folder}: no {MANIFEST}, so it was not written by dualkd; DeepSpeed would unpickle "
                          "it (torch.load with weights_only=False), which can run code: refusing to resume from it")
    listed = json.loads(manifest.read_text())["sha256"]
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"{name} is not in the manifest" for name in sorted(found - set(listed))]
    problems += [f"{name} is missing" for name in sorted(set(listed) - found)]
    problems += [f"{name} changed since it was written" for name in sorted(found & set(listed))
                 if _sha256(folder / name) != listed[name]]
    if problems:
        raise DualKDError(f"{folder}: not as this run wrote it ({'; '.join(problems[:3])}); DeepSpeed would "
                          "unpickle these files (torch.load with weights_only=False): refusing to resume from it")


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save/load/rotate checkpoints of one run. All processes call save/load; only the main one writes shared
    files; each process writes its own RNG state."""

    def __init__(self, ckpt_dir: Path, engine: Any, keep_last: int, keep_best: bool):
        self.dir = ckpt_dir
        self.engine = engine
        self.keep_last = keep_last
        self.keep_best = keep_best

    def latest(self) -> Path | None:
        found = list_checkpoints(self.dir)
        return found[-1][1] if found else None

    def path_for(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainerState,
             rank_state: dict[str, Any] | None = None) -> Path:
        engine = self.engine
        final = self.path_for(state.step)
        tmp = self.dir / f".tmp-step-{state.step:08d}"
        if engine.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        engine.barrier()
        torch.save(rng_state(), tmp / f"rng-rank{engine.rank}.pt")
        if rank_state is not None:
            (tmp / f"source-rank{engine.rank}.json").write_text(json.dumps(rank_state))
        with engine.gathered(module):
            if engine.is_main:
                trainable = {n: p.detach().contiguous().cpu() for n, p in engine.unwrap(module).named_parameters()
                             if p.requires_grad}
                save_file(trainable, str(tmp / "trainable.safetensors"))
        engine.save_optimizer(module, optimizer, tmp)
        engine.barrier()
        if engine.is_main:
            if (tmp / DEEPSPEED_DIR).is_dir():
                write_manifest(tmp / DEEPSPEED_DIR)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        engine.barrier()
        if engine.is_main:
            replace_dir(tmp, final)
            self._rotate(state)
        engine.barrier()
        return final

    @staticmethod
    def read_state(path: Path) -> TrainerState:
        """The trainer state of a checkpoint, without loading anything else."""
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))

    def load(self, path: Path, module: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any
             ) -> TrainerState:
        state = self.read_state(path)
        self.engine.load_state(module, read_trainable(self.engine.unwrap(module), path / "trainable.safetensors"))
        if optimizer is not None:
            if (path / DEEPSPEED_DIR).is_dir():
                verify_manifest(path / DEEPSPEED_DIR)
            self.engine.load_optimizer(module, optimizer, path)
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng-rank{self.engine.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:  # resumed with more processes than saved: the extra ones start from the seeded streams
            print(f"[dualkd] note: {rng_file.name} missing (different process count); RNG not restored")
        return state

    def load_rank_state(self, path: Path) -> dict[str, Any] | None:
        """This process's source state saved with the checkpoint (None when the source keeps none)."""
        file = path / f"source-rank{self.engine.rank}.json"
        return json.loads(file.read_text()) if file.exists() else None

    def _rotate(self, state: TrainerState) -> None:
        for leftover in self.dir.glob(".deleting-step-*"):  # a deletion a kill interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        found = list_checkpoints(self.dir)
        keep = {step for step, _ in found[-self.keep_last:]}
        if self.keep_best and state.best_step is not None:
            keep.add(state.best_step)
        for step, path in found:
            if step not in keep:
                remove_dir(path)


def read_trainable(module: nn.Module, file: Path) -> dict[str, torch.Tensor]:
    """The saved trainable parameters, checked against `module`: every trainable parameter must be in the file
    and nothing else."""
    saved = load_file(str(file))
    wanted = {n for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = wanted - saved.keys(), saved.keys() - {n for n, _ in module.named_parameters()}
    if missing or unexpected:
        raise DualKDError(f"checkpoint {file.parent} does not fit this model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return saved
