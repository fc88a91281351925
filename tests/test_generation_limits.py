"""What a new user meets first when generating: non-ASCII text survives a trained tokenizer's decode, the
model's positions cap generation (no IndexError), and pickled weights are refused by every loading command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dualkd import generate, progress
from dualkd.config import GenerationConfig
from dualkd.data.formats import Example
from dualkd.data.tokenizers import train_tokenizer
from dualkd.errors import ModelError
from dualkd.generate import generate_responses, load_for_generation
from tests.helpers import make_model_dir

NON_ASCII = "Ü 東京 🙂 café"


@pytest.mark.parametrize("style", ["metaspace", "byte_level"])
def test_non_ascii_text_round_trips_through_a_trained_tokenizer(style: str, tmp_path: Path) -> None:
    """Trained on ASCII only: the characters come back through byte pieces, also with skip_special_tokens
    (what generation, SeqKD files and ROUGE-L read)."""
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300, style=style)
    tok.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok(NON_ASCII, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == NON_ASCII
    assert tok.decode([tok.eos_token_id, *ids, tok.pad_token_id], skip_special_tokens=True) == NON_ASCII


def test_non_ascii_through_train_generate_decode(tmp_path: Path) -> None:
    """A model whose output head can only emit the byte pieces of '東': what it generates decodes to '東'."""
    tok = train_tokenizer(["plain ascii text only"] * 20, vocab_size=300, style="metaspace")
    tok.save_pretrained(tmp_path / "tok")
    model_dir = make_model_dir(tmp_path / "model", tmp_path / "tok", n_positions=64)
    tok = AutoTokenizer.from_pretrained(model_dir)
    target = tok("東", add_special_tokens=False)["input_ids"]  # ▁ + three byte pieces
    model, tok = load_for_generation(model_dir)
    calls = iter([*target, tok.eos_token_id])

    def forced(input_ids, **kw):  # the model's next token is the next piece of the target, then EOS
        out = original(input_ids=input_ids, **kw)
        out.logits[:, -1].fill_(-1e9)
        out.logits[:, -1, next(calls)] = 0.0
        return out

    original = model.forward
    model.forward = forced
    (text,) = generate_responses(model, tok, [Example(where="x:1", prompt="ascii", references=("y",))],
                                 GenerationConfig(do_sample=False, max_new_tokens=8))
    assert text == "東"


def test_generation_is_capped_at_the_models_positions(tmp_path: Path, byte_tokenizer_dir: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "_capped_notes", set())  # a fresh process: nothing said yet
    model_dir = make_model_dir(tmp_path / "m", byte_tokenizer_dir, n_positions=64)
    model, tok = load_for_generation(model_dir)
    examples = [Example(where=f"x:{i}", prompt="Name a color. " * (i + 1), references=("red",)) for i in range(3)]
    settings = GenerationConfig(max_new_tokens=200, max_length=512, max_prompt_length=256)  # far past 64
    for _ in range(2):
        texts = generate_responses(model, tok, examples, settings, seed=0)
        assert len(texts) == 3
    notes = [line for line in capsys.readouterr().err.splitlines() if "generation capped" in line]
    assert notes == ["[dualkd] note: the model has 64 positions; generation capped at max_length 64, "
                     "max_new_tokens 64, max_prompt_length 32"]  # said once
    long = [Example(where="x:9", prompt="Name a color. " * 40, references=("red",))]
    with pytest.raises(ModelError, match="fills the model's 64 positions .* set generation.max_prompt_length"):
        generate_responses(model, tok, long, settings, seed=0)


def test_pickled_weights_are_refused(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m", byte_tokenizer_dir)
    shutil.copytree(model_dir, tmp_path / "bin")
    torch.save(load_file(str(tmp_path / "bin" / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()  # a folder as older tools wrote it
    with pytest.raises(ModelError, match=r"no safetensors weights \(found pytorch_model.bin\)"):
        load_for_generation(tmp_path / "bin")


def test_long_jobs_print_progress_lines_into_logs(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Not a terminal (a batch log): a plain line about every 10% once the job runs past 10 s (generation,
    teacher caching); nothing for short jobs."""
    clock = iter(float(t) for t in range(0, 1000, 5))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = progress.ProgressLines(200, "caching train", None)
    for _ in range(20):
        lines.advance(10)
    out = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[dualkd] caching train")]
    assert 8 <= len(out) <= 11 and out[-1].startswith("[dualkd] caching train: 200/200")
    quick = progress.ProgressLines(10, "short", None)
    quick.advance(10)
    assert "short" not in capsys.readouterr().err
