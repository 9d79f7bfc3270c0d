"""The one timer of the benchmarks: median milliseconds of a call, after a warm-up that lets its time settle.

On CUDA it is ``triton.testing.do_bench`` (CUDA events, its own warm-up, median). On a CPU it runs
``fn`` untimed ``min_warmup`` times, then in windows of a few timed calls until two windows in a row agree
(their medians within ``settle``) or the warm-up budget is spent, and only then takes the timed samples: the
first calls of a backend (lazy initialisation, allocator growth, the first backward) can be 15-75x slower
than the rest, and a median over a handful of calls that includes them is not the steady time.

The timed CPU samples come in rounds of ``window`` calls and the result is the fastest round's median: on a
shared CPU, torch's worker threads fall into stretches of 10-40x slower calls whenever another process
takes a core (seen on the 2-core development machine: 0.5 ms calls turning into 8 ms for 100 ms at a time),
and one quiet round is the machine's steady time. CPU numbers check a setup; speed claims come from a GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """One measurement in milliseconds: ``ms`` the median (CUDA) or fastest round's median (CPU) of
    ``samples`` timed calls, ``min_ms`` the fastest call, ``warmup`` how many untimed calls ran before them
    (on CUDA do_bench warms up itself: 0)."""

    ms: float
    min_ms: float
    samples: int
    warmup: int

    @property
    def spread(self) -> float:
        """(median - fastest) / fastest: near 0 for a settled measurement."""
        return (self.ms - self.min_ms) / self.min_ms if self.min_ms > 0 else 0.0


def _cpu_once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    fn()
    return (clock() - t) * 1e3


def measure(
    fn: Callable[[], object],
    on_gpu: bool,
    budget_ms: float = 100.0,
    *,
    min_warmup: int = 2,
    window: int = 3,
    settle: float = 0.15,
    min_samples: int = 9,
    max_samples: int = 200,
    warmup_ms: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``fn()`` (no arguments; its result is ignored).

    Args:
        fn: the call to time, run many times.
        on_gpu: CUDA (``do_bench`` with ``budget_ms / 4`` warm-up and ``budget_ms`` of repeats) or CPU.
        budget_ms: CPU: time for the timed samples.
        min_warmup: CPU: untimed calls before the settling windows.
        settle: CPU: two consecutive windows whose medians differ by at most this fraction end the warm-up.
        window: CPU: calls per settling window and per timed round.
        min_samples, max_samples: CPU: bounds on the timed calls (``min_samples`` even past the budget).
        warmup_ms: CPU: the settling windows stop after this long even if unsettled
            (default ``max(4 * budget_ms, 200)``).
        clock: CPU: seconds of what is timed: wall time (``time.perf_counter``, the default), or
            ``time.process_time`` for this process's CPU time, which other processes on a shared machine do
            not inflate (with one torch thread it is the call's own compute time).
    """
    if on_gpu:
        from triton.testing import do_bench

        times = [float(t) for t in do_bench(fn, warmup=budget_ms / 4, rep=budget_ms, return_mode="all")]
        return Timing(ms=statistics.median(times), min_ms=min(times), samples=len(times), warmup=0)
    warm = 0
    for _ in range(min_warmup):
        fn()
        warm += 1
    deadline = time.perf_counter() + (warmup_ms if warmup_ms is not None else max(4 * budget_ms, 200)) / 1e3
    prev = None
    while True:
        cur = statistics.median(_cpu_once(fn, clock) for _ in range(window))
        warm += window
        if prev is not None and abs(cur - prev) <= settle * min(cur, prev):
            break
        if time.perf_counter() > deadline:
            break
        prev = cur
    rounds: list[list[float]] = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(rounds) * window < min_samples or (
        time.perf_counter() < deadline and len(rounds) * window < max_samples
    ):
        rounds.append([_cpu_once(fn, clock) for _ in range(window)])
    return Timing(
        ms=min(statistics.median(r) for r in rounds),
        min_ms=min(min(r) for r in rounds),
        samples=len(rounds) * window,
        warmup=warm,
    )


def median_ms(fn: Callable[[], object], on_gpu: bool, budget_ms: float = 100.0) -> float:
    """:func:`measure`'s median in milliseconds."""
    return measure(fn, on_gpu, budget_ms).ms
