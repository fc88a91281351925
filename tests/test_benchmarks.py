"""Every benchmark script starts and explains itself (`--help`): an import error or a broken argument parser
in a script that runs only on a quiet machine or a GPU would otherwise surface only then. (The scripts run
one after the other in one process, as `python SCRIPT --help` would run each: tests/benchmark_help.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in ("__init__.py", "harness.py"))


def test_every_benchmark_is_listed() -> None:
    assert {"losses.py", "kd_step.py", "fused_ab.py", "rollout.py", "cache.py", "engines.py"} <= set(SCRIPTS)


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    """Every script's `--help`, all run in one fresh process (tests/benchmark_help.py): the imports, most of
    each script's start-up, are paid once."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "benchmark_help.py"),
                           *(str(REPO / "benchmarks" / s) for s in SCRIPTS)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script: str, helps: dict[str, dict]) -> None:
    result = helps[script]
    assert result["code"] == 0, result["stderr"][-2000:]
    assert "usage:" in result["stdout"]
