"""Stopping on SIGTERM/SIGINT: the first signal lets the loop checkpoint after the current step and stop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from dualkd.errors import DualKDError


class TrainingStopped(DualKDError):
    """Raised after a SIGTERM/SIGINT was handled by saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {checkpoint}; "
                         "continue with `dualkd train ... --resume`")
        self.signum = signum


class StopSignals:
    """First SIGTERM/SIGINT: remember it (the loop checkpoints and stops after the current step) and call
    `on_signal` (a served teacher stops waiting, so the step ends at once). A second one: the default
    behaviour (exit at once)."""

    def __init__(self, on_signal: Any = None) -> None:
        self.received: int | None = None
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for s, h in self._previous.items():
            signal.signal(s, h)
        if self._on_signal is not None:
            self._on_signal()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
