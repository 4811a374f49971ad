"""Verify shipped weights against the manifest (sha256, metrics).

``gequiv-timm check [NAME.TAG ...] [--metrics] [--manifest FILE] [--write-cards]``: each entry's file against its
manifest entry (:func:`gequiv_timm.hub.check_entry`); ``--metrics`` also re-measures the metrics.

Exit codes (a CI gate can rely on them): 0 when every checked entry is intact; 1 when one is not (a wrong size or
sha256, a missing file, a name not in the manifest); 2 when the manifest itself is missing, unreadable or not a
manifest (an explicit ``--manifest`` path that does not exist is an error, and so is a missing package manifest:
the installation is incomplete). A valid but empty manifest checks nothing and exits 0, saying so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import check_input_file
from ._errors import reports_errors

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('names', nargs='*', help='NAME.TAG entries to check (default: every manifest entry)')
    p.add_argument('--metrics', action='store_true',
                   help='also re-measure each metric on the held-out split of the data set the recipe names')
    p.add_argument('--manifest', help='manifest JSON (default: the package weights/manifest.json)')
    p.add_argument('--write-cards', action='store_true',
                   help='(re)write weights/cards/NAME.TAG.md, the model cards of the shipped tags, then check')


def _manifest(args):
    """``(path, entries)`` of the manifest to check; ``ValueError`` (exit 2) when it is missing or unreadable."""
    from .. import registry
    from .._resources import weights_dir
    if args.manifest:
        path = check_input_file(args.manifest, '--manifest', 'manifest file')
    else:
        path = weights_dir() / 'manifest.json'
        if not path.is_file():
            raise ValueError(f"the package manifest {path} is missing: the installation is incomplete; reinstall "
                             f"gequiv_timm (or give --manifest FILE)")
    return path, registry.load_manifest(Path(path))


@reports_errors('check')
def run(args) -> int:
    from ..hub import ChecksumError, WeightsError, card_path, check_entry, format_metric, write_cards
    if args.write_cards and args.manifest:
        raise ValueError("--write-cards works on the package manifest only; leave out --manifest")
    path, man = _manifest(args)
    folder = Path(args.manifest).parent if args.manifest else None
    names = args.names or sorted(man)
    bad = 0
    if args.write_cards:
        from ..outputs import check_output_dir
        targets = [n for n in names if n in man]
        if targets:
            check_output_dir(card_path(targets[0]).parent, '--write-cards')
            for p in write_cards(targets):
                print(f"wrote {p}")
    for n in names:
        if n not in man:
            print(f"{n}: not in the manifest {path} (entries: {sorted(man)})", file=sys.stderr)
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
        print(f"the manifest {path} lists no checkpoints: nothing to check")
    return 1 if bad else 0
