"""How every benchmark here times things, so that a figure holds when someone else runs it.

- All variants run in one process, interleaved: repetition r runs them in an order rotated by r, so a slow
  phase of the machine (another job, thermal throttling, a page-cache flush) hits every variant alike.
- One untimed warm-up run of each variant first (imports, allocator, caches), then `reps` ≥ 3 timed runs.
- Ratios are taken per repetition (variant ÷ baseline of the same repetition) and reported as min / median /
  max, next to each variant's own min / median / max time.
- The 1-minute load average is read when the benchmark starts (`start_load()`: it must be below `QUIET_LOAD`,
  nothing else running) and before and after every timed group (then it holds the benchmark's own work: it
  must stay below its threads + `QUIET_LOAD`). Otherwise the machine was shared: `Timing.quiet` is False, the
  figures are printed with a warning, and the benchmarks write their CSV only with `--shared-ok`.

    timing = interleaved({"ours": lambda: f(x), "plain": lambda: g(x)}, reps=5, threads=1)
    print(timing.table(baseline="plain"))
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QUIET_LOAD = 0.5


def load_average() -> float:
    return os.getloadavg()[0]



def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """'min / median / max' of repeated measurements (rates or seconds), each formatted with `fmt`."""
    v = sorted(values)
    return " / ".join(fmt.format(x) for x in (v[0], statistics.median(v), v[-1]))

_START_LOAD = [float("inf")]


def start_load(inherited: float | None = None) -> float:
    """Read (once) and remember the load average as the benchmark starts, before it does any work. A worker
    process that the benchmark started passes the benchmark's own start load as `inherited` (its own start
    would see the load of the workers before it)."""
    if inherited is not None:
        _START_LOAD[0] = inherited
    elif _START_LOAD[0] == float("inf"):
        _START_LOAD[0] = load_average()
    return _START_LOAD[0]


@dataclass
class Timing:
    seconds: dict[str, list[float]]  # variant -> one time per repetition, in repetition order
    load_before: float
    load_after: float
    threads: int
    last: dict[str, Any] = field(default_factory=dict)  # each variant's return value of its last run

    @property
    def quiet(self) -> bool:
        """Nothing but this benchmark ran: its start was idle and the load never exceeded its own threads."""
        limit = self.threads + QUIET_LOAD
        return _START_LOAD[0] <= QUIET_LOAD and self.load_before <= limit and self.load_after <= limit

    def ratios(self, variant: str, baseline: str) -> list[float]:
        """variant time ÷ baseline time, repetition by repetition (< 1: the variant is faster)."""
        return [v / b for v, b in zip(self.seconds[variant], self.seconds[baseline])]

    def summary(self, variant: str, baseline: str | None = None) -> dict[str, float]:
        t = self.seconds[variant]
        out = {"min_s": min(t), "median_s": statistics.median(t), "max_s": max(t)}
        if baseline is not None and baseline != variant:
            r = self.ratios(variant, baseline)
            out |= {"ratio_min": min(r), "ratio_median": statistics.median(r), "ratio_max": max(r)}
        return out

    def table(self, baseline: str | None = None, unit: str = "ms", scale: float = 1e3) -> str:
        lines = [f"{'variant':44} {'min':>9} {'median':>9} {'max':>9}  "
                 + (f"{'÷ ' + baseline + ' (min / median / max)':>34}" if baseline else "")]
        for name in self.seconds:
            s = self.summary(name, baseline)
            row = f"{name:44} {s['min_s'] * scale:9.2f} {s['median_s'] * scale:9.2f} {s['max_s'] * scale:9.2f}  "
            if "ratio_median" in s:
                row += f"{s['ratio_min']:10.2f} / {s['ratio_median']:.2f} / {s['ratio_max']:.2f}"
            lines.append(row)
        lines.append(f"({unit}; {len(next(iter(self.seconds.values())))} interleaved reps; load average "
                     f"{self.load_before:.2f} before, {self.load_after:.2f} after"
                     + ("" if self.quiet else f" — SHARED MACHINE (load {_START_LOAD[0]:.2f} at the start): "
                        "these figures are not figures") + ")")
        return "\n".join(lines)


def interleaved(variants: dict[str, Callable[[], Any]], reps: int = 5, threads: int = 1,
                warmup: int = 1) -> Timing:
    """Time `variants` in one process: `warmup` untimed runs each, then `reps` repetitions in rotating order."""
    if reps < 3:
        raise ValueError("at least 3 repetitions: a single run is not a figure")
    names = list(variants)
    start_load()
    load_before = load_average()
    last: dict[str, Any] = {}
    for name in names:
        for _ in range(warmup):
            last[name] = variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start = time.perf_counter()
            last[name] = variants[name]()
            seconds[name].append(time.perf_counter() - start)
    return Timing(seconds, load_before, load_average(), threads, last)


def may_write(timing: Timing, shared_ok: bool) -> bool:
    """Whether a benchmark may write its figures: on a quiet machine, or when told the machine was shared."""
    if timing.quiet:
        return True
    print(f"not writing the results: the machine was shared (load average {_START_LOAD[0]:.2f} at the start, "
          f"{timing.load_before:.2f} before and {timing.load_after:.2f} after a timed group, with "
          f"{timing.threads} threads of our own); rerun on a quiet machine or pass --shared-ok")
    return shared_ok
