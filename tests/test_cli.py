"""The `dualkd` command: help on every command, config printing, error reporting, the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dualkd.cli import build_parser, main
from dualkd.demo import _MARKER, _prepare
from tests.helpers import REPO


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in _commands()])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: dualkd" in capsys.readouterr().out


def test_config_command_prints_resolved_yaml(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", str(REPO / "configs" / "tiny-kd.yaml"), "objective.temperature=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {k: printed["objective"][k] for k in ("name", "kd_rate", "temperature", "divergence")} == {
        "name": "kd", "kd_rate": 0.5, "temperature": 3.0, "divergence": "fkl"}
    assert printed["optimization"]["max_grad_norm"] == 1.0


def test_config_errors_exit_2_with_one_message(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", str(REPO / "configs" / "tiny-kd.yaml"), "optimization.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualkd: error: invalid config") and "optimization.lr: expected float" in err
    assert "Traceback" not in err


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The tiny-size variant of the main job: every stage runs (teacher, five students, evaluation, report)."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher", "student-sft", "student-kd", "student-dskd", "student-own-vocab-sft",
                            "student-dskdv2"}
    for name, r in results.items():
        assert (out / name / "final" / "model.safetensors").exists()
        assert 0.0 <= r["rougeL"] <= 100.0 and 0.0 <= r["exact_match"] <= 100.0
        assert (out / name / "eval" / "generations" / "test.seed10.jsonl").exists()
    assert (out / "student-dskdv2" / "final" / "projectors.safetensors").exists()
    report = (out / "report" / "report.md").read_text()
    assert "student-dskdv2" in report and (out / "report" / "scores.png").exists()
    assert "## Exact match by task family" in report and "describe *" in report
    assert set(results["student-kd"]["exact_match_by_family"]) <= {"reverse", "sort", "arithmetic", "count",
                                                                   "describe", "name_one", "two_things"}
    captured = capsys.readouterr()
    assert "dualkd demo" in captured.out and "student-dskdv2" in captured.out
    assert "report:" in captured.err
    # a second demo run replaces the first (what it does with the folder before it trains: the whole run
    # above need not be repeated to see it); a foreign directory is refused
    _prepare(out)
    assert [p.name for p in out.iterdir()] == [_MARKER]
    (tmp_path / "mine").mkdir()
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "mine")]) == 2


def test_tokenizer_train_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    pairs = tmp_path / "train.jsonl"
    records = [{"de": f"Ein Mann läuft über die Straße {i}.", "en": f"A man walks {i}."} for i in range(200)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(pairs), "--fields", "de,en", "--vocab-size", "600", "--out", str(out)]) == 0
    assert "tokens, trained on 400 texts" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    text = "Ein Mann läuft über die Straße. A man walks."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token is not None and tok.pad_token is not None and len(tok) <= 600
    assert main(["tokenizer", "train", str(pairs), "--fields", "fr", "--out", str(tmp_path / "x")]) == 2
    assert "field 'fr' is missing" in capsys.readouterr().err
    # without --fields: prompts and responses of any supported format
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Q{i}: name a color\n", "output": "red"}) + "\n" for i in range(50)))
    assert main(["tokenizer", "train", str(sft), "--style", "byte_level", "--vocab-size", "300",
                 "--out", str(tmp_path / "bl")]) == 0
    byte_level = AutoTokenizer.from_pretrained(tmp_path / "bl")
    assert byte_level.decode(byte_level("Q7: red", add_special_tokens=False)["input_ids"]) == "Q7: red"
