"""Shared fixtures: tokenizers trained inside the test session, tiny random-init models, tiny run configs.

Nothing here touches the network or ../shared; tests that need real models or data are marked `slow` and
skip when those folders are absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every subprocess finds the virtual environment's tools first, as in an activated environment: DeepSpeed
# compiles its CPU ops with the first `ninja` on PATH, and the environment's ninja and a system one of another
# version read each other's build log as stale, so alternating between them rebuilt the ops (~1 min) each time.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DUALKD_DATA", REPO.parent / "shared" / "data"))
REAL_MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def synthetic_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    from dualkd.data.synthetic import generate

    return generate("mixed", n, seed)


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


def make_model_dir(out: Path, tokenizer_dir: Path, model_type: str = "gpt2", seed: int = 0, **arch: Any) -> Path:
    """A random-init causal LM (or Marian translation model) saved with its tokenizer as a Hugging Face folder."""
    from transformers import AutoTokenizer

    from dualkd.config import ModelConfig
    from dualkd.models import load_model

    defaults = {
        "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256},
        "llama": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
        "qwen2": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 256},
        "marian": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                   "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                   "max_position_embeddings": 128, "dropout": 0.0, "attention_dropout": 0.0,
                   "activation_dropout": 0.0},
    }[model_type]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = ModelConfig(init="random", arch={"model_type": model_type, **defaults, **arch}, tokenizer=str(tokenizer_dir))
    model = load_model(spec, tokenizer, role="student", seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 'teacher' (random init, d=48) sharing the byte tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("teacher"), byte_tokenizer_dir, n_embd=48, seed=1)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", synthetic_records(96, seed=5))


@pytest.fixture(scope="session")
def dev_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "dev.jsonl", synthetic_records(24, seed=6))


def tiny_run(out: Path, train: Path, tokenizer_dir: Path, teacher: Path | None = None, **sections: Any
             ) -> dict[str, Any]:
    """A run config (as a dict) for a 2-layer GPT-2 student: a few seconds on CPU."""
    cfg: dict[str, Any] = {
        "output_dir": str(out),
        "seed": 7,
        "student": {"init": "random", "tokenizer": str(tokenizer_dir),
                    "arch": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256}},
        "data": {"train": str(train), "max_length": 96, "max_prompt_length": 80},
        "objective": {"name": "sft"},
        "optimization": {"lr": 3e-3, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 12, "warmup_steps": 0},
        "checkpoint": {"every_steps": 1000},
        "logging": {"every_steps": 1000, "tensorboard": False, "progress_bar": "off"},
    }
    if teacher is not None:
        cfg["teacher"] = {"path": str(teacher)}
        cfg["objective"] = {"name": "kd", "kd_rate": 0.5, "temperature": 2.0}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "objective":
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def needs_real_models() -> Path:
    if not (REAL_MODELS / ".done").exists():
        pytest.skip(f"real models not found in {REAL_MODELS} (run ../shared/tools/real-models)")
    return REAL_MODELS


def needs_shared_data() -> Path:
    if not (SHARED_DATA / "dolly" / "test.jsonl").exists():
        pytest.skip(f"shared data not found in {SHARED_DATA}")
    return SHARED_DATA
