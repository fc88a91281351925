"""The files of an offline teacher cache: run a large teacher once over a training set, train from the files.

    dualkd cache-teacher configs/kd.yaml --out cache/ --top-k 64 [--hidden]
    dualkd train configs/kd.yaml teacher.cache=cache/          # no teacher model loaded (teachers/cached.py)

Layout of the cache folder (every file written to a temporary name, fsync'ed, renamed; NumPy arrays loaded
with `allow_pickle=False` and memory-mapped, so a shard is read lazily, never whole):

    manifest.json        what the cache was made from (teacher, tokenizer hash, data hash, k, dtypes) and the
                         shards that are complete; a run with other data, teacher or k is refused
    tokenizer/           the teacher's tokenizer (a cache of a teacher you do not have locally still trains)
    head.safetensors     with --hidden: the teacher's LM head (bf16), for objectives that project hidden states
    shards/00000/        examples [0, S): per response position (the teacher's `loss_mask` order)
        topk_ids.npy       [N, k] uint16|int32  the teacher's k most likely next tokens (uint16 for V <= 65,536)
        topk_logprobs.npy  [N, k] fp16|fp32   their log-probabilities
        tail.npy           [N] fp32           log of the remaining probability mass (the tail bucket)
        hidden.npy         [N, d] bf16 bits   with --hidden: the teacher's last hidden states (uint16 view)
        rows.npy           [n + 1] int64      where each example's rows start
        seq_ids.npy, seq_offsets.npy, seq_rows.npy, prompt.npy   the teacher's tokenization of each example
                           (ids, character offsets, prompt length/characters) for cross-tokenizer alignment

A crash leaves complete shards and at most one temporary folder; rerunning the command resumes after the last
complete shard. One process writes the cache (run it where the teacher fits).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualkd.atomic import atomic_open, fsync_tree, write_text_atomic
from dualkd.data.collate import TokenizedExample, pad_batch
from dualkd.errors import ConfigError, DataError
from dualkd.losses.sparse import TopKTargets, topk_rows
from dualkd.teachers.base import Teacher

FORMAT = 1


class CacheMismatch(ConfigError):
    """The cache was made from something else than this run."""


def data_fingerprint(examples: list[TokenizedExample]) -> str:
    """sha256 over the teacher's token ids and prompt lengths of every example, in order: the same data,
    tokenizer, truncation and skipping rules give the same hash."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.ids, dtype=np.int64).tobytes())
        h.update(np.int64(ex.prompt_len).tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _save_npy(folder: Path, name: str, array: np.ndarray) -> None:
    with (folder / f"{name}.npy").open("wb") as f:
        np.save(f, array, allow_pickle=False)


# ----------------------------------------------------------------------------------------------- writing


@torch.no_grad()
def write_cache(out: str | Path, teacher: Teacher, examples: list[TokenizedExample], teacher_name: str, *,
                pad_id: int, k: int = 64, hidden: bool = False, logprob_dtype: str = "float16",
                shard_examples: int = 1024, batch_size: int = 8, device: torch.device | str = "cpu",
                chunk_size: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Write (or resume) a cache of `teacher` (a live one: its response hidden states and head) over `examples`
    (the teacher's tokenization of the training set, padded with `pad_id`). Returns the manifest."""
    out = Path(out)
    tokenizer = teacher.tokenizer
    head, bias = teacher.head()
    vocab = min(head.shape[0], len(tokenizer))
    meta = {"format": FORMAT, "teacher": teacher_name, "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": data_fingerprint(examples), "examples": len(examples), "k": k, "vocab": vocab,
            "logprob_dtype": logprob_dtype, "hidden": hidden, "hidden_size": int(head.shape[1]),
            "shard_examples": shard_examples}
    manifest = _start_manifest(out, meta)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").exists():
        tokenizer.save_pretrained(out / "tokenizer")
    if hidden and not (out / "head.safetensors").exists():
        from safetensors.torch import save

        tensors = {"weight": head[:vocab].detach().to(torch.bfloat16).contiguous().cpu()}
        if bias is not None:
            tensors["bias"] = bias[:vocab].detach().to(torch.bfloat16).contiguous().cpu()
        with atomic_open(out / "head.safetensors", "wb", fsync=True) as f:
            f.write(save(tensors))
    lp_dtype = np.float16 if logprob_dtype == "float16" else np.float32
    ids_dtype = np.uint16 if vocab <= 1 << 16 else np.int32  # 2 bytes per id for vocabularies up to 65,536
    started = time.perf_counter()
    for shard, start in enumerate(range(0, len(examples), shard_examples)):
        name = f"{shard:05d}"
        if name in manifest["complete"]:
            if progress is not None:
                progress(min(shard_examples, len(examples) - start))
            continue
        part = examples[start:start + shard_examples]
        results: list[tuple[TopKTargets, np.ndarray | None]] = [None] * len(part)  # type: ignore[list-item]
        order = sorted(range(len(part)), key=lambda i: len(part[i].ids))  # similar lengths share a batch
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            tokens = pad_batch([part[i] for i in idx], pad_id).to(device)
            counts = tokens.loss_mask.sum(-1).tolist()
            rows = teacher.response_hidden(tokens, [start + i for i in idx])  # [N, d]
            targets = topk_rows(rows, head[:vocab], bias[:vocab] if bias is not None else None, k, chunk_size)
            offset = 0
            for i, n in zip(idx, counts):
                sl = slice(offset, offset + n)
                hid = rows[sl].to(torch.bfloat16).view(torch.uint16).cpu().numpy() if hidden else None
                results[i] = (TopKTargets(targets.ids[sl].cpu(), targets.logprobs[sl].cpu(), targets.tail[sl].cpu()),
                              hid)
                offset += n
            if progress is not None:
                progress(len(idx))
        _write_shard(out / "shards", name, part, results, lp_dtype, ids_dtype)
        manifest["complete"].append(name)
        manifest["seconds"] = manifest.get("seconds", 0.0) + time.perf_counter() - started
        started = time.perf_counter()
        write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2), fsync=True)
    return manifest


def _start_manifest(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    path = out / "manifest.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        diff = [f"{k}: cache {manifest.get(k)!r} vs now {v!r}" for k, v in meta.items() if manifest.get(k) != v]
        if diff:
            raise CacheMismatch(f"{out} holds a cache of something else; remove it or choose another --out:\n  "
                                + "\n  ".join(diff))
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**meta, "complete": []}
    write_text_atomic(path, json.dumps(manifest, indent=2), fsync=True)
    return manifest


def _write_shard(root: Path, name: str, part: list[TokenizedExample],
                 results: list[tuple[TopKTargets, np.ndarray | None]], lp_dtype: type, ids_dtype: type) -> None:
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rows = np.cumsum([0] + [len(t) for t, _ in results]).astype(np.int64)
    _save_npy(tmp, "rows", rows)
    _save_npy(tmp, "topk_ids", np.concatenate([t.ids.numpy().astype(ids_dtype) for t, _ in results]))
    _save_npy(tmp, "topk_logprobs", np.concatenate([t.logprobs.numpy().astype(lp_dtype) for t, _ in results]))
    _save_npy(tmp, "tail", np.concatenate([t.tail.numpy().astype(np.float32) for t, _ in results]))
    if results[0][1] is not None:
        _save_npy(tmp, "hidden", np.concatenate([h for _, h in results]))  # type: ignore[misc]
    _save_npy(tmp, "seq_rows", np.cumsum([0] + [len(x.ids) for x in part]).astype(np.int64))
    _save_npy(tmp, "seq_ids", np.concatenate([np.asarray(x.ids, dtype=np.int32) for x in part]))
    _save_npy(tmp, "seq_offsets", np.concatenate([np.asarray(x.offsets, dtype=np.int32).reshape(-1, 2)
                                                   for x in part]))
    _save_npy(tmp, "prompt", np.asarray([[x.prompt_len, x.prompt_chars] for x in part], dtype=np.int64))
    fsync_tree(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


# ----------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """Lazy, memory-mapped reader of a complete cache."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise DataError(f"{self.folder}: no teacher cache here (no manifest.json); write one with "
                            "`dualkd cache-teacher`")
        self.manifest = json.loads(path.read_text())
        n, per = self.manifest["examples"], self.manifest["shard_examples"]
        expected = (n + per - 1) // per
        if len(self.manifest["complete"]) < expected:
            raise DataError(f"{self.folder}: the cache is incomplete ({len(self.manifest['complete'])} of {expected} "
                            "shards); rerun `dualkd cache-teacher` to finish it")
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    def check(self, tokenizer: Any, examples: list[TokenizedExample]) -> None:
        """Refuse a cache of other data or another tokenizer, naming what differs."""
        now = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": data_fingerprint(examples),
               "examples": len(examples)}
        diff = [f"{k}: cache {self.manifest[k]!r} vs this run {v!r}" for k, v in now.items() if self.manifest[k] != v]
        if diff:
            raise CacheMismatch(f"the teacher cache {self.folder} was made from other data or another teacher "
                                f"tokenizer (teacher {self.manifest['teacher']}):\n  " + "\n  ".join(diff))

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._shards:
            folder = self.folder / "shards" / f"{s:05d}"
            self._shards[s] = {p.stem: np.load(p, mmap_mode="r", allow_pickle=False) for p in folder.glob("*.npy")}
        return self._shards[s]

    def targets(self, indices: list[int]) -> TopKTargets:
        """The cached rows of these examples, concatenated in order (= the batch's `loss_mask` order)."""
        per = self.manifest["shard_examples"]
        ids, lps, tails = [], [], []
        for i in indices:
            shard = self._shard(i // per)
            j = i % per
            a, b = int(shard["rows"][j]), int(shard["rows"][j + 1])
            ids.append(np.asarray(shard["topk_ids"][a:b]).astype(np.int64))
            lps.append(np.asarray(shard["topk_logprobs"][a:b], dtype=np.float32))
            tails.append(np.asarray(shard["tail"][a:b]))
        return TopKTargets(torch.from_numpy(np.concatenate(ids)).long(), torch.from_numpy(np.concatenate(lps)),
                           torch.from_numpy(np.concatenate(tails)))

    def hidden(self, indices: list[int]) -> torch.Tensor:
        """The cached last hidden states (bf16) of these examples' response positions, concatenated."""
        if not self.manifest["hidden"]:
            raise DataError(f"{self.folder}: written without --hidden")
        per = self.manifest["shard_examples"]
        parts = []
        for i in indices:
            shard = self._shard(i // per)
            a, b = int(shard["rows"][i % per]), int(shard["rows"][i % per + 1])
            parts.append(np.asarray(shard["hidden"][a:b]))
        return torch.from_numpy(np.concatenate(parts)).view(torch.bfloat16)

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head saved with --hidden: weight [V, d] and bias [V] or None (bf16)."""
        from safetensors.torch import load_file

        tensors = load_file(str(self.folder / "head.safetensors"))
        return tensors["weight"], tensors.get("bias")

    def sequence(self, i: int) -> TokenizedExample:
        """The teacher's tokenization of example i (ids, offsets, prompt) as stored."""
        per = self.manifest["shard_examples"]
        shard, j = self._shard(i // per), i % per
        a, b = int(shard["seq_rows"][j]), int(shard["seq_rows"][j + 1])
        prompt_len, prompt_chars = (int(v) for v in shard["prompt"][j])
        return TokenizedExample(ids=shard["seq_ids"][a:b].tolist(),
                                offsets=[tuple(o) for o in shard["seq_offsets"][a:b].tolist()],
                                prompt_len=prompt_len, text="", prompt_chars=prompt_chars)

    def bytes_per_token(self) -> float:
        """Bytes of the per-position arrays (top-k, tail, hidden) per cached response token."""
        rows = size = 0
        for name in self.manifest["complete"]:
            folder = self.folder / "shards" / name
            rows += int(np.load(folder / "rows.npy")[-1])
            size += sum((folder / f"{a}.npy").stat().st_size for a in ("topk_ids", "topk_logprobs", "tail", "hidden")
                        if (folder / f"{a}.npy").exists())
        return size / max(rows, 1)
