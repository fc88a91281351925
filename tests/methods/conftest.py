"""Fixtures of the per-method twin tests: a teacher of another tokenizer, and a config builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_model_dir, synthetic_records, write_jsonl


@pytest.fixture(scope="session")
def cross_teacher(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    """A Llama-style teacher (d=48) with the SentencePiece-style tokenizer: vocabularies differ."""
    return make_model_dir(tmp_path_factory.mktemp("cross_teacher"), meta_tokenizer_dir, model_type="llama",
                          hidden_size=48, intermediate_size=96, seed=2)


# ------------------------------------------------------------------------------------- translation models

@pytest.fixture(scope="session")
def mt_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """De -> En sentence pairs (synthetic): 24 training pairs."""
    rows = [{"de": r["prompt"][-50:], "en": r["output"]} for r in synthetic_records(24, seed=8)]
    return write_jsonl(tmp_path_factory.mktemp("mt") / "train.jsonl", rows)


@pytest.fixture(scope="session")
def marian_teacher(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """A random-init Marian teacher (d=48) of the byte tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("marian_teacher"), byte_tokenizer_dir, model_type="marian",
                          d_model=48, encoder_ffn_dim=96, decoder_ffn_dim=96, seed=4)


@pytest.fixture(scope="session")
def preference_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 preference pairs from the synthetic tasks: the right answer chosen, another task's answer rejected."""
    recs = synthetic_records(30, seed=5)
    pairs = [{"prompt": r["prompt"], "chosen": r["output"], "rejected": recs[(i + 7) % len(recs)]["output"]}
             for i, r in enumerate(recs)]
    pairs = [p for p in pairs if p["chosen"] != p["rejected"]][:24]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "train.jsonl", pairs)


