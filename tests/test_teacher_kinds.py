"""The teacher seam: a new kind of teacher is one file (its config section and its `Teacher`) plus one registry
line (`KINDS`), and objectives reach teachers only through named capabilities."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
import yaml

from dualkd.config import load_config, save_config, validate_config
from dualkd.data.collate import ModelBatch
from dualkd.errors import ConfigError, DualKDError
from dualkd.losses.sparse import TopKTargets, log_tail_mass
from dualkd.teachers import KINDS, Teacher, TeacherSite, TeacherSpec
from dualkd.train.loop import train
from tests.helpers import read_metrics, tiny_run

SRC = Path(__file__).resolve().parents[1] / "src" / "dualkd"


# ---- the one file a new kind needs (here: an oracle that puts mass p on the gold token) ----------------------

class OracleConfig(TeacherSpec):
    """A teacher that knows the answer: probability `p` on the reference's next token."""

    kind: Literal["oracle"] = "oracle"
    p: float = 0.9

    def _loads_a_model(self) -> bool:
        return False

    def open(self, tokenizer: Any, site: TeacherSite) -> OracleTeacher:
        return OracleTeacher(tokenizer, self.p)


class OracleTeacher(Teacher):
    provides: ClassVar[frozenset[str]] = frozenset({"topk"})
    what: ClassVar[str] = "an oracle"

    def __init__(self, tokenizer: Any, p: float):
        super().__init__(tokenizer)
        self.p, self.asked = p, 0

    @property
    def k(self) -> int:
        return 1

    @property
    def vocab_rows(self) -> int:
        return len(self.tokenizer)

    def describe(self, count_parameters: Any) -> str:
        return f"an oracle teacher (p {self.p})"

    def topk(self, tokens: ModelBatch, indices: list[int], k: int, vocab_size: int,
             chunk_size: int | None = None) -> TopKTargets:
        self.asked += 1
        gold = tokens.labels[tokens.loss_mask][:, None]  # [N, 1]
        logprobs = torch.full(gold.shape, float(torch.log(torch.tensor(self.p))))
        return TopKTargets(ids=gold, logprobs=logprobs, tail=log_tail_mass(logprobs))


# ---- the tests ------------------------------------------------------------------------------------------------

@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "oracle", OracleConfig)  # the one registry line


def _oracle_run(tmp_path: Path, train_file: Path, tokenizer: Path) -> dict[str, Any]:
    raw = tiny_run(tmp_path / "run", train_file, tokenizer, objective={"name": "kd", "kd_rate": 1.0},
                   optimization={"max_steps": 6})
    return {**raw, "teacher": {"kind": "oracle", "tokenizer": str(tokenizer), "p": 0.9}}


def test_a_registered_kind_trains_a_student(oracle: None, tmp_path: Path, train_file: Path,
                                            byte_tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = validate_config(_oracle_run(tmp_path, train_file, byte_tokenizer_dir))
    assert type(cfg.teacher) is OracleConfig and cfg.teacher.p == 0.9
    run_dir = train(cfg)
    kd = [r["kd"] for r in read_metrics(run_dir)]
    assert len(kd) == 6 and all(torch.isfinite(torch.tensor(kd)))
    assert kd[-1] < kd[0]  # the student learns the oracle's answers
    assert "an oracle teacher (p 0.9)" in capsys.readouterr().err  # the start-up line is the kind's own
    # the resolved config names the kind and reads back as the same section
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["teacher"]["kind"] == "oracle" and saved["teacher"]["p"] == 0.9
    assert load_config(run_dir / "config.yaml").teacher == cfg.teacher


def test_a_kind_is_chosen_by_name_and_its_own_fields_are_checked(oracle: None, tmp_path: Path, train_file: Path,
                                                                 byte_tokenizer_dir: Path) -> None:
    raw = _oracle_run(tmp_path, train_file, byte_tokenizer_dir)
    raw["teacher"]["pp"] = 0.5
    with pytest.raises(ConfigError, match=r"teacher\.pp: unknown key \(did you mean `p`\?\)"):
        validate_config(raw)
    raw["teacher"] = {"kind": "oracel", "tokenizer": str(byte_tokenizer_dir)}
    with pytest.raises(ConfigError, match=r"unknown kind 'oracel'; choose from \['cache', 'hidden_server', 'live', "
                                          r"'oracle', 'server', 'several'\]"):
        validate_config(raw)


def test_a_kind_that_lacks_a_capability_is_refused_by_name(oracle: None, tmp_path: Path, train_file: Path,
                                                           byte_tokenizer_dir: Path) -> None:
    raw = _oracle_run(tmp_path, train_file, byte_tokenizer_dir)
    raw["objective"] = {"name": "dskd"}
    with pytest.raises(DualKDError, match=r"objective `dskd` reads the teacher's LM head, which an oracle cannot "
                                          r"give \(it gives: top-k log-probabilities\)"):
        train(validate_config(raw))


def test_sections_without_a_kind_keep_their_meaning(tmp_path: Path) -> None:
    base = {"student": {"path": "s"}, "data": {"train": "t.jsonl"}}
    kinds = {"live": {"path": "t"}, "cache": {"path": "t", "cache": "c/"},
             "server": {"path": "t", "server": {"url": "http://127.0.0.1:8080"}}}
    for kind, section in kinds.items():
        cfg = validate_config({**base, "teacher": section, "teachers": {"reverse": section}})
        assert cfg.teacher is not None and cfg.teacher.kind == kind == cfg.teachers["reverse"].kind
        save_config(cfg, tmp_path / "c.yaml")  # written back with its kind and its own fields
        assert load_config(tmp_path / "c.yaml").teacher == cfg.teacher
    with pytest.raises(ConfigError, match="teacher.cache: unknown key"):
        validate_config({**base, "teacher": {"kind": "live", "path": "t", "cache": "c/"}})


def test_objectives_reach_teachers_through_capabilities_only() -> None:
    """No objective reads the teacher model object (`.model`) or probes a teacher with getattr/isinstance."""
    offenders = []
    for path in sorted((SRC / "methods").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"teacher\w*\.model\b|isinstance\([^)]*Teacher\b|getattr\(\w*teacher", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []
