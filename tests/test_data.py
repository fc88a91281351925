"""Record formats, readers and every bad-input case: each error names the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dualkd.config import DataConfig, DataSource
from dualkd.data.dataset import build_dataset
from dualkd.data.formats import ALPACA_TEMPLATE, parse_record, render
from dualkd.data.readers import load_examples
from dualkd.errors import DataError
from tests.helpers import write_jsonl


def _src(path: Path) -> DataSource:
    return DataSource(path=str(path))


def test_prompt_output_string_and_references(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Q: 1+1?\nA:", "output": " 2"},
        {"prompt": "Name a color.", "output": ["red", "blue"]},
    ])
    examples, report = load_examples(_src(f))
    assert report.kept == 2 and not report.skipped
    assert examples[0].prompt == "Q: 1+1?\nA:" and examples[0].response == " 2"
    assert examples[1].references == ("red", "blue") and examples[1].response == "red"
    assert examples[1].where == f"{f}:2"


def test_alpaca_template_exact() -> None:
    ex = parse_record({"instruction": "Say hi.", "input": "", "output": "hi"}, "x:1")
    assert ex.prompt == ALPACA_TEMPLATE.format(instruction="Say hi.")
    assert ex.prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    with_input = parse_record({"instruction": "Add.", "input": "1 + 2", "output": "3"}, "x:2")
    assert with_input.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n1 + 2\n\n### Response:\n")


def test_auto_detection_prefers_rendered_prompt() -> None:
    # the Dolly protocol files carry both `instruction` and an already rendered `prompt`
    ex = parse_record({"instruction": "I", "input": "", "prompt": "P", "output": "O"}, "x:1")
    assert ex.prompt == "P"
    ex = parse_record({"instruction": "I", "input": "", "prompt": "P", "output": "O"}, "x:1", fmt="alpaca")
    assert "### Instruction:\nI" in ex.prompt


def test_messages_rendered_with_chat_template(byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ex = parse_record({"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi?"},
                                    {"role": "assistant", "content": "Hello."}]}, "chat.jsonl:1")
    prompt, response = render(ex, tok)
    assert prompt == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi?<|endoftext|>\n<|assistant|>\n"
    assert response == "Hello.<|endoftext|>\n"


def test_hf_dataset_source_from_disk(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "a", "output": "b"}, {"prompt": "c", "output": ""}])
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"\[train\] row 1: field 'output': empty response"):
        load_examples(DataSource(hf=str(tmp_path / "ds")))
    examples, report = load_examples(DataSource(hf=str(tmp_path / "ds")), on_error="skip")
    assert len(examples) == 1 and len(report.skipped) == 1


def test_hf_hub_source_offline_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"hf:no-such-org/no-such-dataset\[train\]: cannot load the dataset"):
        load_examples(DataSource(hf="no-such-org/no-such-dataset"))


def test_synthetic_source_is_deterministic() -> None:
    a, _ = load_examples(DataSource(synthetic="mixed", num_examples=20, seed=3))
    b, _ = load_examples(DataSource(synthetic="mixed", num_examples=20, seed=3))
    c, _ = load_examples(DataSource(synthetic="mixed", num_examples=20, seed=4))
    assert [x.prompt for x in a] == [x.prompt for x in b] != [x.prompt for x in c]


# ------------------------------------------------------------------------------------------- bad input

BAD_LINES = [
    ('{"prompt": "a", "output": "b"', "invalid JSON at column", None),
    ('{"output": "b"}', "unknown record format", None),
    ('{"prompt": "a"}', "field 'output' is missing", "output"),
    ('{"prompt": 3, "output": "b"}', "field 'prompt': expected a string, got int", "prompt"),
    ('{"prompt": "a", "output": {"x": 1}}', "field 'output': expected a string or a list of strings, got dict",
     "output"),
    ('{"prompt": "a", "output": "   "}', "field 'output': empty response", "output"),
    ('{"prompt": "a", "output": []}', "field 'output': empty list of references", "output"),
    ('{"instruction": "", "output": "b"}', "field 'instruction' is empty", "instruction"),
    ('{"instruction": "i", "input": 7, "output": "b"}', "field 'input': expected a string, got int", "input"),
    ('["a", "b"]', "expected a JSON object, got list", None),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "field 'messages': expected a list of at least two",
     "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "the last turn must be the assistant's response", "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
     "empty response", "messages"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
     "field 'messages[0].content' is missing", "messages"),
]


@pytest.mark.parametrize("line,message,field", BAD_LINES)
def test_bad_record_names_file_line_and_field(tmp_path: Path, line: str, message: str, field: str | None) -> None:
    good = '{"prompt": "p", "output": "o"}'
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as e:
        load_examples(_src(f))
    text = str(e.value)
    assert text.startswith(f"{f}:3: "), text
    assert message in text
    if field is not None:
        assert f"'{field}" in text


def test_undecodable_bytes(tmp_path: Path) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a", "output": "b"}\n{"prompt": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: undecodable bytes: invalid UTF-8 at byte offset 15 of the line"):
        load_examples(_src(f))


def test_skip_counts_every_bad_line(tmp_path: Path) -> None:
    good = '{"prompt": "p", "output": "o"}'
    f = write_jsonl(tmp_path / "mixed.jsonl", [good, "{oops", good, '{"prompt": "p", "output": ""}', good])
    examples, report = load_examples(_src(f), on_error="skip")
    assert len(examples) == 3 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{f}:2:")
    assert "SKIPPED 2 bad records" in report.summary()


def test_blank_lines_are_not_records(tmp_path: Path) -> None:
    f = tmp_path / "blank.jsonl"
    f.write_text('{"prompt": "p", "output": "o"}\n\n   \n{"prompt": "q", "output": "r"}\n')
    examples, report = load_examples(_src(f))
    assert len(examples) == 2 and not report.skipped
    assert examples[1].where.endswith(":4")


def test_missing_file_and_all_bad(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_examples(_src(tmp_path / "nope.jsonl"))
    f = write_jsonl(tmp_path / "allbad.jsonl", ["{x", "{y"])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(_src(f), on_error="skip")


def test_prompt_that_leaves_no_room(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    long_prompt = "word " * 200
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p", "output": "o"}, {"prompt": long_prompt, "output": "x"}])
    cfg = DataConfig(train=str(f), max_length=64, max_prompt_length=None)
    with pytest.raises(DataError) as e:
        build_dataset(cfg.train, cfg, tok)
    assert str(e.value).startswith(f"{f}:2: field 'prompt': the prompt is ")
    assert "leaves no room for a response within data.max_length=64" in str(e.value)
    # with truncation, the same record is usable
    cfg = DataConfig(train=str(f), max_length=64, max_prompt_length=32)
    ds, _ = build_dataset(cfg.train, cfg, tok)
    assert len(ds) == 2
    # with skip, it is counted
    cfg = DataConfig(train=str(f), max_length=64, max_prompt_length=None, on_error="skip")
    ds, report = build_dataset(cfg.train, cfg, tok)
    assert len(ds) == 1 and len(report.skipped) == 1 and "no room" in report.skipped[0]


def test_chat_without_template_is_an_error(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    tok.chat_template = None
    f = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    cfg = DataConfig(train=str(f))
    with pytest.raises(DataError, match=rf"{f}:1: field 'messages': the tokenizer has no chat template"):
        build_dataset(cfg.train, cfg, tok)


def test_truncation_is_counted_and_a_cut_answer_cue_warned(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    """Alpaca prompts cut from the end lose `### Response:`: counted and warned; keep_end keeps the cue."""
    from transformers import AutoTokenizer

    from dualkd.data.dataset import make_dataset

    long = "word " * 60
    records = [{"instruction": long, "output": "short"}, {"instruction": "Hi", "output": "x " * 80},
               {"instruction": "Hi", "output": "ok"}]
    f = write_jsonl(tmp_path / "t.jsonl", records)
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    examples, report = load_examples(_src(f))
    make_dataset(examples, report, DataConfig(train=str(f), max_length=160, max_prompt_length=100), tok)
    cut = report.truncated["student"]
    assert (cut.prompts, cut.sequences, cut.cues, cut.cue_example) == (1, 1, 1, "### Response:")
    assert cut.summary(3) == ("1 of 3 prompts cut to data.max_prompt_length; "
                              "1 of 3 sequences cut to data.max_length")
    assert "lost their last line to truncation (e.g. '### Response:')" in report.warnings()[0]
    examples, report = load_examples(_src(f))
    make_dataset(examples, report, DataConfig(train=str(f), max_length=160, max_prompt_length=100,
                                              prompt_truncation="keep_end"), tok)
    assert report.truncated["student"].prompts == 1 and report.warnings() == []


def test_tokenizing_in_chunks_changes_nothing(tmp_path: Path, byte_tokenizer_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    from dualkd.data import dataset

    records = [{"prompt": f"Q{i}: " + "x " * (i % 7), "output": f"a{i}"} for i in range(23)]
    f = write_jsonl(tmp_path / "t.jsonl", records)
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    built = []
    for chunk in (1000, 5):
        monkeypatch.setattr(dataset, "TOKENIZE_CHUNK", chunk)
        examples, report = load_examples(_src(f))
        ds = dataset.make_dataset(examples, report, DataConfig(train=str(f)), tok)
        built.append([(x.ids, x.offsets, x.prompt_len) for x in ds.student])
    assert built[0] == built[1] and len(built[0]) == 23
