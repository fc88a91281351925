"""What the multi-process tests share (tests/test_distributed.py, tests/test_sharded_head_readers.py): the
launchers, a tiny run's config, launching one run or several, and the check that two processes follow one.

Start-up (imports, ~8 s a process on 2 CPU cores) is most of a tiny run's time, so the tests make their runs
once and read them from several tests (module fixtures), and train several runs one after the other under one
launch where the launch line itself is not what is tested (tests/train_several.py; several runs in one
process group are supported, see `Engine.end`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dualkd.config import load_config
from dualkd.train.loop import train
from tests.helpers import REPO, read_metrics, tiny_run

STEPS = 4  # a tiny run's steps; it checkpoints (and evaluates) halfway and at the end
HALF = STEPS // 2
ENGINES = {  # name -> launcher prefix (before `-m dualkd.cli ...`)
    "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "zero2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/zero2.yaml"), "--num_processes", "2", "--main_process_port", "0"],
    "zero3": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/zero3.yaml"), "--num_processes", "2", "--main_process_port", "0"],
    # every parameter partitioned, however small (tests/data/accelerate/zero3-no-persistence.yaml)
    "zero3_all": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "tests/data/accelerate/zero3-no-persistence.yaml"), "--num_processes", "2",
                  "--main_process_port", "0"],
    "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2", "--main_process_port", "0"],
}
# FSDP2 on CPU processes: torch's fully_shard driven directly (accelerate sets FSDP up only for GPUs)
FSDP2_CPU = [*ENGINES["ddp"], str(REPO / "tests" / "fsdp2_train_worker.py")]
NAMES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "zero3_all": "DeepSpeed ZeRO-3",
         "fsdp2": "FSDP2",
         "fsdp2_cpu": "FSDP2"}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (`make install` installs it)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP runs on GPUs only (2 needed)")


def env() -> dict[str, str]:
    """The launched processes' environment. TorchDynamo off: DeepSpeed imports its Muon optimizer at engine
    start, whose module compiles a function at import (torch.compile loads the inductor, ~1.5 s a process
    here); nothing these runs do compiles (dualkd never calls torch.compile), so only that start-up changes."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TORCHDYNAMO_DISABLE": "1"}


def write(tmp_path: Path, name: str, train_file: Path, student: Path, teacher: Path, micro: int, accum: int,
           placement: str = "auto", dev_file: Path | None = None, objective: dict | None = None,
           extra: dict | None = None, rouge: bool = True) -> Path:
    """A tiny run's config. With `rouge`, `best/` is chosen by ROUGE-L of responses sampled at each dev
    evaluation (sampling under the engine); without, by the dev loss."""
    # 24 dev examples in 5 batches: the processes get 3 and 2 (sharded engines pad, see sources.eval_batches);
    # 3 ROUGE-L prompts likewise
    sampled = {"select_by": "rougeL", "rouge_examples": 3, "rouge_repeats": 1} if rouge else {}
    cfg = tiny_run(tmp_path / name, train_file, student, teacher=teacher,
                   optimization={"max_steps": STEPS, "micro_batch_size": micro, "grad_accum": accum},
                   checkpoint={"every_steps": HALF, "keep_last": 2},
                   eval={"every_steps": HALF, "batch_size": 5, **sampled},
                   generation={"max_new_tokens": 8})
    cfg["data"]["dev"] = str(dev_file)
    cfg["student"] = {"path": str(student)}
    cfg["teacher"]["placement"] = placement
    if objective is not None:
        cfg["objective"] = objective
    cfg.update(extra or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(engine: str, *args: str) -> subprocess.CompletedProcess:
    """`dualkd ARGS` under `engine`'s launch line, as users launch it."""
    done = subprocess.run([*ENGINES[engine], "-m", "dualkd.cli", *args], env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def train_several(engine: str, configs: list[Path], *flags: str) -> str:
    """Train `configs` one after the other in one launch of `engine`; start-up is most of a tiny run's time.
    Returns what the processes wrote to stderr."""
    if engine == "fsdp2_cpu":
        command = [*FSDP2_CPU, "train", *flags]
    else:
        command = [*ENGINES[engine], str(REPO / "tests" / "train_several.py"), *flags]
    done = subprocess.run([*command, *map(str, configs)], env=env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stderr


def train_here(configs: list[Path]) -> None:
    """Train `configs` one after the other in this process: the one-process references (no start-up to pay;
    the test processes run one torch thread, as the launched ones do)."""
    for path in configs:
        train(load_config(path))


def resumable_copy(run: Path, cfg: Path) -> Path:
    """A copy of the finished run `run` cut back to its halfway checkpoint, and its config (returned)."""
    resumed = run.with_name(f"{run.name}-resumed")
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    resumed_cfg = cfg.with_name(f"{resumed.name}.yaml")
    resumed_cfg.write_text(cfg.read_text().replace(str(run), str(resumed)))
    return resumed_cfg


def assert_like_one_process(engine: str, said: str, single: Path, double: Path, resumed: Path,
                            rouge: bool = True) -> None:
    """`double` (2 processes under `engine`) follows the one-process curve `single` for the same global batch,
    checkpoints each rank's RNG, and `resumed` (from its halfway checkpoint under the engine) repeats the rest.
    `rouge`: the runs sampled ROUGE-L at each dev evaluation (`write`)."""
    said = said.replace("\n", " ")  # the console wraps long lines at spaces
    assert re.search(rf"2 process\(es\) on \S+ \({NAMES[engine]}\); global batch 8 \(2 x 2 x 2\)", said), said[-3000:]

    # the same loss curve as one process with the same global batch
    a, b = read_metrics(single), read_metrics(double)
    assert len(a) == len(b) == STEPS
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["lr"] == pytest.approx(rb["lr"])
    dev_a, dev_b = read_metrics(single, "dev"), read_metrics(double, "dev")
    assert [d["step"] for d in dev_a] == [d["step"] for d in dev_b] == [HALF, STEPS]
    for da, db in zip(dev_a, dev_b):  # the dev loss is the same; ROUGE-L samples differ by process layout
        assert da["loss"] == pytest.approx(db["loss"], rel=1e-5)
        if rouge:
            assert 0.0 <= db["rougeL"] <= 100.0
        else:
            assert "rougeL" not in db
    pa = load_file(str(single / "final" / "model.safetensors"))
    pb = load_file(str(double / "final" / "model.safetensors"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)
    ckpt = double / "checkpoints" / f"step-{HALF:08d}"
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()

    # resumed under the engine from the halfway checkpoint: the rest as in the uninterrupted run
    after = read_metrics(resumed)[HALF - STEPS:]
    assert [r["step"] for r in after] == list(range(HALF + 1, STEPS + 1))
    for ra, rb in zip(b[HALF:], after):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    pr = load_file(str(resumed / "final" / "model.safetensors"))
    for k in pb:
        torch.testing.assert_close(pb[k], pr[k], atol=1e-6, rtol=1e-5)


