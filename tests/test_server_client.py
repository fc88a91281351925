"""The served teacher's parts that need no server: the string -> id map, the config, what it refuses.
(The real server is tests/served/test_served_teacher.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dualkd.config import RunConfig
from dualkd.errors import ConfigError
from dualkd.teachers.served import ServedTeacher, unpadded_sequences
from dualkd.teachers.server_client import ServerClient, StringIds, server_strings
from tests.helpers import tiny_run


def _tokenizer(path: Path):  # noqa: ANN202
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("which", ["byte_tokenizer_dir", "meta_tokenizer_dir"])
def test_each_token_prints_as_it_does_inside_a_sequence(which: str, request: pytest.FixtureRequest) -> None:
    tokenizer = _tokenizer(request.getfixturevalue(which))
    strings = [text for text, _ in server_strings(tokenizer)]
    ids = tokenizer("Hello world, and more words: 1 + 2 = 3.")["input_ids"]  # ASCII: no token is a lone byte
    ids = [i for i in ids if i not in tokenizer.all_special_ids]
    # the pieces, joined, are the text (leading spaces kept: SentencePiece's ▁ prints as a space mid-sequence)
    assert "".join(strings[i] for i in ids).strip() == tokenizer.decode(ids).strip()
    assert all(strings[i] == "" for i in tokenizer.all_special_ids)


def test_shared_strings_name_no_token(byte_tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(byte_tokenizer_dir)
    printed = [text for text, _ in server_strings(tokenizer)]
    ids = StringIds(tokenizer)
    for i, text in enumerate(printed):
        assert ids.get(text) == (i if printed.count(text) == 1 and text else None), text
    assert ids.get("") is None  # special tokens and lone UTF-8 bytes all print as ""
    assert printed[:256].count("") > 1  # a byte-level vocabulary has lone continuation bytes


def test_sequences_drop_the_padding(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    import torch

    from dualkd.data.collate import ModelBatch

    batch = ModelBatch(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1],
                       [1, 1, 0]]), labels=torch.zeros(2, 3, dtype=torch.long),
                       loss_mask=torch.zeros(2, 3, dtype=torch.bool), offsets=torch.zeros(2, 4, 2, dtype=torch.long),
                       prompt_lengths=torch.tensor([1, 1]), texts=["", ""], prompt_chars=[0, 0])
    assert unpadded_sequences(batch) == [(5, 6, 7), (8, 9)]


def test_the_config_refuses_a_cache_and_a_server_together(tmp_path: Path, train_file: Path,
                                                          byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    cfg = tiny_run(tmp_path, train_file, byte_tokenizer_dir, teacher=teacher_dir)
    cfg["teacher"] = {"path": str(teacher_dir), "cache": str(tmp_path), "server": {"url": "http://127.0.0.1:1"}}
    with pytest.raises(ValidationError, match="not both"):
        RunConfig.model_validate(cfg)
    cfg["teacher"] = {"server": {"url": "http://127.0.0.1:1"}}
    with pytest.raises(ValidationError, match="a served teacher needs its tokenizer"):
        RunConfig.model_validate(cfg)


@pytest.mark.parametrize("objective", ["dskdv2", "dskd", "uld"])
def test_objectives_that_read_more_than_top_k_are_refused(objective: str, byte_tokenizer_dir: Path,
                                                          teacher_dir: Path) -> None:
    from dualkd.methods import build_objective
    from dualkd.methods.base import SetupContext
    from dualkd.models import ModelConfig, load_model

    tokenizer = _tokenizer(byte_tokenizer_dir)
    client = ServerClient("http://127.0.0.1:1", tokenizer, timeout_s=1, retries=0, backoff_s=0, margin=4,
                          cache_dir=None)
    served = ServedTeacher(client, tokenizer, top_k=8)
    student = load_model(ModelConfig(path=str(teacher_dir)), tokenizer, role="student", seed=0)
    built = build_objective(RunConfig.model_validate({"output_dir": "x", "student": {"path": str(teacher_dir)},
                                                      "data": {"train": "x"}, "objective": {"name": objective}}
                                                     ).objective)
    with pytest.raises(ConfigError, match="a teacher behind an inference server cannot give"):
        built.setup(SetupContext(student=student, teacher=served, student_tokenizer=tokenizer,
                                 teacher_tokenizer=tokenizer, same_tokenizer=True, student_pretrained=True))
    served.close()
