"""Several teachers in the training loop (teachers/several.py, methods/multi_teacher.py): the same updates
whatever the micro-batching, a resumed run equal to the uninterrupted one, members of different kinds (a
cache beside a live model), and a kind that cannot serve the objective refused with the member named.
The formulas themselves: tests/methods/test_multi_teacher.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from dualkd.cli import main
from dualkd.config import validate_config
from dualkd.errors import DualKDError
from dualkd.train.loop import train
from tests.helpers import NO_DROPOUT, make_model_dir, read_metrics, synthetic_records, tiny_run, write_jsonl


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, dev) records naming their teacher, a or b."""
    folder = tmp_path_factory.mktemp("routed")
    rows = [{**r, "teacher": "ab"[i % 3 == 0]} for i, r in enumerate(synthetic_records(40, seed=21))]
    return write_jsonl(folder / "train.jsonl", rows[:32]), write_jsonl(folder / "dev.jsonl", rows[32:])


@pytest.fixture(scope="module")
def cross_teacher_dir(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cross"), meta_tokenizer_dir, model_type="llama", hidden_size=48,
                          intermediate_size=96, seed=2)


def several(tmp: Path, routed: tuple[Path, Path], tok: Path, members: dict[str, dict[str, Any]],
            objective: dict[str, Any], **optimization: Any) -> dict[str, Any]:
    cfg = tiny_run(tmp, routed[0], tok, objective={"name": "multi_teacher", **objective},
                   data={"dev": str(routed[1])}, eval={"every_steps": 3},
                   optimization={"max_steps": 6, "scheduler": "constant", **optimization})
    cfg["teacher"] = {"kind": "several", "members": members}
    cfg["student"]["arch"].update(NO_DROPOUT)  # the same network whatever the micro-batching
    return cfg


def test_micro_batching_and_resume_change_nothing(tmp_path: Path, routed: tuple[Path, Path],
                                                  byte_tokenizer_dir: Path, teacher_dir: Path,
                                                  cross_teacher_dir: Path) -> None:
    members = {"a": {"path": str(teacher_dir)}, "b": {"path": str(cross_teacher_dir)}}
    objective = {"combine": "route", "each": {"name": "dskdv2", "temperature": 2.0}}
    whole = several(tmp_path / "whole", routed, byte_tokenizer_dir, members, objective, micro_batch_size=8)
    split = several(tmp_path / "split", routed, byte_tokenizer_dir, members, objective, micro_batch_size=2,
                    grad_accum=4)
    train(validate_config(whole))
    train(validate_config(split))
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert len(a) == 6 and {"a/kd_student", "b/kd_student", "kd_student"} <= a[0].keys()
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["b/kd_student"] == pytest.approx(x["b/kd_student"], rel=1e-5)
    dev_a, dev_b = read_metrics(tmp_path / "whole", "eval"), read_metrics(tmp_path / "split", "eval")
    assert [d["loss"] for d in dev_b] == pytest.approx([d["loss"] for d in dev_a], rel=1e-5)

    # resumed: 3 steps, then on to 6 from the checkpoint (a constant lr: max_steps does not move the schedule)
    resumed = several(tmp_path / "resumed", routed, byte_tokenizer_dir, members, objective, micro_batch_size=8,
                      max_steps=3)
    resumed["checkpoint"] = {"every_steps": 3}
    train(validate_config(resumed))
    resumed["optimization"]["max_steps"] = 6
    train(validate_config(resumed), resume=True, accept_changes=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == [r["loss"] for r in a]
    ref = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(ref[k].equal(got[k]) for k in ref)


def test_a_cache_beside_a_live_teacher(tmp_path: Path, routed: tuple[Path, Path], byte_tokenizer_dir: Path,
                                       teacher_dir: Path, cross_teacher_dir: Path) -> None:
    """Member b read from its top-8 cache, a live: `kd` trains from both (b sparse, a dense). DSKDv2 reads
    hidden states, which b's cache does not hold: refused, naming b and the cure."""
    other = make_model_dir(tmp_path / "b", byte_tokenizer_dir, n_embd=40, seed=11)
    alone = tiny_run(tmp_path / "b-run", routed[0], byte_tokenizer_dir, teacher=other,
                     data={"dev": str(routed[1])})
    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump(alone))
    assert main(["cache-teacher", str(config), "--out", str(tmp_path / "cache"), "--top-k", "8"]) == 0
    members = {"a": {"path": str(teacher_dir)}, "b": {"kind": "cache", "cache": str(tmp_path / "cache")}}
    cfg = several(tmp_path / "run", routed, byte_tokenizer_dir, members, {"each": {"name": "kd"}})
    train(validate_config(cfg))
    assert len(read_metrics(tmp_path / "run")) == 6
    cross = several(tmp_path / "dskd", routed, byte_tokenizer_dir,
                    {"a": {"path": str(cross_teacher_dir)}, "b": members["b"]}, {"each": {"name": "dskdv2"}})
    refusal = r"teacher\.members\.b: objective `dskdv2` reads the teacher.s LM head.*--hidden"
    with pytest.raises(DualKDError, match=refusal):
        train(validate_config(cross))


def test_cache_teacher_refuses_several_teachers(tmp_path: Path, routed: tuple[Path, Path], byte_tokenizer_dir: Path,
                                                teacher_dir: Path, capsys: pytest.CaptureFixture) -> None:
    members = {"a": {"path": str(teacher_dir)}, "b": {"path": str(teacher_dir)}}
    cfg = several(tmp_path / "run", routed, byte_tokenizer_dir, members, {"each": {"name": "kd"}})
    config = tmp_path / "several.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["cache-teacher", str(config), "--out", str(tmp_path / "cache")]) == 2
    assert "writes one cache per member" in capsys.readouterr().err


def test_the_route_script_names_the_teacher_that_predicts_each_response_better(
        tmp_path: Path, routed: tuple[Path, Path], byte_tokenizer_dir: Path, teacher_dir: Path,
        cross_teacher_dir: Path) -> None:
    """experiments/prune_distill_dolly/route.py, from two caches with hidden states (two tokenizers), against
    each live teacher's log-likelihood of every response (dualkd.eval.likelihood, whole examples)."""
    from dualkd.data.config import DataSource
    from dualkd.data.readers import load_examples
    from dualkd.eval.likelihood import response_likelihood
    from dualkd.models import load_model, load_tokenizer
    from dualkd.models.config import ModelConfig
    from experiments.prune_distill_dolly import route

    caches = {}
    for name, teacher in (("a", teacher_dir), ("b", cross_teacher_dir)):
        cfg = tiny_run(tmp_path / f"run-{name}", routed[0], byte_tokenizer_dir, teacher=teacher,
                       data={"max_length": 256, "max_prompt_length": 200},
                       objective={"name": "dskdv2", "temperature": 2.0})
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        caches[name] = tmp_path / f"cache-{name}"
        assert main(["cache-teacher", str(config), "--out", str(caches[name]), "--top-k", "4", "--hidden"]) == 0
    out = tmp_path / "train-routed.jsonl"
    route.main([str(caches["a"]), str(caches["b"]), "--config", str(tmp_path / "a.yaml"),
                "--split", "train", str(routed[0]), str(out)])
    examples = load_examples(DataSource(path=str(routed[0])))[0]
    nats = {}
    for name, teacher in (("a", teacher_dir), ("b", cross_teacher_dir)):
        spec = ModelConfig(path=str(teacher))
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, tokenizer, role="teacher")
        nats[name] = [(lambda r: r["ce_per_token"] * r["response_tokens"])(
            response_likelihood(model, tokenizer, [e], progress=False)) for e in examples]
    expected = ["a" if x <= y else "b" for x, y in zip(nats["a"], nats["b"])]
    got = [json.loads(line)["teacher"] for line in out.read_text().splitlines()]
    assert got == expected and {"a", "b"} >= set(got)
    summary = json.loads(Path(f"{out}.json").read_text())
    assert summary["to_a"] + summary["to_b"] == len(examples) == 32
    assert summary["bits_per_byte_routed"] <= min(summary["bits_per_byte_a"], summary["bits_per_byte_b"])
