"""Malformed data files (tests/data/malformed/): each bad record stops the run before training with one message
naming file:line and the field, or — with `data.on_error: skip` — is skipped and counted, the good records
kept. Two files are valid in spite of their looks (a UTF-8 BOM; OpenAI-style text content parts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dualkd.config import DataConfig, DataSource
from dualkd.data.dataset import build_dataset
from dualkd.errors import DataError

MALFORMED = Path(__file__).parent / "data" / "malformed"

# file -> what the message says after "FILE:2: " (the bad record is line 2 of each file, between two good ones)
CASES = {
    "truncated.jsonl": "invalid JSON at column 30 (the end of the line: a truncated record?)",
    "lone-surrogate.jsonl": "field 'prompt': invalid Unicode: a lone surrogate U+D800 at character 2",
    "lone-surrogate-output.jsonl": "field 'output': invalid Unicode: a lone surrogate U+DFFF at character 1",
    "huge-number.jsonl": "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion",
    "deep-nesting.jsonl": "invalid JSON: nested too deeply to read",
    "duplicate-key.jsonl": "field 'output' appears twice in one object",
    "unknown-role.jsonl": "field 'messages[0].role': unknown role 'robot'; expected one of system, user, assistant",
    "content-missing.jsonl": "field 'messages[0].content' is missing",
    "content-null.jsonl": "field 'messages[0].content': expected a string or a list of text parts, got null",
    "content-image-part.jsonl": "field 'messages[0].content[1]': only text parts",
    "preference-missing-chosen.jsonl": "field 'chosen' is missing",
    "not-alternating.jsonl": "field 'messages': the tokenizer's chat template refuses this conversation: "
                             "TemplateError: Conversation roles must alternate",
}

# a Mistral/Gemma-style template: refuses turns that do not alternate user/assistant
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def strict_tokenizer(byte_tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    tok.chat_template = STRICT_TEMPLATE
    return tok


def _build(name: str, tokenizer, on_error: str = "raise"):
    path = MALFORMED / name
    return build_dataset(DataSource(path=str(path)), DataConfig(train=str(path), on_error=on_error), tokenizer)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_record_stops_with_file_line_and_field(name: str, strict_tokenizer) -> None:
    with pytest.raises(DataError) as e:
        _build(name, strict_tokenizer)
    assert str(e.value).startswith(f"{MALFORMED / name}:2: {CASES[name]}"), str(e.value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_record_is_skipped_and_counted(name: str, strict_tokenizer) -> None:
    dataset, report = _build(name, strict_tokenizer, on_error="skip")
    assert len(dataset) == report.kept == 2
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"{MALFORMED / name}:2: {CASES[name]}")
    assert "SKIPPED 1 bad records" in report.summary()


def test_every_malformed_file_has_a_case() -> None:
    valid = {"bom.jsonl", "content-text-parts.jsonl"}
    assert {p.name for p in MALFORMED.glob("*.jsonl")} == set(CASES) | valid


def test_a_byte_order_mark_is_not_data(strict_tokenizer) -> None:
    dataset, report = _build("bom.jsonl", strict_tokenizer)
    assert report.kept == 2 and dataset.examples[0].prompt == "What is 2 + 2?"


def test_text_content_parts_are_joined(strict_tokenizer) -> None:
    dataset, _ = _build("content-text-parts.jsonl", strict_tokenizer)
    assert dataset.examples[1].messages[0]["content"] == "Line one\nline two"
    assert dataset.examples[1].response == "Yes"
