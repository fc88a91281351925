"""Resume refuses changed settings (table of old -> new), accepts them only with --resume-with-changes (each
logged, the new values applied), never rewrites config.yaml, `--resume auto` for requeued jobs, and deleting
old checkpoints is crash-safe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from dualkd.cli import main
from dualkd.config import validate_config
from dualkd.errors import ConfigError, DualKDError
from dualkd.train import checkpoint as ckpt_module
from dualkd.train.checkpoint import list_checkpoints, remove_dir, verify_manifest, write_manifest
from dualkd.train.loop import train
from dualkd.train.resume import KEY_VERSION, changes
from tests.helpers import make_model_dir, read_metrics, tiny_run


def _raw(tmp_path: Path, train_file: Path, tok: Path, teacher: Path, **optimization) -> dict:
    return tiny_run(tmp_path / "run", train_file, tok, teacher=teacher,
                    optimization={"max_steps": 4, "scheduler": "constant", **optimization},
                    checkpoint={"every_steps": 2, "keep_last": 2})


def _with(raw: dict, section: str, **values) -> dict:
    return {**raw, section: {**raw[section], **values}}


def test_changed_settings_are_refused_with_a_table(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                   teacher_dir: Path) -> None:
    raw = _raw(tmp_path, train_file, byte_tokenizer_dir, teacher_dir)
    run = train(validate_config(raw))
    written = (run / "config.yaml").read_text()
    other_teacher = make_model_dir(tmp_path / "other", byte_tokenizer_dir, seed=5)
    cases = [(_with(raw, "optimization", lr=1e-2), r"optimization\.lr +0\.003 -> 0\.01"),
             (_with(raw, "optimization", epochs=3), r"optimization\.epochs +1 -> 3"),
             (_with(raw, "teacher", path=str(other_teacher)), r"teacher\.path +'.*' -> '.*other'"),
             (_with(raw, "objective", temperature=1.0), r"objective\.temperature +2\.0 -> 1\.0"),
             ({**raw, "seed": 99}, r"seed +7 -> 99")]
    for changed, row in cases:
        with pytest.raises(ConfigError, match="the run's settings changed") as e:
            train(validate_config(changed), resume=True)
        assert __import__("re").search(row, str(e.value)), str(e.value)
        assert "--resume-with-changes" in str(e.value)
    assert (run / "config.yaml").read_text() == written  # a refused resume writes nothing


def test_teacher_weights_changed_in_place_are_noticed(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                      teacher_dir: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    raw = _raw(tmp_path, train_file, byte_tokenizer_dir, teacher)
    train(validate_config(raw))
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(teacher / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"teacher\.weights +'[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        train(validate_config(raw), resume=True)


def test_how_not_what_may_change(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                 teacher_dir: Path) -> None:
    """The split of the global batch (8 x 1 -> 4 x 2) and teacher placement do not change the update."""
    raw = _raw(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, micro_batch_size=8, grad_accum=1)
    train(validate_config(raw))
    resumed = _with(_with(raw, "optimization", micro_batch_size=4, grad_accum=2, max_steps=6), "teacher",
                    placement="same")
    with pytest.raises(ConfigError, match=r"optimization\.max_steps +4 -> 6") as e:
        train(validate_config(resumed), resume=True)
    assert "micro_batch_size" not in str(e.value) and "placement" not in str(e.value)


def test_resume_with_changes_applies_and_logs_them(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                   teacher_dir: Path) -> None:
    raw = _raw(tmp_path, train_file, byte_tokenizer_dir, teacher_dir)
    run = train(validate_config(raw))
    written = (run / "config.yaml").read_text()
    changed = _with(raw, "optimization", lr=1e-2, max_steps=6, weight_decay=0.0)
    train(validate_config(changed), resume=True, accept_changes=True)
    steps = read_metrics(run)
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["lr"] for r in steps] == pytest.approx([3e-3] * 4 + [1e-2] * 2)  # the new lr, not the old base
    events = {e["setting"]: (e["old"], e["new"]) for e in read_metrics(run, "event") if e["event"] == "resume_changed"}
    assert events == {"optimization.lr": (3e-3, 1e-2), "optimization.max_steps": (4, 6),
                      "optimization.weight_decay": (0.01, 0.0)}
    assert (run / "config.yaml").read_text() == written
    assert yaml.safe_load((run / "config.resumed-step-00000004.yaml").read_text())["optimization"]["lr"] == 1e-2


def test_resume_auto_starts_or_continues(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                        teacher_dir: Path) -> None:
    raw = _raw(tmp_path, train_file, byte_tokenizer_dir, teacher_dir)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_file), "--resume", "auto"]) == 0  # nothing to resume: starts
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    # an override written right after --resume stays an override (here: a changed setting, so refused)
    assert main(["train", str(cfg_file), "--resume", "optimization.max_steps=6"]) == 2
    assert main(["train", str(cfg_file), "--resume", "auto", "optimization.max_steps=6",
                 "--resume-with-changes"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))
    assert not any(e["event"] == "resume_changed" and e["setting"] != "optimization.max_steps"
                   for e in read_metrics(tmp_path / "run", "event"))


def test_checkpoint_deletion_is_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):
        d = ckpt_dir / f"step-{step:08d}"
        d.mkdir(parents=True)
        for name in ("trainer_state.json", "trainable.safetensors", "scheduler.pt", "optimizer.pt"):
            (d / name).write_text("x")
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [2, 4]

    def killed(path, ignore_errors=False):  # the process dies inside the deletion, after the weights went
        (Path(path) / "trainable.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(ckpt_dir / "step-00000002")
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [4]  # the half-deleted one is not counted
    assert (ckpt_dir / ".deleting-step-00000002").exists()
    # and a step folder missing its weights (deleted by an older version, or by hand) is not complete either
    (ckpt_dir / "step-00000004" / "trainable.safetensors").unlink()
    assert list_checkpoints(ckpt_dir) == []


def test_a_deepspeed_checkpoint_must_be_the_one_this_run_wrote(tmp_path: Path) -> None:
    """DeepSpeed unpickles its checkpoint files (weights_only=False): a resume checks them against the SHA-256
    manifest written with them, and refuses anything changed, added or unlisted."""
    folder = tmp_path / "deepspeed"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (folder / "state" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"optimizer")
    write_manifest(folder)
    verify_manifest(folder)
    (folder / "state" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"0ptimizer")
    with pytest.raises(DualKDError, match="zero_pp_rank_0_optim_states.pt changed since it was written"):
        verify_manifest(folder)
    write_manifest(folder)
    (folder / "state" / "extra.pt").write_bytes(b"payload")
    with pytest.raises(DualKDError, match=r"extra\.pt is not in the manifest"):
        verify_manifest(folder)
    (folder / "state" / "extra.pt").unlink()
    (folder / "dualkd-manifest.json").unlink()
    with pytest.raises(DualKDError, match="not written by dualkd"):
        verify_manifest(folder)


def test_an_older_key_version_is_compared_on_shared_names_only() -> None:
    """A checkpoint written before the key's layout changed resumes when the settings both keys name agree;
    the version number itself is no setting."""
    old = {"key_version": KEY_VERSION - 1, "optimization.lr": 1e-3, "source.temperature": 1.0}
    now = {"key_version": KEY_VERSION, "optimization.lr": 1e-3, "source.kind": "off_policy"}
    assert changes(old, now) == []
    assert changes(old, {**now, "optimization.lr": 2e-3}) == [("optimization.lr", 1e-3, 2e-3)]
