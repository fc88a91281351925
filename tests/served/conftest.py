"""Fixtures of the tests against real servers: the SmolLM2 GGUF they serve, its float32 twin, a small data file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import needs_real_models, smollm2_gguf, synthetic_records, write_jsonl


@pytest.fixture(scope="session")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file (what the servers load)."""
    return smollm2_gguf(needs_real_models(), tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The same model dequantized to float32, as a Hugging Face folder (the live twin)."""
    return needs_real_models() / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic training records."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", synthetic_records(16, seed=5))
