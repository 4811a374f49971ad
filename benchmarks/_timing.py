"""Side-by-side timing helpers for the benchmarks: candidates are run interleaved (A B A B ...) in one process so
that the machine's noise hits them alike; we report medians and ratios, never absolute targets."""
from __future__ import annotations

import statistics
import time
import tracemalloc
from typing import Callable, Dict

import torch


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 5, inner: int = 1
                ) -> Dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            samples[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_cpu_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` on the CPU as seen by torch's profiler memory accounting."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, cur = 0, 0
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def verdict(ratio: float, target: float) -> str:
    return 'OK' if ratio <= target else 'MISS'
