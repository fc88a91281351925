"""What a run must keep to be resumed: its resume key, and the check that refuses a changed one.

A checkpoint stores the key of the run that wrote it: every setting that changes what training computes,
flattened to dotted names (`optimization.lr`, `objective.temperature`, `teacher.weights`, ...), plus the global
batch and the identity of every model's weights. Resuming with another key is refused with a table of
old -> new values; `dualkd train --resume-with-changes` accepts the changes and logs each one as an event.

Left out on purpose (they change how, not what): the split of the global batch into micro-batches, gradient
accumulation and processes (8 x 1 and 2 x 4 make the same update), teacher placement, gradient
checkpointing, the attention kernel, generation backends and batch sizes, logging, evaluation, checkpoints,
and where a served teacher is and how it is asked (url, timeout, retries, concurrency, its request cache):
the served model itself is keyed by content (`teacher.identity`, added by the loop once the teacher is up).

Weights identity: a hash of each weight file's name, size, first 64 KiB (the safetensors header: names,
shapes, dtypes) and 16 evenly spaced 64 KiB blocks: reading ~1 MiB per file notices a fine-tuned copy of
the same architecture without hashing gigabytes. A hub id (no local folder) is identified by id + revision.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dualkd.config import ModelConfig, RunConfig
from dualkd.errors import ConfigError

KEY_VERSION = 4  # 4: `teacher.kind`; 3: `source` keys per kind, `teacher.cache` (an older key is compared on the
# names both have)
_HOW_NOT_WHAT = {"placement", "gradient_checkpointing", "attn_implementation", "micro_batch_size", "grad_accum",
                 "micro_batch_tokens",
                 # where and how a served teacher is asked (its model is in the key by content: teacher.identity)
                 "url", "timeout_s", "retries", "backoff_s", "concurrency", "cache_dir", "max_answer_mib",
                 "rollout_batch_size", "backend", "vllm_sync_every", "vllm_gpu_memory_utilization"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_BLOCK = 64 * 1024


def weights_identity(spec: ModelConfig) -> str:
    """A short fingerprint of the weights `spec` loads ("random" for random init, id@revision for a hub id)."""
    if spec.init == "random" and not spec.path:
        return "random"
    parts = [spec.path, spec.adapter] if spec.adapter else [spec.path]
    out = []
    for where in parts:
        folder = Path(where) if where else None
        if folder is None or not folder.exists():
            out.append(f"{where}@{spec.revision or 'main'}")
            continue
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        if spec.gguf_file:
            files = [folder / spec.gguf_file]
        out.append(fingerprint(files))
    return "+".join(out)


def fingerprint(files: list[Path]) -> str:
    """Names, sizes and sampled blocks of `files`, hashed (16 hex digits)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
        digest.update(_sample(f))
    return digest.hexdigest()[:16]


def _sample(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        chunks = [fh.read(_BLOCK)]
        for i in range(1, 17):
            fh.seek(max(0, size * i // 17 - _BLOCK // 2))
            chunks.append(fh.read(_BLOCK))
    return b"".join(chunks)


def resume_key(cfg: RunConfig, global_batch: int) -> dict[str, Any]:
    """The settings a resume must find unchanged, as {dotted name: JSON value}."""
    key: dict[str, Any] = {"key_version": KEY_VERSION, "seed": cfg.seed, "global_batch": global_batch}
    models: dict[str, ModelConfig | None] = {"student": cfg.student, "teacher": cfg.teacher,
                                              **{f"teachers.{k}": v for k, v in cfg.teachers.items()}}
    for name, spec in models.items():
        if spec is None:
            continue
        _flatten(name, spec.model_dump(mode="json"), key)
        key[f"{name}.weights"] = weights_identity(spec)
    for section in ("data", "objective", "optimization", "source"):
        _flatten(section, getattr(cfg, section).model_dump(mode="json"), key)
    if cfg.data.train.path and Path(cfg.data.train.path).is_file():  # the same name, other examples
        key["data.train.content"] = fingerprint([Path(cfg.data.train.path)])
    return key


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            if k not in _HOW_NOT_WHAT:
                _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, old, new) of every setting that differs. A checkpoint of an older key version is compared on the
    names both keys have."""
    if saved.get("key_version") != KEY_VERSION:  # the version itself is no setting
        names = [k for k in now if k in saved and k != "key_version"]
    else:
        names = sorted(set(saved) | set(now), key=lambda k: (k not in now, k))
    return [(k, saved.get(k), now.get(k)) for k in names if saved.get(k) != now.get(k)]


def change_table(found: list[tuple[str, Any, Any]]) -> str:
    width = max(len(k) for k, _, _ in found)
    return "\n".join(f"  {k:<{width}}  {_show(old)} -> {_show(new)}" for k, old, new in found)


def _show(value: Any) -> str:
    text = "(unset)" if value is None else repr(value)
    return text if len(text) <= 80 else text[:30] + "..." + text[-47:]  # a path's end names it


def check_resume(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path, accept: bool
                 ) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose settings changed, unless `accept`; returns the changes accepted."""
    found = changes(saved, now)
    if found and not accept:
        raise ConfigError(f"cannot resume from {checkpoint}: the run's settings changed (checkpoint -> now):\n"
                          f"{change_table(found)}\nrestore them, start a new output_dir, or pass "
                          "--resume-with-changes to continue with the new values (each change is logged)")
    return found
