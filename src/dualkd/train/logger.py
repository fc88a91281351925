"""Where metrics go: `metrics.jsonl` (every step, every dev evaluation, every event), TensorBoard, console.

Each line of metrics.jsonl has `kind`: `train` (one per optimizer step), `dev`, or `event` (data skipped,
resumed, stopped, ...). On resume, records after the checkpoint's step are dropped first, so the file reads
as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        # soft_wrap: one record per line in logs (a pipe or file would otherwise get 80-column hard wraps)
        self.console = Console(stderr=True, quiet=not enabled, soft_wrap=True)
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _keep(line, resume_step)]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, kind: str, record: dict[str, Any], tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        line = {"kind": kind, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self.writer is not None and tensorboard and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, record["step"])

    def event(self, name: str, message: str, **fields: Any) -> None:
        self.write("event", {"event": name, "message": message, **fields}, tensorboard=False)
        self.console.print(f"[dualkd] {message}", highlight=False, markup=False)

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def _keep(line: str, resume_step: int) -> bool:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return False  # a line torn by a kill
    return rec.get("kind") == "event" or rec.get("step", 0) <= resume_step


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
