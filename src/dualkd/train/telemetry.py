"""Per-step timings (where the time goes), throughput and peak memory."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StepTimer:
    """Wall time per section of an optimizer step: data, teacher, student (forward+backward), optimizer.
    Sections nest: time inside an inner section (a teacher pass inside the student's loss) is charged to the
    inner one only."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()
        self._open: list[list] = []  # [name, time the section last resumed]

    def start_step(self) -> None:
        self.seconds = defaultdict(float)
        self._start = time.perf_counter()

    def _charge_open(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # kernels are asynchronous; charge them to the right section
        now = time.perf_counter()
        if self._open:
            self.seconds[self._open[-1][0]] += now - self._open[-1][1]
        return now

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self._open.append([name, self._charge_open()])
        try:
            yield
        finally:
            now = self._charge_open()
            self._open.pop()
            if self._open:
                self._open[-1][1] = now

    def step_seconds(self) -> float:
        return time.perf_counter() - self._start

    def as_dict(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
