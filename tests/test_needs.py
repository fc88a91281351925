"""What an objective declares it needs (methods/needs.py) is checked before anything loads: the models named
here do not exist, so any refusal that comes after loading would be about them instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualkd.config import validate_config
from dualkd.errors import ConfigError
from dualkd.methods import Needs, build_objective
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from tests.helpers import tiny_run

NOWHERE = "/nonexistent/teacher"


def _build(raw: dict) -> None:
    cfg = validate_config(raw)
    build_parts(cfg, Path(cfg.output_dir), LocalEngine())


def test_dpo_with_student_samples_is_refused_by_name(tmp_path: Path, train_file: Path,
                                                     byte_tokenizer_dir: Path) -> None:
    raw = tiny_run(tmp_path, train_file, byte_tokenizer_dir, objective={"name": "dpo"},
                   source={"kind": "on_policy"})
    raw["teacher"] = {"path": NOWHERE}
    with pytest.raises(ConfigError, match="`dpo` trains on preference pairs, whose responses are data"):
        _build(raw)
    raw["objective"] = {"name": "sft"}
    with pytest.raises(ConfigError, match="`sft` has none; use a distillation objective"):
        _build(raw)


def test_a_capability_the_teachers_kind_lacks_is_refused_before_loading(tmp_path: Path, train_file: Path,
                                                                       byte_tokenizer_dir: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "train").mkdir(parents=True)
    (cache / "train" / "manifest.json").write_text(json.dumps({"hidden": False}))
    raw = tiny_run(tmp_path, train_file, byte_tokenizer_dir, objective={"name": "dskd"})
    raw["teacher"] = {"path": NOWHERE, "cache": str(cache)}
    with pytest.raises(ConfigError, match=r"`dskd` reads the teacher's LM head and hidden states at the response "
                                          r"positions, which an offline teacher cache cannot give \(it gives: top-k "
                                          r"log-probabilities\); use a live teacher .*--hidden"):
        _build(raw)
    raw["teacher"] = {"path": NOWHERE, "server": {"url": "http://127.0.0.1:9"}}
    with pytest.raises(ConfigError, match="which a teacher behind an inference server cannot give"):
        _build(raw)


def test_frozen_roles_are_checked_before_loading(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    raw = tiny_run(tmp_path, train_file, byte_tokenizer_dir, objective={"name": "aligndistil"})
    raw["teacher"] = {"path": NOWHERE}
    with pytest.raises(ConfigError, match="needs `teachers.reverse.path`: the reverse-DPO model"):
        _build(raw)
    raw["teachers"] = {"reverse": {"path": NOWHERE}, "extra": {"path": NOWHERE}}
    with pytest.raises(ConfigError, match="teachers.extra: objective `aligndistil` reads no such model"):
        _build(raw)


def test_kd_reads_top_k_from_a_teacher_that_keeps_only_that() -> None:
    """`kd`'s alternatives: a cache or a server (top-k) serves it, as does a model (hidden states and head)."""
    from dualkd.methods.kd import KDConfig

    needs = build_objective(KDConfig()).needs()
    assert needs.missing(frozenset({"topk"})) is None
    assert needs.missing(frozenset({"response_hidden", "head", "hidden", "logits"})) is None
    ranking = build_objective(KDConfig(ranking_top_k=4)).needs()
    assert ranking.missing(frozenset({"topk"})) == {"logits"}
    assert Needs().missing(frozenset()) is None and not Needs().distills
