"""The test session's environment, and where its fixtures live: tests/fixtures.py (tokenizers trained inside the
test session, tiny random-init models, small data files; helpers.py holds what tests share besides fixtures:
builders, run configs, skips).

Nothing here touches the network or ../shared; tests that need real models or data are marked `slow` and
skip when those folders are absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs the suite in two processes (pytest-xdist) on machines with few cores: one torch thread each
# (and in every process a test starts). A second thread gains the tiny models nothing and, with the other
# worker busy, oversubscribes the cores: in-process runs took 2-5x longer with two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every subprocess finds the virtual environment's tools first, as in an activated environment: DeepSpeed
# compiles its CPU ops with the first `ninja` on PATH, and the environment's ninja and a system one of another
# version read each other's build log as stale, so alternating between them rebuilt the ops (~1 min) each time.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_configure(config: pytest.Config) -> None:
    """The fixtures (and with them torch and transformers, ~10 s of CPU) are loaded where tests run: not in
    pytest-xdist's controller process, which only hands tests to its workers."""
    controller = not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))
    if not controller:
        config.pluginmanager.import_plugin("tests.fixtures")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-process tests (marker `distributed`) first: they are the suite's longest, and under `make test`
    (two workers, one file at a time each) the rest of the suite then fills the other worker around them,
    instead of one worker running them alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("distributed") is None)
