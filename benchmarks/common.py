"""What the benchmark scripts share besides the package's measurements (:mod:`gequiv_timm.measure`: round-robin
timing, MACs, train memory, peak resident memory): the target verdict and writing a result."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def verdict(ratio: float, target: float) -> str:
    """``'OK'`` when a measured ratio is at most its target, else ``'MISS'``."""
    return 'OK' if ratio <= target else 'MISS'


def report(text: str, results: Any, out: str | None = None) -> None:
    """Print the markdown ``text``; with ``out``, also write it there and ``results`` as JSON beside it."""
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + '\n')
        path.with_suffix('.json').write_text(json.dumps(results, indent=1) + '\n')
