"""Two processes with torchrun + gloo on CPU follow the single-process loss curve for the same global batch.

(`accelerate launch --cpu --num_processes 2` silently runs one process; torchrun gives two real ranks.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, read_metrics, tiny_run

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _write(tmp_path: Path, name: str, train_file: Path, tokenizer: Path, teacher: Path, micro: int, accum: int
           ) -> Path:
    cfg = tiny_run(tmp_path / name, train_file, tokenizer, teacher=teacher,
                   optimization={"max_steps": 6, "micro_batch_size": micro, "grad_accum": accum},
                   checkpoint={"every_steps": 3})
    cfg["student"]["arch"].update(NO_DROPOUT)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path: Path, train_file: Path, teacher_dir: Path,
                                 byte_tokenizer_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = _write(tmp_path, "single", train_file, byte_tokenizer_dir, teacher_dir, micro=2, accum=4)
    subprocess.run([sys.executable, "-m", "dualkd.cli", "train", str(single)], env=env, check=True,
                   capture_output=True)
    double = _write(tmp_path, "double", train_file, byte_tokenizer_dir, teacher_dir, micro=2, accum=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, "-m", "dualkd.cli", "train", str(double)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stderr and "global batch 8 (2 x 2 x 2)" in done.stderr

    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "double")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    pa = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    pb = load_file(str(tmp_path / "double" / "final" / "model.safetensors"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)
    ckpt = tmp_path / "double" / "checkpoints" / "step-00000006"
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()
