"""Nothing destroys what it did not write: `prune --out`, `cache-teacher --out` and model exports refuse an
existing folder of something else (unless --overwrite), never write over their own source, and bad counts on
the command line end in one message, not a traceback or a k = 0 cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dualkd.cli import main
from dualkd.outputs import MARK, written_by
from tests.helpers import make_model_dir, tiny_run


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("src") / "model", byte_tokenizer_dir, "llama", num_hidden_layers=3)


def test_prune_never_replaces_a_folder_it_did_not_write(source: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "tiny-kd"  # a training run's folder: checkpoints, metrics
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["prune", str(source), "--keep", "1", "--out", str(run)]) == 2
    assert "holds something dualkd did not write" in capsys.readouterr().err
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints" / "step-00000010").is_dir()

    # the source itself, or a folder holding it, is refused even with --overwrite
    for out in (source, source.parent):
        assert main(["prune", str(source), "--keep", "1", "--out", str(out), "--overwrite"]) == 2
        assert "holds the source" in capsys.readouterr().err
    assert (source / "config.json").exists()

    # a new folder, then the same folder again (an earlier pruned model is replaced), then --overwrite
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--keep", "2", "--out", str(out)]) == 0
    assert written_by(out) == "model" and (out / MARK).exists()
    assert main(["prune", str(source), "--keep", "1", "--out", str(out)]) == 0
    assert main(["prune", str(source), "--keep", "1", "--out", str(run), "--overwrite"]) == 0
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--layers", "a,b"], "block indices separated by commas"),
    (["--keep", "0"], "give a number ≥ 1"),
])
def test_prune_arguments_are_checked(args: list[str], message: str, source: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["prune", str(source), "--out", str(tmp_path / "o"), *args])
    except SystemExit as e:  # argparse's own refusal: usage + one error line, exit 2
        code = int(e.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err


def _kd_config(tmp: Path, train_file: Path, tok: Path, teacher: Path) -> Path:
    cfg = tiny_run(tmp / "run", train_file, tok, teacher=teacher, data={"max_examples": 8})
    path = tmp / "kd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("flag", ["--top-k", "--shard-examples", "--batch-size"])
def test_cache_teacher_counts_must_be_positive(flag: str, tmp_path: Path, train_file: Path,
                                               byte_tokenizer_dir: Path, teacher_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = _kd_config(tmp_path, train_file, byte_tokenizer_dir, teacher_dir)
    with pytest.raises(SystemExit) as e:
        main(["cache-teacher", str(config), "--out", str(tmp_path / "cache"), flag, "0"])
    assert e.value.code == 2 and "give a number ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cache_teacher_refuses_a_foreign_folder_and_a_second_writer(tmp_path: Path, train_file: Path,
                                                                    byte_tokenizer_dir: Path, teacher_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import fcntl

    config = _kd_config(tmp_path, train_file, byte_tokenizer_dir, teacher_dir)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    assert main(["cache-teacher", str(config), "--out", str(mine), "--top-k", "4"]) == 2
    assert "holds something dualkd did not write" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["todo.txt"]

    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(config), "--out", str(cache), "--top-k", "4"]) == 0
    with (cache / ".lock").open("a+") as held:  # another process writing it now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["cache-teacher", str(config), "--out", str(cache), "--top-k", "4"]) == 2
        assert "another `dualkd cache-teacher` is writing" in capsys.readouterr().err
    assert main(["cache-teacher", str(config), "--out", str(cache), "--top-k", "4"]) == 0  # resumes: all done


def test_likelihood_batch_size_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["likelihood", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--batch-size", "0"])
    assert e.value.code == 2 and "give a number ≥ 1" in capsys.readouterr().err


def test_a_quick_methods_table_never_writes_the_committed_record_or_table(capsys: pytest.CaptureFixture[str]
                                                                          ) -> None:
    from experiments.methods_table.__main__ import DOC, RECORDS, main

    committed = [DOC, *RECORDS.iterdir()]
    before = {p: p.stat().st_mtime_ns for p in committed}
    for extra in ([], ["--records", "none"], ["--doc", "none"]):
        with pytest.raises(SystemExit) as e:
            main(["--quick", "--report-only", *extra])
        assert e.value.code == 2 and "--records none --doc none" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in committed} == before and len(committed) > 1


def test_unquoted_on_off_in_yaml_means_on_off(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path) -> None:
    """YAML 1.1 reads `fused: on` as true; dualkd takes it as the user wrote it."""
    from dualkd.config import load_config

    cfg = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir)
    text = yaml.safe_dump(cfg).replace("objective:\n  name: sft", "objective:\n  name: sft\n  fused: on")
    text = text.replace("progress_bar: 'off'", "progress_bar: off")
    (tmp_path / "c.yaml").write_text(text)
    loaded = load_config(tmp_path / "c.yaml", ["objective.fused=off"])
    assert loaded.objective.fused == "off" and loaded.logging.progress_bar == "off"
    assert load_config(tmp_path / "c.yaml").objective.fused == "on"


def test_resume_takes_no_value_but_auto(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "any.yaml", "--resume", "yes"])
    assert e.value.code == 2 and "--resume takes no value, or `auto`; got 'yes'" in capsys.readouterr().err
