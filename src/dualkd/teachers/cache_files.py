"""The files of an offline teacher cache: run a large teacher once over a training set, train from the files.

    dualkd cache-teacher configs/kd.yaml --out cache/ --top-k 64 [--hidden] [--encoding packed|float16|float32]
    dualkd train configs/kd.yaml teacher.cache=cache/          # no teacher model loaded (teachers/cached.py)

Layout of the cache folder (every file written to a temporary name, fsync'ed, renamed; NumPy arrays loaded
with `allow_pickle=False` and memory-mapped, so a shard is read lazily, never whole):

    manifest.json        what the cache was made from (teacher, tokenizer hash, data hash, k, encoding) and the
                         shards that are complete; a run with other data, teacher or k is refused
    tokenizer/           the teacher's tokenizer (a cache of a teacher you do not have locally still trains)
    head.safetensors     with --hidden: the teacher's LM head (bf16), for objectives that project hidden states
    shards/00000/        examples [0, S): per response position (the teacher's `loss_mask` order)
        topk_packed.npy    [N, B] uint8       encoding "packed" (the default): the k most likely next tokens and
                                              their log-probabilities, B ≈ 2.3·k bytes (teachers/cache_codec.py)
        topk_ids.npy       [N, k] uint16|int32  encodings "float16"/"float32": the k most likely next tokens
        topk_logprobs.npy  [N, k] fp16|fp32     and their log-probabilities, stored plainly
        tail.npy           [N] fp32           log of the remaining probability mass (the tail bucket)
        hidden.npy         [N, d] bf16 bits   with --hidden: the teacher's last hidden states (uint16 view)
        rows.npy           [n + 1] int64      where each example's rows start
        seq_ids.npy, seq_offsets.npy, seq_rows.npy, prompt.npy   the teacher's tokenization of each example
                           (ids, character offsets, prompt length/characters) for cross-tokenizer alignment

A crash leaves complete shards and at most one temporary folder; rerunning the command resumes after the last
complete shard. One process writes the cache (run it where the teacher fits). Format 1 (written before the packed
encoding, always plain) still reads; docs/benchmark-cache.md has the bytes, the speeds and the packed encoding's
effect on the loss.
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
from dualkd.teachers.cache_codec import PackedRows
from dualkd.teachers.checks import TeacherOutputError, check_finite, check_topk

FORMAT = 2
READS = (1, 2)
"""Format 1: the plain encodings only, named by the manifest's `logprob_dtype`; 2: `encoding`, packed included."""
ENCODINGS = ("packed", "float16", "float32")
_MANIFEST_KEYS = ("format", "teacher", "tokenizer", "data", "examples", "k", "vocab", "hidden", "hidden_size",
                  "shard_examples", "complete")


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
                pad_id: int, k: int = 64, hidden: bool = False, encoding: str = "packed",
                shard_examples: int = 1024, batch_size: int = 8, device: torch.device | str = "cpu",
                chunk_size: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Write (or resume) a cache of `teacher` (a live one: its response hidden states and head) over `examples`
    (the teacher's tokenization of the training set, padded with `pad_id`), its top-k rows in `encoding` (one
    of ENCODINGS). Returns the manifest."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"cache encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
    out = Path(out)
    tokenizer = teacher.tokenizer
    head, bias = teacher.head()
    vocab = min(head.shape[0], len(tokenizer))
    meta = {"format": FORMAT, "teacher": teacher_name, "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": data_fingerprint(examples), "examples": len(examples), "k": k, "vocab": vocab,
            "encoding": encoding, "hidden": hidden, "hidden_size": int(head.shape[1]),
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
    rows_format = _RowsFormat(encoding, k, vocab)
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
        _write_shard(out / "shards", name, part, results, rows_format)
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


class _RowsFormat:
    """How the top-k rows of one cache sit in its shards: packed bytes, or plain ids and log-probabilities."""

    def __init__(self, encoding: str, k: int, vocab: int):
        self.encoding, self.k, self.vocab = encoding, k, vocab
        self.packed = PackedRows(k, vocab) if encoding == "packed" else None
        self.ids_dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)  # plain: 2 bytes per id up to 65,536
        self.lp_dtype = np.dtype(np.float16 if encoding == "float16" else np.float32)

    def arrays(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The shard arrays of n rows: name → (shape, dtype)."""
        if self.packed is not None:
            return {"topk_packed": ((n, self.packed.row_bytes), np.dtype(np.uint8))}
        return {"topk_ids": ((n, self.k), self.ids_dtype), "topk_logprobs": ((n, self.k), self.lp_dtype)}

    def encode(self, targets: TopKTargets) -> dict[str, np.ndarray]:
        ids, lps = targets.ids.numpy(), targets.logprobs.numpy()
        if self.packed is not None:
            return {"topk_packed": self.packed.encode(ids, lps)}
        return {"topk_ids": ids.astype(self.ids_dtype), "topk_logprobs": lps.astype(self.lp_dtype)}

    def decode(self, arrays: dict[str, np.ndarray], tail: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """ids [N, k] int64 and log-probabilities [N, k] fp32 of the rows in `arrays`, and whether the decoding
        already found them sound (packed rows are checked as they decode; plain ones need check_topk)."""
        if self.packed is not None:
            ids, lps, ok = self.packed.decode(arrays["topk_packed"], tail)
            return ids, lps, bool(ok.all())
        return arrays["topk_ids"].astype(np.int64), arrays["topk_logprobs"].astype(np.float32), False


def _write_shard(root: Path, name: str, part: list[TokenizedExample],
                 results: list[tuple[TopKTargets, np.ndarray | None]], rows_format: _RowsFormat) -> None:
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rows = np.cumsum([0] + [len(t) for t, _ in results]).astype(np.int64)
    _save_npy(tmp, "rows", rows)
    encoded = [rows_format.encode(t) for t, _ in results]
    for array in encoded[0]:
        _save_npy(tmp, array, np.concatenate([e[array] for e in encoded]))
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
    """Lazy, memory-mapped reader of a complete cache. Every array is checked against the manifest as its shard
    opens (files present and readable, shapes, dtypes, k), and every example's top-k as it is read
    (teachers/checks.py): a damaged cache stops with the file and example named, never trains on garbage."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise DataError(f"{self.folder}: no teacher cache here (no manifest.json); write one with "
                            "`dualkd cache-teacher`")
        try:
            self.manifest = json.loads(path.read_text())
            missing = [k for k in _MANIFEST_KEYS if k not in self.manifest]
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raise DataError(f"{path}: not a readable cache manifest ({e}); rewrite the cache with "
                            "`dualkd cache-teacher`") from None
        if missing:
            raise DataError(f"{path}: the manifest lacks {', '.join(missing)} (truncated, or not a dualkd cache); "
                            "rewrite the cache with `dualkd cache-teacher`")
        if self.manifest["format"] not in READS:
            raise DataError(f"{path}: cache format {self.manifest['format']!r}; this dualkd reads formats "
                            f"{', '.join(map(str, READS))} (rewrite the cache with this version's "
                            "`dualkd cache-teacher`)")
        encoding = self.manifest.get("encoding" if self.manifest["format"] >= 2 else "logprob_dtype")
        if encoding not in ENCODINGS:
            raise DataError(f"{path}: top-k encoding {encoding!r}, not one of {', '.join(ENCODINGS)}; the manifest "
                            "is damaged or was written by a newer dualkd")
        self._rows = _RowsFormat(encoding, int(self.manifest["k"]), int(self.manifest["vocab"]))
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
            self._shards[s] = self._open_shard(s)
        return self._shards[s]

    def _open_shard(self, s: int) -> dict[str, np.ndarray]:
        """Shard s's arrays, memory-mapped, after checking them against the manifest."""
        folder = self.folder / "shards" / f"{s:05d}"
        m = self.manifest
        if not folder.is_dir():
            raise DataError(f"{folder}: shard missing from the teacher cache (the manifest lists it as complete); "
                            "rerun `dualkd cache-teacher` into a new folder")
        names = ["rows", *self._rows.arrays(0), "tail", "seq_rows", "seq_ids", "seq_offsets", "prompt"]
        arrays = {}
        for name in names + (["hidden"] if m["hidden"] else []):
            file = folder / f"{name}.npy"
            try:
                arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise DataError(f"{file}: missing from the teacher cache") from None
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{file}: unreadable ({e}); the cache is damaged, rewrite it") from None
        examples = min(m["shard_examples"], m["examples"] - s * m["shard_examples"])
        rows = arrays["rows"]
        n = int(rows[-1]) if rows.ndim == 1 and len(rows) else -1
        expect = {"rows": ((examples + 1,), np.dtype(np.int64)), **self._rows.arrays(n),
                  "tail": ((n,), np.dtype(np.float32)),
                  "prompt": ((examples, 2), np.dtype(np.int64)), "seq_rows": ((examples + 1,), np.dtype(np.int64))}
        if m["hidden"]:
            expect["hidden"] = ((n, m["hidden_size"]), np.dtype(np.uint16))
        for name, (shape, dtype) in expect.items():
            a = arrays[name]
            if a.shape != shape or a.dtype != dtype:
                raise DataError(f"{folder / name}.npy: {a.dtype} {list(a.shape)} where the manifest says {dtype} "
                                f"{list(shape)} (k {m['k']}, {examples} examples); the cache is damaged or was "
                                "written by something else")
        if rows[0] != 0 or (np.diff(rows) < 0).any():
            raise DataError(f"{folder / 'rows'}.npy: row starts are not increasing from 0; the cache is damaged")
        return arrays

    def targets(self, indices: list[int]) -> TopKTargets:
        """The cached rows of these examples, concatenated in order (= the batch's `loss_mask` order), decoded in
        one pass and checked (finite log-probabilities ≤ 0, masses summing to 1, ids inside the vocabulary); a bad
        row is reported with its example."""
        per = self.manifest["shard_examples"]
        stored: dict[str, list[np.ndarray]] = {name: [] for name in self._rows.arrays(0)}
        tails, lengths = [], []
        for i in indices:
            if not 0 <= i < self.manifest["examples"]:
                raise DataError(f"{self.folder}: example {i} asked of a cache of {self.manifest['examples']}")
            shard = self._shard(i // per)
            a, b = int(shard["rows"][i % per]), int(shard["rows"][i % per + 1])
            for name, parts in stored.items():
                parts.append(shard[name][a:b])
            tails.append(shard["tail"][a:b])
            lengths.append(b - a)
        tail = np.concatenate(tails).astype(np.float32)
        ids, lps, sound = self._rows.decode({name: np.concatenate(parts) for name, parts in stored.items()}, tail)
        try:
            if not sound:
                check_topk(ids, lps, tail, k=self.k, vocab_size=int(self.manifest["vocab"]),
                           where=f"teacher cache {self.folder}, examples {indices}")
        except TeacherOutputError:  # name the example: check them one by one
            for i, lo, hi in zip(indices, np.cumsum([0, *lengths[:-1]]), np.cumsum(lengths)):
                check_topk(ids[lo:hi], lps[lo:hi], tail[lo:hi], k=self.k, vocab_size=int(self.manifest["vocab"]),
                           where=f"teacher cache {self.folder / 'shards' / f'{i // per:05d}'}, example {i}")
            raise
        return TopKTargets(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tail))

    def hidden(self, indices: list[int]) -> torch.Tensor:
        """The cached last hidden states (bf16) of these examples' response positions, concatenated."""
        if not self.manifest["hidden"]:
            raise DataError(f"{self.folder}: written without --hidden")
        per = self.manifest["shard_examples"]
        parts = []
        for i in indices:
            shard = self._shard(i // per)
            a, b = int(shard["rows"][i % per]), int(shard["rows"][i % per + 1])
            bits = np.asarray(shard["hidden"][a:b])
            check_finite((bits.astype(np.uint32) << 16).view(np.float32), what="hidden states",  # bf16 -> fp32
                         where=f"teacher cache {self.folder}, example {i}")
            parts.append(bits)
        return torch.from_numpy(np.concatenate(parts)).view(torch.bfloat16)

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head saved with --hidden: weight [V, d] and bias [V] or None (bf16)."""
        from safetensors.torch import load_file

        file = self.folder / "head.safetensors"
        try:
            tensors = load_file(str(file))
        except FileNotFoundError:
            raise DataError(f"{file}: missing (a cache written with --hidden keeps the teacher's head there)") from None
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise DataError(f"{file}: unreadable ({e}); the cache is damaged, rewrite it") from None
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if weight is None or weight.shape != (self.manifest["vocab"], self.manifest["hidden_size"]):
            raise DataError(f"{file}: no head of shape [{self.manifest['vocab']}, {self.manifest['hidden_size']}] "
                            "as the manifest says")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise TeacherOutputError(f"{file}: the head's {name} holds non-finite values")
        return weight, bias

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
            size += sum((folder / f"{a}.npy").stat().st_size
                        for a in ("topk_packed", "topk_ids", "topk_logprobs", "tail", "hidden")
                        if (folder / f"{a}.npy").exists())
        return size / max(rows, 1)
