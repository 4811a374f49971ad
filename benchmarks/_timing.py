"""Side-by-side timing helpers for the benchmarks: candidates are run interleaved (A B, B A, ...) in one process so
that the machine's noise hits them alike; we report medians and ratios, never absolute targets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from gequiv_timm.compare import time_round_robin


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 5, inner: int = 1
                ) -> Dict[str, float]:
    """Median seconds per call of each function, timed in rounds whose order rotates every round: the package's
    :func:`gequiv_timm.compare.time_round_robin` (one implementation for ``gequiv-timm compare`` and the
    benchmarks), under the benchmarks' historical argument names."""
    return time_round_robin(fns, reps=repeats, warmup=warmup, inner=inner)


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


def report(text: str, results: Any, out: Optional[str] = None) -> None:
    """Print the markdown ``text``; with ``out``, also write it there and ``results`` as JSON beside it."""
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + '\n')
        path.with_suffix('.json').write_text(json.dumps(results, indent=1) + '\n')
