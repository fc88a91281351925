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
    """Wall time per section of an optimizer step: data, teacher, student (forward+backward), optimizer."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()

    def start_step(self) -> None:
        self.seconds = defaultdict(float)
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()  # kernels are asynchronous; charge them to the right section
            self.seconds[name] += time.perf_counter() - t0

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
