"""The suite's shared fixtures (loaded by tests/conftest.py in the processes that run tests): tokenizers trained
inside the test session, tiny random-init models, small data files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dualkd.train.loop import train
from tests.helpers import MARIAN_ARCH, NO_DROPOUT, make_model_dir, nmt_run, synthetic_records, write_jsonl


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    from dualkd.data.formats import alpaca_prompt

    recs = synthetic_records(600, seed=123)
    extra = ["Hello world, naïve café — 東京 ✓", "Line one\nline two\ttab", "<|endoftext|> literal </s>",
             alpaca_prompt("Add the numbers.", "1 + 2") + "3", alpaca_prompt("Name a color.") + "Red."]
    return [r["prompt"] + r["output"] for r in recs] + extra * 20


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    """GPT-2-style byte-level BPE, vocab 400, trained here."""
    from dualkd.data.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok_byte")
    train_tokenizer(corpus_texts, vocab_size=400, style="byte_level").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def meta_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    """SentencePiece-style (▁, byte fallback) BPE, vocab 600: a different vocabulary from the byte one."""
    from dualkd.data.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok_meta")
    train_tokenizer(corpus_texts, vocab_size=600, style="metaspace").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 'teacher' (random init, d=48) sharing the byte tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("teacher"), byte_tokenizer_dir, n_embd=48, seed=1)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 student saved to disk, no dropout (the multi-process tests): it starts from saved weights, as
    in real KD, because random init under ZeRO-3 draws differently (each process initializes its own
    partition), which would make the curves differ from step 1 for that reason alone."""
    return make_model_dir(tmp_path_factory.mktemp("student"), byte_tokenizer_dir, seed=3, **NO_DROPOUT)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", synthetic_records(96, seed=5))


@pytest.fixture(scope="session")
def dev_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "dev.jsonl", synthetic_records(24, seed=6))


@pytest.fixture(scope="session")
def nmt_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """De -> En sentence pairs (synthetic): 96 for training, 24 for dev."""
    recs = synthetic_records(120, seed=8)
    rows = [{"de": r["prompt"][-50:], "en": r["output"]} for r in recs]
    root = tmp_path_factory.mktemp("mt")
    return write_jsonl(root / "train.jsonl", rows[:96]), write_jsonl(root / "dev.jsonl", rows[96:])


@pytest.fixture(scope="session")
def nmt_teacher(tmp_path_factory: pytest.TempPathFactory, nmt_pairs: tuple[Path, Path], byte_tokenizer_dir: Path
                ) -> Path:
    """A Marian teacher (d=48) trained briefly on `nmt_pairs`."""
    out = tmp_path_factory.mktemp("nmt_teacher")
    cfg = nmt_run(out, nmt_pairs, byte_tokenizer_dir, {"name": "sft"}, optimization={"max_steps": 60, "lr": 5e-3},
               student={"arch": {**MARIAN_ARCH, "d_model": 48, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96}})
    return train(cfg) / "final"


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Preference pairs from the synthetic tasks: the right answer is chosen, another task's answer rejected."""
    recs = synthetic_records(140, seed=5)
    rng = random.Random(0)
    pairs = [{"prompt": r["prompt"], "chosen": r["output"], "rejected": recs[rng.randrange(len(recs))]["output"]}
             for r in recs]
    pairs = [p for p in pairs if p["chosen"] != p["rejected"]]
    root = tmp_path_factory.mktemp("prefs")
    return write_jsonl(root / "train.jsonl", pairs[:96]), write_jsonl(root / "dev.jsonl", pairs[96:120])

@pytest.fixture(scope="module")
def reverse_model(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """A second model of the teacher's tokenizer (stands in for the reverse-DPO model in unit tests)."""
    return make_model_dir(tmp_path_factory.mktemp("rev"), byte_tokenizer_dir, n_embd=48, seed=3)
