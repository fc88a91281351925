"""Every benchmark script starts and explains itself (`--help`): an import error or a broken argument parser
in a script that runs only on a quiet machine or a GPU would otherwise surface only then."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in ("__init__.py", "harness.py"))


def test_every_benchmark_is_listed() -> None:
    assert {"losses.py", "kd_step.py", "fused_ab.py", "rollout.py", "cache.py", "engines.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
