"""The offline teacher cache: the sparse top-k loss against its dense twin, cache writing/reading/resume,
refusal of a mismatched cache, and training from the cache = training with the live teacher's top-k."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dualkd.cli import main
from dualkd.config import validate_config
from dualkd.errors import DualKDError
from dualkd.losses.sparse import sparse_kl, topk_targets
from dualkd.teachers.cache_files import CacheMismatch, TeacherCache
from dualkd.train.loop import train
from tests.helpers import make_model_dir, read_metrics, tiny_run


def _naive_bucket_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Forward KL between the dense distributions folded into {top-k of the teacher, everything else}."""
    p, q = torch.softmax(teacher_logits.double(), -1), torch.softmax(student_logits.double(), -1)
    out = []
    for row in range(p.shape[0]):
        top = p[row].topk(k).indices
        rest = torch.ones_like(p[row], dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[row, top], p[row, rest].sum()[None]])
        qb = torch.cat([q[row, top], q[row, rest].sum()[None]])
        out.append((pb * (pb.log() - qb.log())).sum())
    return torch.stack(out)


def test_sparse_kl_is_the_dense_kl_on_the_same_support() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(13, 50, generator=g, dtype=torch.float64) * 3
    for k in (1, 5, 49):
        targets = topk_targets(teacher, k)
        got = sparse_kl(h, w, targets, reduction="none", chunk_size=4)
        expected = _naive_bucket_kl(h @ w.T, teacher, k)
        assert torch.allclose(got.double(), expected, atol=1e-5), k
        g1 = torch.autograd.grad(got.sum(), (h, w))
        g2 = torch.autograd.grad(expected.sum(), (h, w))
        assert all(torch.allclose(a.double(), b, atol=1e-5) for a, b in zip(g1, g2))
    # nothing left in the tail: the full forward KL
    full = topk_targets(teacher, 50)
    dense = (torch.softmax(teacher, -1) * (torch.log_softmax(teacher, -1) - torch.log_softmax(h @ w.T, -1))).sum(-1)
    assert torch.allclose(sparse_kl(h, w, full, reduction="none").double(), dense, atol=1e-5)
    same = sparse_kl(h.detach(), w.detach(), topk_targets(h.detach() @ w.detach().T, 7))
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def _cache_config(tmp: Path, train_file: Path, tok: Path, teacher: Path, dev_file: Path, **extra) -> Path:
    cfg = tiny_run(tmp / "run", train_file, tok, teacher=teacher, objective={"name": "kd", "top_k": 8},
                   data={"dev": str(dev_file), "max_examples": 40}, optimization={"max_steps": 6},
                   eval={"every_steps": 3}, **extra)
    path = tmp / "kd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cache_round_trip_resume_and_training_matches_the_live_teacher(
        tmp_path: Path, train_file: Path, dev_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    config = _cache_config(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, dev_file)
    cache = tmp_path / "cache"
    args = ["cache-teacher", str(config), "--out", str(cache), "--top-k", "8", "--shard-examples", "16",
            "--encoding", "float32", "--hidden"]
    assert main(args) == 0
    manifest = json.loads((cache / "train" / "manifest.json").read_text())
    assert manifest["examples"] == 40 and manifest["complete"] == ["00000", "00001", "00002"]
    reader = TeacherCache(cache / "train")
    assert isinstance(reader._shard(0)["topk_ids"], np.memmap)  # read lazily, never whole
    assert reader.hidden([0, 1]).dtype == torch.bfloat16 and reader.bytes_per_token() > 8 * 8
    first = reader.targets([3, 17])

    # a crash mid-way (the last shard lost, a temporary folder left) resumes to the same files
    resumed = tmp_path / "resumed"
    shutil.copytree(cache, resumed)
    m = json.loads((resumed / "train" / "manifest.json").read_text())
    m["complete"] = m["complete"][:1]
    (resumed / "train" / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(resumed / "train" / "shards" / "00002")
    (resumed / "train" / "shards" / ".tmp-00001").mkdir()
    assert main([*args[:3], str(resumed), *args[4:]]) == 0
    again = TeacherCache(resumed / "train").targets([3, 17])
    assert torch.equal(first.ids, again.ids) and torch.equal(first.logprobs, again.logprobs)
    assert not (resumed / "train" / "shards" / ".tmp-00001").exists()

    # the same k from the live teacher and from the cache: the same training, step for step
    live = read_metrics(train(validate_config(yaml.safe_load(config.read_text()))))
    cached_cfg = yaml.safe_load(config.read_text())
    cached_cfg.update(output_dir=str(tmp_path / "from-cache"), teacher={"cache": str(cache)})
    from_cache = read_metrics(train(validate_config(cached_cfg)))
    assert len(live) == len(from_cache) == 6
    for a, b in zip(live, from_cache):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kd"] == pytest.approx(b["kd"], rel=1e-5)
    dev_live = read_metrics(tmp_path / "run", "dev")
    dev_cache = read_metrics(tmp_path / "from-cache", "dev")
    assert [d["loss"] for d in dev_live] == pytest.approx([d["loss"] for d in dev_cache], rel=1e-5)

    # DSKD from the cached hidden states and LM head (bf16 on disk) follows the live-teacher run closely
    dskd = {"name": "dskd", "kd_rate": 0.5}
    live_cfg = {**yaml.safe_load(config.read_text()), "objective": dskd, "output_dir": str(tmp_path / "dskd-live")}
    dskd_live = read_metrics(train(validate_config(live_cfg)))
    cached_cfg.update(objective=dskd, output_dir=str(tmp_path / "dskd-cache"))
    dskd_cache = read_metrics(train(validate_config(cached_cfg)))
    assert len(dskd_live) == len(dskd_cache) == 6
    for a, b in zip(dskd_live, dskd_cache):
        assert a["ce"] == pytest.approx(b["ce"], rel=5e-3)  # the student's own CE: only earlier steps differ
        for k in ("loss", "kd_teacher", "kd_student", "ce_t2s"):
            assert a[k] == pytest.approx(b[k], rel=2e-2, abs=2e-3), k  # bf16 hidden states and head


def test_a_mismatched_cache_is_refused(tmp_path: Path, train_file: Path, dev_file: Path, byte_tokenizer_dir: Path,
                                       teacher_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = _cache_config(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, dev_file)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(config), "--out", str(cache), "--top-k", "8", "--shard-examples", "64"]) == 0
    # another k into the same folder: refused, nothing overwritten
    assert main(["cache-teacher", str(config), "--out", str(cache), "--top-k", "4", "--shard-examples", "64"]) == 2
    assert "k: cache 8 vs now 4" in capsys.readouterr().err
    assert TeacherCache(cache / "train").k == 8
    cfg = yaml.safe_load(config.read_text())
    cfg.update(output_dir=str(tmp_path / "other"), teacher={"cache": str(cache)})
    cfg["data"]["max_examples"] = 30  # other data than the cache was made from
    with pytest.raises(CacheMismatch, match="data: cache"):
        train(validate_config(cfg))
    cfg["data"]["max_examples"] = 40
    cfg["objective"] = {"name": "kd", "top_k": 4}
    with pytest.raises(DualKDError, match="top 8"):
        train(validate_config(cfg))
    cfg["objective"] = {"name": "dskd_cma"}  # reads hidden states at every position: a live teacher only
    with pytest.raises(DualKDError, match="objective `dskd_cma`.*an offline teacher cache cannot give"):
        train(validate_config(cfg))
    cfg["objective"] = {"name": "dskd"}  # written without --hidden
    with pytest.raises(DualKDError, match="--hidden"):
        train(validate_config(cfg))
    cfg["objective"] = {"name": "kd"}
    cfg["source"] = {"kind": "on_policy"}  # new sequences: the cache cannot score them
    with pytest.raises(DualKDError, match="teacher.kind=cache holds the teacher's outputs on the dataset responses"):
        validate_config(cfg)
    cfg["source"] = {"kind": "cache", "cache_dir": str(cache)}  # the old way says where it moved
    with pytest.raises(DualKDError, match=r"by `teacher: \{cache: DIR\}`"):
        validate_config(cfg)


def test_dskdv2_and_xtoken_across_tokenizers_train_from_the_cache(tmp_path: Path, train_file: Path, dev_file: Path,
                                                        byte_tokenizer_dir: Path, meta_tokenizer_dir: Path) -> None:
    """DSKDv2-ETA and X-Token with a teacher of another vocabulary: the cache's teacher tokenization is checked
    against the run's, and the cached hidden states at the teacher's response positions stand in for the live
    teacher."""
    teacher = make_model_dir(tmp_path / "teacher", meta_tokenizer_dir, model_type="llama", hidden_size=48,
                             intermediate_size=96, seed=2)
    dskdv2 = {"name": "dskdv2", "alignment": "eta", "kd_rate": 0.5}
    config = _cache_config(tmp_path, train_file, byte_tokenizer_dir, teacher, dev_file)
    cfg = {**yaml.safe_load(config.read_text()), "objective": dskdv2}
    config.write_text(yaml.safe_dump(cfg))
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(config), "--out", str(cache), "--top-k", "4", "--hidden"]) == 0
    live = read_metrics(train(validate_config(cfg)))
    from_cache = read_metrics(train(validate_config({**cfg, "teacher": {"cache": str(cache)},
                                                     "output_dir": str(tmp_path / "c")})))
    assert len(live) == len(from_cache) == 6
    for a, b in zip(live, from_cache):
        assert a["tokens"] == b["tokens"]
        for k in ("loss", "ce_t2s", "kd_student", "kd_teacher", "t2s_agreement"):
            assert a[k] == pytest.approx(b[k], rel=2e-2, abs=2e-3), k  # bf16 hidden states and head
    # X-Token reads the same two things (response hidden states, the head): the same cache serves it
    xtoken = {**cfg, "objective": {"name": "xtoken", "loss": "hkl"}, "output_dir": str(tmp_path / "x")}
    live = read_metrics(train(validate_config(xtoken)))
    from_cache = read_metrics(train(validate_config({**xtoken, "teacher": {"cache": str(cache)},
                                                     "output_dir": str(tmp_path / "xc")})))
    assert len(live) == len(from_cache) == 6
    for a, b in zip(live, from_cache):
        for k in ("loss", "kd"):
            assert a[k] == pytest.approx(b[k], rel=2e-2, abs=2e-3), k


def test_the_packed_encoding_trains_like_the_plain_one_and_old_caches_still_read(
        tmp_path: Path, train_file: Path, dev_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path,
        capsys: pytest.CaptureFixture) -> None:
    config = _cache_config(tmp_path, train_file, byte_tokenizer_dir, teacher_dir, dev_file)
    caches = {}
    for encoding in ("packed", "float32"):
        caches[encoding] = tmp_path / encoding
        assert main(["cache-teacher", str(config), "--out", str(caches[encoding]), "--top-k", "8",
                     "--shard-examples", "16", "--encoding", encoding]) == 0
    packed, plain = (TeacherCache(caches[e] / "train") for e in ("packed", "float32"))
    assert packed.bytes_per_token() < 0.6 * plain.bytes_per_token()
    a, b = packed.targets([0, 5, 39]), plain.targets([0, 5, 39])
    assert torch.equal(a.ids, b.ids) and torch.equal(a.tail, b.tail)
    assert (a.logprobs - b.logprobs).abs().max() < 4e-3  # top 4 in float16 (step 2^-8 at |l| in [4, 8)), then 6 bits
    runs = {}
    for encoding, cache in caches.items():
        cfg = yaml.safe_load(config.read_text())
        cfg.update(output_dir=str(tmp_path / f"run-{encoding}"), teacher={"cache": str(cache)})
        runs[encoding] = read_metrics(train(validate_config(cfg)))
    for x, y in zip(runs["packed"], runs["float32"]):
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-3, abs=1e-4)

    # a format-1 cache (before the packed encoding: `logprob_dtype` named the plain encoding) still reads
    manifest_file = caches["float32"] / "train" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    old = {**{k: v for k, v in manifest.items() if k != "encoding"}, "format": 1, "logprob_dtype": "float32"}
    manifest_file.write_text(json.dumps(old))
    again = TeacherCache(caches["float32"] / "train").targets([0, 5, 39])
    assert torch.equal(again.ids, b.ids) and torch.equal(again.logprobs, b.logprobs)
    manifest_file.write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(DualKDError, match="cache format 3; this dualkd reads formats 1, 2"):
        TeacherCache(caches["float32"] / "train")
    manifest_file.write_text(json.dumps({**manifest, "encoding": "bfloat8"}))
    with pytest.raises(DualKDError, match="top-k encoding 'bfloat8'"):
        TeacherCache(caches["float32"] / "train")
