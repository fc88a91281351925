"""Tiny end-to-end runs of the one loop: SFT and KD, accumulation invariance, checkpoints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dualkd.cli import main
from dualkd.config import validate_config
from dualkd.errors import ConfigError, DataError
from dualkd.train.announce import format_record
from dualkd.train.loop import train
from tests.helpers import read_metrics, synthetic_records, tiny_run, write_jsonl

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _falling(losses: list[float]) -> bool:
    k = max(len(losses) // 4, 1)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_sft_run_writes_everything_and_learns(tmp_path: Path, train_file: Path, dev_file: Path,
                                              byte_tokenizer_dir: Path) -> None:
    cfg = validate_config(tiny_run(
        tmp_path / "run", train_file, byte_tokenizer_dir,
        data={"dev": str(dev_file)}, optimization={"max_steps": 24, "micro_batch_size": 8},
        eval={"every_steps": 8}, checkpoint={"every_steps": 8, "keep_last": 2},
        logging={"every_steps": 1000, "tensorboard": True, "progress_bar": "off"}))
    run = train(cfg)
    steps = read_metrics(run)
    assert [r["step"] for r in steps] == list(range(1, 25))
    losses = [r["loss"] for r in steps]
    assert all(map(lambda x: x == x and abs(x) < 1e4, losses)) and _falling(losses)
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_mib", "time/teacher", "time/student", "ce", "acc"):
        assert key in steps[-1], key
    dev = read_metrics(run, "dev")
    assert [r["step"] for r in dev] == [8, 16, 24] and dev[-1]["loss"] < dev[0]["loss"]
    assert (run / "config.yaml").exists() and (run / "tokenizer").exists() is False
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000016", "step-00000024"]  # keep_last 2 (the best is the last)
    assert list((run / "tensorboard").iterdir())
    model = AutoModelForCausalLM.from_pretrained(run / "final")  # plain transformers
    assert model.config.model_type == "gpt2"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["best_step"] == 24


def test_kd_run_same_tokenizer(tmp_path: Path, train_file: Path, teacher_dir: Path, byte_tokenizer_dir: Path) -> None:
    cfg = validate_config(tiny_run(tmp_path / "kd", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                                   optimization={"max_steps": 16}))
    run = train(cfg)
    steps = read_metrics(run)
    assert all("kd" in r and r["kd"] >= 0 for r in steps)
    assert _falling([r["loss"] for r in steps])
    assert steps[-1]["time/teacher"] > 0
    # the logged loss is the configured mix of its parts
    r = steps[-1]
    assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5)


def test_trained_tokenizer_recipe(tmp_path: Path) -> None:
    cfg = validate_config({
        "output_dir": str(tmp_path / "scratch"),
        "student": {"init": "random", "train_tokenizer": {"vocab_size": 300},
                    "arch": {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32,
                             "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}},
        "data": {"train": {"synthetic": "copy", "num_examples": 64}, "max_length": 96, "max_prompt_length": 80},
        "optimization": {"max_steps": 3, "micro_batch_size": 8},
        "logging": {"tensorboard": False, "progress_bar": "off"},
    })
    run = train(cfg)
    assert (run / "tokenizer" / "tokenizer.json").exists()
    assert (run / "final" / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(run / "final").config.vocab_size == 300


def _final_params(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("split", [{"micro_batch_size": 2, "grad_accum": 4},
                                   {"micro_batch_size": 2, "grad_accum": 4, "micro_batch_tokens": 160}],
                         ids=["2x4", "token_budget"])
def test_accumulation_invariance(split: dict, tmp_path: Path, train_file: Path, teacher_dir: Path,
                                 byte_tokenizer_dir: Path) -> None:
    """8 x 1 and 2 x 4 (or the same 8 examples cut into passes by a token budget) make the same updates: the
    loss is normalized by the global batch's token count."""
    runs = []
    for name, opt in (("b8x1", {"micro_batch_size": 8, "grad_accum": 1}), ("split", split)):
        cfg = tiny_run(tmp_path / name, train_file, byte_tokenizer_dir, teacher=teacher_dir,
                       optimization={"max_steps": 5, **opt})
        cfg["student"]["arch"].update(NO_DROPOUT)
        runs.append(train(validate_config(cfg)))
    a, b = (read_metrics(r) for r in runs)
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["tokens"] == rb["tokens"]
    pa, pb = (_final_params(r) for r in runs)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], atol=1e-5, rtol=1e-4)  # Adam amplifies fp noise


def test_existing_run_needs_resume(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    raw = tiny_run(tmp_path / "r", train_file, byte_tokenizer_dir,
                   optimization={"max_steps": 2}, checkpoint={"every_steps": 1})
    train(validate_config(raw))
    with pytest.raises(ConfigError, match="already holds checkpoints of a run; continue it with --resume"):
        train(validate_config(raw))
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint"):
        train(validate_config({**raw, "output_dir": str(tmp_path / "empty")}), resume=True)
    changed = {**raw, "seed": 99}
    with pytest.raises(ConfigError, match=r"the run.s settings changed \(checkpoint -> now\):\n  seed +7 -> 99"):
        train(validate_config(changed), resume=True)


def test_malformed_line_stops_the_run_naming_file_and_line(tmp_path: Path, byte_tokenizer_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    records: list = synthetic_records(20, seed=3)
    records[13] = '{"instruction": "Add.", "input": "1 + 2", "output": 3'
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    cfg_file = tmp_path / "run.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(tiny_run(tmp_path / "run", bad, byte_tokenizer_dir)))
    assert main(["train", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert f"dualkd: error: {bad}:14: invalid JSON" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training
    with pytest.raises(DataError, match=rf"{bad}:14"):
        train(validate_config(tiny_run(tmp_path / "run2", bad, byte_tokenizer_dir)))


def test_skipped_lines_are_counted_printed_and_logged(tmp_path: Path, byte_tokenizer_dir: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    records: list = synthetic_records(20, seed=3)
    records[2] = "not json"
    records[7] = {"instruction": "x", "output": ""}
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    cfg = tiny_run(tmp_path / "run", bad, byte_tokenizer_dir, optimization={"max_steps": 2})
    cfg["data"]["on_error"] = "skip"
    run = train(validate_config(cfg))
    events = [e for e in read_metrics(run, "event") if e["event"] == "data_skipped"]
    assert len(events) == 1 and events[0]["skipped"] == 2 and events[0]["first"].startswith(f"{bad}:3:")
    assert "SKIPPED 2 bad records" in capsys.readouterr().err


def test_objective_without_teacher_is_a_config_error(tmp_path: Path, train_file: Path,
                                                     byte_tokenizer_dir: Path) -> None:
    cfg = tiny_run(tmp_path / "r", train_file, byte_tokenizer_dir, objective={"name": "kd"})
    with pytest.raises(ConfigError, match="objective `kd` needs a teacher"):
        train(validate_config(cfg))


def test_kd_with_different_tokenizers_is_refused(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                 meta_tokenizer_dir: Path) -> None:
    from dualkd.errors import ModelError
    from tests.helpers import make_model_dir

    other = make_model_dir(tmp_path / "other", meta_tokenizer_dir)
    cfg = tiny_run(tmp_path / "r", train_file, byte_tokenizer_dir, teacher=other)
    with pytest.raises(ModelError, match="needs the student and teacher to share one tokenizer"):
        train(validate_config(cfg))


def test_best_model_selected_by_sampled_dev_rouge(tmp_path: Path, train_file: Path, dev_file: Path,
                                                  byte_tokenizer_dir: Path) -> None:
    """eval.select_by: rougeL samples the dev prompts (fixed seeds), logs ROUGE-L and keeps the best by it."""
    cfg = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir,
                   data={"dev": str(dev_file)}, eval={"every_steps": 3, "select_by": "rougeL", "rouge_examples": 6,
                                                     "rouge_repeats": 2},
                   generation={"max_new_tokens": 6}, checkpoint={"every_steps": 1000, "keep_best": True})
    run = train(validate_config(cfg))
    dev = read_metrics(run, "dev")
    assert [r["step"] for r in dev] == [3, 6, 9, 12] and all(0.0 <= r["rougeL"] <= 100.0 for r in dev)
    summary = json.loads((run / "summary.json").read_text())
    best = max(dev, key=lambda r: (r["rougeL"], -r["step"]))  # the first step that reached the maximum
    assert summary["best_by"] == "rougeL" and summary["best_value"] == pytest.approx(best["rougeL"])
    assert summary["best_step"] == best["step"]
    assert summary["best_dev_loss"] == pytest.approx(best["loss"])


def test_console_lines_show_the_objectives_terms_one_record_per_line(
        tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = {"kind": "train", "step": 3, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_time": 1.0,
            "peak_mem_mib": 10.0, "grad_norm": 1.0, "tokens": 5.0, "time/data": 0.1, "time/teacher": 0.0,
            "time/student": 0.8, "time/optimizer": 0.1}
    sft = format_record({**base, "ce": 1.0, "acc": 0.5}, 10)
    assert "teacher" not in sft and "acc" not in sft and "student 80%" in sft
    dskdv2 = format_record({**base, "time/teacher": 0.3, "ce": 1.0, "kd_student": 0.2, "ce_t2s": 0.3,
                             "kd_teacher": 0.4, "t2s_agreement": 0.9, "t2s_acc": 0.8}, 10)
    assert "ce 1.0000  ce_t2s 0.3000  kd_student 0.2000  kd_teacher 0.4000  t2s_agreement 0.9000" in dskdv2
    assert "teacher 30%" in dskdv2
    # a log file (not a terminal): every record on its own line, however long
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir,
                                           optimization={"max_steps": 2}, logging={"every_steps": 1})))
    assert main(["train", str(cfg)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("peak" in line and "MiB" in line for line in lines)


def test_exported_and_checkpoint_files_follow_the_umask(tmp_path: Path, train_file: Path,
                                                        byte_tokenizer_dir: Path) -> None:
    """safetensors writes 0600; what a run exports is readable as any file the user writes (0644 under 022)."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        run = train(validate_config(tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir,
                                             optimization={"max_steps": 1}, checkpoint={"every_steps": 1})))
    finally:
        os.umask(mask)
    files = [run / "final" / "model.safetensors", *(run / "checkpoints").glob("step-*/trainable.safetensors")]
    assert len(files) == 2
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((run / "final").stat().st_mode) == 0o755
