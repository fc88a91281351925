"""Output folders that a command replaces: it never deletes a folder it did not write.

A command that writes a whole folder (`prune --out`, `cache-teacher --out`, a model export) first `claim`s it:
a folder that does not exist, or is empty, is taken; one that this kind of command wrote earlier (it holds
the `MARK` file naming the kind, or is recognised otherwise, e.g. an older cache) is taken again; anything
else is refused with a message unless the user passed `--overwrite`. A folder that holds the command's
source (or is it) is refused even then: replacing it would destroy the input before it is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from dualkd.errors import ConfigError

MARK = ".dualkd-output.json"


def written_by(folder: Path) -> str | None:
    """The kind of output dualkd wrote into `folder` ("model", "teacher cache", ...), or None."""
    try:
        return str(json.loads((folder / MARK).read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(out: str | Path, kind: str, *, flag: str = "--out", overwrite: bool = False,
          source: str | Path | None = None, recognise: Callable[[Path], bool] | None = None) -> Path:
    """Check that the command may write the `kind` folder `out` (see the module docstring); returns it."""
    out = Path(out).expanduser()
    if source is not None:
        src, dst = Path(source).expanduser().resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise ConfigError(f"{flag} {out}: that folder holds the source {source}; writing there would destroy "
                              "it before it is read; choose another folder")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError(f"{flag} {out}: a file, not a folder")
    if overwrite or not any(out.iterdir()) or written_by(out) == kind or (recognise is not None and recognise(out)):
        return out
    found = written_by(out)
    what = f"dualkd's {found}" if found else "something dualkd did not write (no " + MARK + ")"
    raise ConfigError(f"{flag} {out}: the folder exists and holds {what}; choose a new folder, or pass "
                      f"--overwrite to replace its contents with the {kind}")


def mark(folder: Path, kind: str) -> None:
    """Record in `folder` that dualkd wrote it as a `kind` (so a later run of the same command may replace it)."""
    (folder / MARK).write_text(json.dumps({"kind": kind}) + "\n")
