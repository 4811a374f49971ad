"""The metrics log of a training run: CSV or JSON lines, append-only, truncated to the checkpoint on resume."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List

__all__ = ['LOG_FIELDS', 'MetricsLog']

LOG_FIELDS = ('kind', 'step', 'epoch', 'loss', 'lr', 'train_error', 'train_nme', 'train_dice', 'eval_error',
              'eval_nme', 'eval_dice', 'eval_auc', 'eval_accuracy', 'eval_loss', 'seconds')


class MetricsLog:
    """Append-only metrics log, CSV (``.csv``) or JSON lines (anything else). On resume, rows written after the
    checkpoint step are dropped first, so the log reads like one uninterrupted run."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.csv = self.path is not None and self.path.suffix.lower() == '.csv'

    def _read(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        if self.csv:
            with open(self.path, newline='') as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in self._read() if int(float(r.get('step') or 0)) <= step]
        self.path.unlink()
        for r in rows:
            self.write({k: v for k, v in r.items() if v not in ('', None)})

    def write(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.csv:
            with open(self.path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            return
        new = not self.path.exists()
        with open(self.path, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS, restval='', extrasaction='ignore')
            if new:
                w.writeheader()
            w.writerow(rec)
