"""`dualkd likelihood`: CE per response token and bits per byte against a plain per-example float64 twin."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dualkd.cli import main
from dualkd.data.formats import Example
from dualkd.errors import DataError
from dualkd.eval.likelihood import response_likelihood
from dualkd.eval.suites import resolve_test_sets
from dualkd.generate import load_for_generation


def _twin(model, tokenizer, examples: list[Example]) -> tuple[float, float]:
    """One example at a time, full logits in float64: Σ −log p over the response tokens + EOS."""
    nats, tokens, n_bytes = 0.0, 0, 0
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(ex.references[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = model(ids).logits.double().log_softmax(-1)[0]  # [T, V]
        for j, token in enumerate(response):
            nats -= float(logp[len(prompt) + j - 1, token])
        tokens += len(response)
        n_bytes += len(ex.references[0].encode("utf-8"))
    return nats / tokens, nats / math.log(2) / n_bytes


def test_likelihood_matches_the_plain_formula(teacher_dir: Path, dev_file: Path) -> None:
    (test,), _ = resolve_test_sets([dev_file], max_examples=12)
    model, tokenizer = load_for_generation(teacher_dir, "float32")
    got = response_likelihood(model, tokenizer, test.examples, batch_size=5)
    ce, bpb = _twin(model, tokenizer, test.examples)
    assert got["examples"] == 12
    assert got["ce_per_token"] == pytest.approx(ce, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)


def test_likelihood_refuses_what_the_model_cannot_hold(teacher_dir: Path) -> None:
    model, tokenizer = load_for_generation(teacher_dir, "float32")
    long = Example(prompt="a b c ", references=("word " * 400,), where="long.jsonl:1")
    with pytest.raises(DataError, match="long.jsonl:1: .* more than the model's 256 positions"):
        response_likelihood(model, tokenizer, [long])


def test_cli_likelihood(teacher_dir: Path, dev_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ce.json"
    assert main(["likelihood", str(teacher_dir), "--data", str(dev_file), "--max-examples", "4", "--out",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 4 and result["bits_per_byte"] > 0


def test_a_prompt_past_the_model_names_this_command_not_training(teacher_dir: Path) -> None:
    """`likelihood` has no data.max_prompt_length: its message must not send the user looking for one."""
    model, tokenizer = load_for_generation(teacher_dir, "float32")
    long = Example(prompt="word " * 400, references=("yes",), where="long.jsonl:3")
    with pytest.raises(DataError, match="long.jsonl:3: the prompt alone is longer") as err:
        response_likelihood(model, tokenizer, [long])
    assert "max_prompt_length" not in str(err.value)
