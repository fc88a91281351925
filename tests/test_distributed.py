"""Two CPU processes (gloo) under each engine follow the single-process loss curve for the same global batch,
and a run checkpointed under the engine resumes to the same curve.

DDP is launched with torchrun (`accelerate launch --cpu --num_processes 2` silently runs one process);
DeepSpeed ZeRO-2 and ZeRO-3 with `accelerate launch --config_file configs/accelerate/zero{2,3}.yaml`, the
files users launch with. FSDP2 needs GPUs (accelerate sets FSDP up only for GPU-like devices): its test runs
where two GPUs are visible; on CPU, an FSDP launch is refused with a clear error (tested). FSDP2 on CPU
processes, driven by torch directly, is checked in tests/test_sharded_head_readers.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.launch import (
    ENGINES,
    HALF,
    assert_like_one_process,
    env,
    launch,
    needs_deepspeed,
    needs_two_gpus,
    resumable_copy,
    train_here,
    write,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
              student_dir: Path) -> Path:
    """The one-process run the launched runs are held to: 4 micro-batches of 2 per step (global batch 8)."""
    tmp = tmp_path_factory.mktemp("single")
    train_here([write(tmp, "single", train_file, student_dir, teacher_dir, micro=2, accum=4,
                               dev_file=dev_file)])
    return tmp / "single"


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory: pytest.TempPathFactory, train_file: Path, dev_file: Path, teacher_dir: Path,
                  student_dir: Path):  # noqa: ANN201
    """`launched_runs(engine, placement)`: the default objective's run under `engine`, launched as users launch
    (`-m dualkd.cli train CONFIG`), and its copy resumed from halfway (`--resume`); made once per engine.
    Returns what the first launch said, the run's config and its folder (the copy: "<folder>-resumed")."""
    made: dict[tuple[str, str], tuple[str, Path, Path]] = {}

    def runs(engine: str, placement: str) -> tuple[str, Path, Path]:
        if (engine, placement) not in made:
            tmp = tmp_path_factory.mktemp(f"launched-{engine}-{placement}")
            cfg = write(tmp, "double", train_file, student_dir, teacher_dir, micro=2, accum=2, placement=placement,
                        dev_file=dev_file)
            said = launch(engine, "train", str(cfg)).stderr
            launch(engine, "train", str(resumable_copy(tmp / "double", cfg)), "--resume")
            made[engine, placement] = said, cfg, tmp / "double"
        return made[engine, placement]
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize(("engine", "placement"), [
    ("ddp", "same"),
    pytest.param("zero2", "same", marks=needs_deepspeed),
    pytest.param("zero3", "sharded", marks=needs_deepspeed),  # the teacher as a frozen ZeRO-3 model
    pytest.param("fsdp2", "same", marks=needs_two_gpus),
    pytest.param("fsdp2", "sharded", marks=needs_two_gpus),
])
def test_two_processes_match_one(engine: str, placement: str, reference: Path, launched_runs) -> None:  # noqa: ANN001
    said, _, run = launched_runs(engine, placement)
    assert_like_one_process(engine, said, reference, run, run.with_name("double-resumed"))


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_on_cpu_is_refused(tmp_path: Path, train_file: Path, dev_file: Path, teacher_dir: Path,
                                student_dir: Path) -> None:
    cfg = write(tmp_path, "fsdp", train_file, student_dir, teacher_dir, micro=2, accum=2, dev_file=dev_file)
    done = subprocess.run([*ENGINES["fsdp2"], "-m", "dualkd.cli", "train", str(cfg)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "FSDP needs GPUs" in done.stderr


class _Payload:
    """A pickle that runs a command when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.distributed
@needs_deepspeed
def test_a_planted_pickle_in_a_deepspeed_checkpoint_never_runs(tmp_path: Path, launched_runs) -> None:  # noqa: ANN001
    """The manifest beside DeepSpeed's files is rewritten too (whoever can plant a file can): the resume must
    still refuse, naming the file, and nothing in it may run. (On a copy of the ZeRO-2 run cut back to halfway.)"""
    from dualkd.train.checkpoint import write_manifest

    _, launched_cfg, run = launched_runs("zero2", "same")
    mine = tmp_path / "zero2"
    shutil.copytree(run, mine)
    (tmp_path / "zero2.yaml").write_text(launched_cfg.read_text().replace(str(run), str(mine)))
    cfg = resumable_copy(mine, tmp_path / "zero2.yaml")
    folder = tmp_path / "zero2-resumed" / "checkpoints" / f"step-{HALF:08d}" / "deepspeed"
    target = next((folder / "state").glob("zero_pp_rank_0_*optim_states.pt"))
    state = torch.load(target, weights_only=False)  # our own file, written by the launched run
    marker = tmp_path / "PWNED"
    state["planted"] = _Payload(marker)
    torch.save(state, target)
    write_manifest(folder)
    done = subprocess.run([*ENGINES["zero2"], "-m", "dualkd.cli", "train", str(cfg), "--resume"], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "unsupported GLOBAL posix.system" in done.stderr and target.name in done.stderr
    assert not marker.exists()
