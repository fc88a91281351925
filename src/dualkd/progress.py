"""Plain progress lines for long jobs whose output goes to a log file (a terminal gets rich's bars instead)."""

from __future__ import annotations

import sys
import time

from rich.console import Console


class ProgressLines:
    """Plain progress lines on stderr about every 10%, for long jobs (generation, teacher caching, tokenization)
    whose output goes to a log file rather than a terminal (`show=None` and no terminal); quiet for jobs under
    10 seconds."""

    def __init__(self, total: int, label: str, show: bool | None):
        self.on = show is None and not Console(stderr=True).is_terminal and total >= 64
        self.total, self.label, self.done, self.next = total, label, 0, 0
        self.start = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if not self.on or (self.done < self.next and self.done < self.total):
            return
        elapsed = time.perf_counter() - self.start
        if elapsed < 10.0:
            return
        self.next = self.done + max(self.total // 10, 1)
        left = elapsed / self.done * (self.total - self.done)
        print(f"[dualkd] {self.label}: {self.done}/{self.total} ({elapsed:.0f} s, about {left:.0f} s left)",
              file=sys.stderr, flush=True)
