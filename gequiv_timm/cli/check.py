"""Verify shipped weights against the manifest (sha256, metrics).

``gequiv-timm check [NAME.TAG ...] [--metrics] [--manifest FILE] [--write-cards]``: each entry's file against its
manifest entry (:func:`gequiv_timm.hub.check_entry`); ``--metrics`` also re-measures the metrics.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('names', nargs='*', help='NAME.TAG entries to check (default: every manifest entry)')
    p.add_argument('--metrics', action='store_true',
                   help='also re-measure each metric on the held-out split of the data set the recipe names')
    p.add_argument('--manifest', help='manifest JSON (default: the package weights/manifest.json)')
    p.add_argument('--write-cards', action='store_true',
                   help='(re)write weights/cards/NAME.TAG.md, the model cards of the shipped tags, then check')


def run(args) -> int:
    from .. import registry
    from ..hub import ChecksumError, WeightsError, check_entry, format_metric, write_cards
    man = registry.load_manifest(Path(args.manifest)) if args.manifest else registry.manifest()
    folder = Path(args.manifest).parent if args.manifest else None
    names = args.names or sorted(man)
    bad = 0
    if args.write_cards:
        if args.manifest:
            print("gequiv-timm check: --write-cards works on the package manifest only", file=sys.stderr)
            return 2
        for p in write_cards([n for n in names if n in man]):
            print(f"wrote {p}")
    for n in names:
        if n not in man:
            print(f"{n}: not in the manifest (entries: {sorted(man)})", file=sys.stderr)
            bad += 1
            continue
        try:
            res = check_entry(n, man[n], folder=folder, metrics=args.metrics)
        except (WeightsError, ChecksumError) as e:
            print(f"FAIL {n}: {e}", file=sys.stderr)
            bad += 1
            continue
        measured = ', '.join(f"{k}={format_metric(v)}" for k, v in res['measured'].items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool))
        print(f"ok   {n}: {res['file']}" + (f"  [{measured}]" if measured else ''))
    if not names:
        print("the manifest lists no checkpoints")
    return 1 if bad else 0
