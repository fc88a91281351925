"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and resumed reproduces the uninterrupted run's
per-step losses bit for bit on CPU. Runs are subprocesses of the real CLI, as a user would start them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import REPO, read_metrics, tiny_run

STEPS = 30


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualkd.cli", *args]


def _config(tmp_path: Path, name: str, train_file: Path, tokenizer: Path, teacher: Path) -> Path:
    cfg = tiny_run(tmp_path / name, train_file, tokenizer, teacher=teacher,
                   optimization={"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2},
                   checkpoint={"every_steps": 5, "keep_last": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _interrupt(cfg: Path, run_dir: Path, signum: int) -> subprocess.CompletedProcess | subprocess.Popen:
    proc = subprocess.Popen(_cli("train", str(cfg)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = run_dir / "checkpoints" / "step-00000005"
    deadline = time.time() + 120
    while not (first / "trainer_state.json").exists():
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"run ended before its first checkpoint: {err.decode()[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, train_file: Path, teacher_dir: Path,
                  byte_tokenizer_dir: Path) -> Path:
    """The reference both interrupted runs are held to: the same config, never stopped."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ref_cfg = _config(tmp, "ref", train_file, byte_tokenizer_dir, teacher_dir)
    subprocess.run(_cli("train", str(ref_cfg)), env=_env(), check=True, capture_output=True)
    return tmp / "ref"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, train_file: Path, teacher_dir: Path,
                                                 byte_tokenizer_dir: Path, uninterrupted: Path, signum: int) -> None:
    ref = read_metrics(uninterrupted)

    cfg = _config(tmp_path, "run", train_file, byte_tokenizer_dir, teacher_dir)
    run_dir = tmp_path / "run"
    proc = _interrupt(cfg, run_dir, signum)
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # graceful: a checkpoint at the step where it stopped, exit code 128 + 15
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read().decode()[-2000:]
        stopped = [e for e in read_metrics(run_dir, "event") if e["event"] == "stopped"]
        assert stopped and (run_dir / "checkpoints" / f"step-{stopped[0]['step']:08d}").is_dir()
    assert not (run_dir / "final").exists(), "the run finished before it could be interrupted"
    killed_at = max(r["step"] for r in read_metrics(run_dir))
    assert killed_at < STEPS

    done = subprocess.run(_cli("train", str(cfg), "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # records after the checkpoint were replaced
    for a, b in zip(ref, got):
        assert (a["step"], a["loss"], a["ce"], a["kd"], a["grad_norm"], a["lr"]) == (
            b["step"], b["loss"], b["ce"], b["kd"], b["grad_norm"], b["lr"])
    final_ref = load_file(str(uninterrupted / "final" / "model.safetensors"))
    final_got = load_file(str(run_dir / "final" / "model.safetensors"))
    assert all(final_ref[k].equal(final_got[k]) for k in final_ref)
    assert any(e["event"] == "resumed" for e in read_metrics(run_dir, "event"))
