"""Typed run config: validation messages, overrides, saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dualkd.config import apply_override, load_config, save_config, validate_config
from dualkd.errors import ConfigError

BASE = {
    "student": {"path": "some/model"},
    "data": {"train": "train.jsonl"},
}


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.objective.name == "sft"
    assert cfg.data.train.path == "train.jsonl"
    assert cfg.data.max_length == 512 and cfg.data.max_prompt_length == 256
    assert cfg.student.trust_remote_code is False
    assert cfg.generation.temperature == 1.0 and cfg.generation.top_k == 0


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), [
        "optimization.lr=1e-3", "optimization.grad_accum=4", "objective.name=kd", "objective.temperature=2",
        "teacher.path=big/model", "data.dev=dev.jsonl", "logging.tensorboard=false",
    ])
    assert cfg.optimization.lr == pytest.approx(1e-3)
    assert cfg.optimization.grad_accum == 4
    assert cfg.objective.name == "kd" and cfg.objective.temperature == 2.0
    assert cfg.teacher is not None and cfg.teacher.path == "big/model"
    assert cfg.data.dev is not None and cfg.data.dev.path == "dev.jsonl"
    assert cfg.logging.tensorboard is False


def test_override_into_string_data_source() -> None:
    raw = {"data": {"train": "a.jsonl"}}
    apply_override(raw, "data.train.path=b.jsonl")
    assert raw["data"]["train"] == {"path": "b.jsonl"}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected `key.sub=value`"):
        apply_override({}, bad)


def test_unknown_key_is_named_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), ["optimization.lrr=1e-3"])
    assert "optimization.lrr: unknown key (did you mean `lr`?)" in str(e.value)


def test_unknown_key_inside_objective_variant(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), ["objective.name=kd", "objective.kd_ratee=0.3"])
    assert "objective.kd_ratee: unknown key (did you mean `kd_rate`?)" in str(e.value)


def test_key_of_another_objective_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"objective.temperature: unknown key"):
        load_config(_write(tmp_path, BASE), ["objective.name=sft", "objective.temperature=2"])  # sft: no τ
    with pytest.raises(ConfigError, match=r"objective.name: is missing; choose from"):
        load_config(_write(tmp_path, BASE), ["objective.temperature=2"])


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), ["optimization.micro_batch_size=abc"])
    msg = str(e.value)
    assert "optimization.micro_batch_size: expected int, got 'abc' (str)" in msg


def test_wrong_type_in_objective_variant(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), ["objective.name=kd", "objective.kd_rate=high"])
    assert "objective.kd_rate: expected float, got 'high' (str)" in str(e.value)


def test_literal_choices_are_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), ["optimization.scheduler=step"])
    assert "expected one of 'cosine', 'linear', 'constant'" in str(e.value)


def test_unknown_objective(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), ["objective.name=magic"])
    assert "objective.name: unknown objective 'magic'" in str(e.value) and "'kd'" in str(e.value)


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match="student: required key is missing"):
        validate_config({"data": {"train": "x.jsonl"}})


def test_impossible_combinations() -> None:
    with pytest.raises(ConfigError, match=r"data: max_prompt_length \(\d+\) must be below max_length"):
        validate_config({**BASE, "data": {"train": "x", "max_length": 128, "max_prompt_length": 128}})
    with pytest.raises(ConfigError, match="teacher is frozen"):
        validate_config({**BASE, "teacher": {"path": "t", "lora": {"r": 4}}})
    with pytest.raises(ConfigError, match="exactly one of"):
        validate_config({**BASE, "data": {"train": {"path": "a", "hf": "b"}}})
    with pytest.raises(ConfigError, match="`path` is required"):
        validate_config({"student": {}, "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="arch.model_type"):
        validate_config({"student": {"init": "random", "tokenizer": "t"}, "data": {"train": "x"}})


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["objective.name=kd", "optimization.betas=[0.9, 0.95]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    text = (tmp_path / "resolved.yaml").read_text()
    assert "kd_rate: 0.5" in text and "warmup_steps: 0" in text  # defaults are written out


def test_shipped_configs_and_recipes_build() -> None:
    """Every config in configs/ and every packaged recipe validates, and what builds without its models (the
    hub's are out of reach here) is built: the objective, and its needs checked against the run (a teacher and
    the capabilities its kind gives, the frozen roles, the source)."""
    from dualkd.methods import build_objective
    from dualkd.train.build import check_needs

    repo = Path(__file__).resolve().parents[1]
    paths = sorted({p.resolve() for p in [*(repo / "configs").glob("*.yaml"),
                                          *(repo / "src" / "dualkd" / "recipes").glob("*.yaml")]})
    assert len(paths) >= 25
    for path in paths:
        cfg = load_config(path)
        objective = build_objective(cfg.objective)
        check_needs(cfg, objective.needs())
