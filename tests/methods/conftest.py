"""Fixtures of the per-method twin tests: a teacher of another tokenizer, and a config builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_model_dir, tiny_run
from tests.methods.harness import NO_DROPOUT


@pytest.fixture(scope="session")
def cross_teacher(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    """A Llama-style teacher (d=48) with the SentencePiece-style tokenizer: vocabularies differ."""
    return make_model_dir(tmp_path_factory.mktemp("cross_teacher"), meta_tokenizer_dir, model_type="llama",
                          hidden_size=48, intermediate_size=96, seed=2)


def student_run(out: Path, train: Path, tokenizer: Path, teacher: Path, objective: dict[str, Any],
                **sections: Any) -> dict[str, Any]:
    """A tiny GPT-2 student (no dropout) distilled from `teacher` with `objective`."""
    cfg = tiny_run(out, train, tokenizer, teacher=teacher, objective=dict(objective), **sections)
    cfg["student"]["arch"].update(NO_DROPOUT)
    return cfg
