"""Writing a file so that a reader (or a run killed mid-write) sees the old content or the new, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """A file to write (`w`: UTF-8 text, `wb`: bytes) that appears at `path` only when the block ends without
    an error: it is written beside it under a temporary name, then renamed over it. `fsync`: the bytes are on
    disk before the rename (files a crash must not leave empty: manifests, checkpoint state)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open(mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> None:
    """Write `text` (UTF-8) to `path` atomically (`atomic_open`)."""
    with atomic_open(path, "w", fsync) as f:
        f.write(text)


def fsync_tree(path: Path) -> None:
    """fsync every file under a folder, then the folder (before renaming it into place)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def readable_by_umask(path: Path) -> None:
    """Give every file and folder under `path` the modes a plain `open` would (0644/0755 under umask 022):
    safetensors writes 0600, which hides exported models and checkpoints from the rest of a group."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put the finished folder `tmp` at `final` (replacing an older one)."""
    readable_by_umask(tmp)
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
