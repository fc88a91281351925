"""Nothing trains NaN in silence: a non-finite loss or gradient, or a cache with NaN in it, stops the run with a
message naming the step, the term or the example, the last good state saved, no model exported, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dualkd.cli import main
from dualkd.methods.sft import SFT
from tests.helpers import tiny_run


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _poison_from(monkeypatch: pytest.MonkeyPatch, call: int, how: str) -> None:
    """From the `call`-th SFT forward on (training micro-batches only), make the loss NaN (`loss`) or keep it
    finite with a NaN gradient (`grad`: sqrt(|0·w|) has value 0 and gradient inf·0)."""
    original = SFT.forward
    calls = {"n": 0}

    def forward(self, student, batch, teacher_out, norm):  # noqa: ANN001, ANN202
        loss, metrics = original(self, student, batch, teacher_out, norm)
        if student.training:
            calls["n"] += 1
            if calls["n"] >= call:
                if how == "loss":
                    loss = loss * float("nan")
                else:
                    w = next(student.parameters())
                    loss = loss + (w.sum() * 0).abs().sqrt()
        return loss, metrics

    monkeypatch.setattr(SFT, "forward", forward)


@pytest.mark.parametrize("how, message", [("loss", "step 4: non-finite loss = nan"),
                                          ("grad", "step 4: the gradient norm is nan")])
def test_a_non_finite_step_stops_the_run_with_the_last_good_state(
        how: str, message: str, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _poison_from(monkeypatch, 4, how)  # micro_batch_size 4, grad_accum 1: the 4th forward is step 4
    run = tmp_path / "run"
    config = _write(tiny_run(run, train_file, byte_tokenizer_dir), tmp_path / "c.yaml")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dualkd: error: " in err and message in err
    assert "the step was not applied" in err and "checkpoint of step 3" in err
    assert "examples [" in err or how == "grad"
    saved = load_file(run / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())
    assert not (run / "final").exists()  # no NaN model exported


def _cache_config(tmp: Path, train_file: Path, tok: Path, teacher: Path) -> Path:
    cfg = tiny_run(tmp / "run", train_file, tok, teacher=teacher, objective={"name": "kd", "top_k": 4},
                   data={"max_examples": 24}, optimization={"max_steps": 6})
    return _write(cfg, tmp / "kd.yaml")


@pytest.fixture(scope="module", params=["packed", "float16"])
def cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, train_file: Path,
          byte_tokenizer_dir: Path, teacher_dir: Path) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("cache")
    config = _cache_config(tmp, train_file, byte_tokenizer_dir, teacher_dir)
    assert main(["cache-teacher", str(config), "--out", str(tmp / "cache"), "--top-k", "4",
                 "--shard-examples", "8", "--encoding", request.param]) == 0
    return config, tmp / "cache", request.param


def _damaged(cache: Path, tmp: Path, array: str, damage) -> Path:  # noqa: ANN001
    import shutil

    copy = tmp / f"cache-{array}"
    shutil.copytree(cache, copy)
    path = copy / "train" / "shards" / "00001" / f"{array}.npy"
    damaged = damage(np.load(path))
    if damaged is None:  # an empty file (a disk that filled up)
        path.write_bytes(b"")
    else:
        np.save(path, damaged, allow_pickle=False)
    return copy


def _nan_exact(a: np.ndarray) -> np.ndarray:
    """A packed row's first exact log-probability (after the 5 id bytes: k 4 × 9 bits, V 400) set to a NaN."""
    a = a.copy()
    a[1, 5:7] = np.array([0x00, 0x7E], dtype=np.uint8)  # float16 NaN, little-endian
    return a


def _ids_past(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[:, :5] = 0xFF  # every 9-bit id 511, past the 400-token vocabulary
    return a


DAMAGE = {  # case → (array, damage, message) per encoding
    "NaN log-probabilities": {
        "float16": ("topk_logprobs", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5,
                                                        np.nan, a).astype(a.dtype), "log-probability nan"),
        "packed": ("topk_packed", _nan_exact, "log-probability nan")},
    "NaN tail masses": ("tail", lambda a: np.full_like(a, np.nan), "tail log-mass nan"),
    "ids past the vocabulary": {
        "float16": ("topk_ids", lambda a: (a + 60000).astype(a.dtype), "outside the teacher's vocabulary"),
        "packed": ("topk_packed", _ids_past, "outside the teacher's vocabulary")},
    "truncated array": ("tail", lambda a: a[:-3], "where the manifest says"),
    "another k": {"float16": ("topk_ids", lambda a: a[:, :3], "where the manifest says"),
                  "packed": ("topk_packed", lambda a: a[:, :-1], "where the manifest says")},
    "another dtype": {"float16": ("topk_logprobs", lambda a: a.astype(np.float32), "where the manifest says"),
                      "packed": ("topk_packed", lambda a: a.astype(np.uint16), "where the manifest says")},
    "an empty file": {"float16": ("topk_ids", lambda a: None, "unreadable"),
                      "packed": ("topk_packed", lambda a: None, "unreadable")},
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_stops_with_the_file_named(case: str, cache: tuple[Path, Path, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config, folder, encoding = cache
    array, damage, message = DAMAGE[case][encoding] if isinstance(DAMAGE[case], dict) else DAMAGE[case]
    damaged = _damaged(folder, tmp_path, array, damage)
    assert main(["train", str(config), f"teacher.cache={damaged}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "dualkd: error: " in err and message in err, err
    assert "00001" in err
    assert not (tmp_path / "run" / "final").exists()


def test_a_missing_shard_or_a_truncated_manifest_is_named(cache: tuple[Path, Path, str], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    config, folder, _ = cache
    copy = tmp_path / "c1"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "train" / "shards" / "00002")
    assert main(["train", str(config), f"teacher.cache={copy}", f"output_dir={tmp_path / 'r1'}"]) == 2
    assert "shard missing from the teacher cache" in capsys.readouterr().err
    copy = tmp_path / "c2"
    shutil.copytree(folder, copy)
    manifest = copy / "train" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    assert main(["train", str(config), f"teacher.cache={copy}", f"output_dir={tmp_path / 'r2'}"]) == 2
    assert "not a readable cache manifest" in capsys.readouterr().err


def test_settings_a_topk_teacher_cannot_honour_are_refused(cache: tuple[Path, Path, str], tmp_path: Path,
                                                           byte_tokenizer_dir: Path, meta_tokenizer_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config, folder, _ = cache
    base = ["train", str(config), f"teacher.cache={folder}", f"output_dir={tmp_path / 'run'}",
            "objective.top_k=null"]
    assert main([*base, "objective.divergence=rkl"]) == 2
    assert "objective.divergence=rkl" in capsys.readouterr().err
    assert main([*base, "objective.ranking_top_k=2"]) == 2
    assert "ranking_top_k" in capsys.readouterr().err
    # a cache of another teacher: both named
    assert main([*base, f"teacher.path={meta_tokenizer_dir}"]) == 2
    err = capsys.readouterr().err
    assert "was written by the teacher" in err and str(meta_tokenizer_dir) in err
