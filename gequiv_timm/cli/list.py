"""List the registered models and their tags.

``gequiv-timm list [PATTERN] [--pretrained] [--measure [--write]]``: each model's summary, its measured symmetry
(the stored table, or measured now) and its pretrained tags with where the weights are and their metrics.
"""
from __future__ import annotations

import argparse
import sys

from ._errors import reports_errors

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('pattern', nargs='?', default='gequiv_*', help="name filter (fnmatch), default 'gequiv_*'")
    p.add_argument('--pretrained', action='store_true', help='only models with pretrained tags')
    p.add_argument('--measure', action='store_true',
                   help='measure each listed model\'s symmetry now (float64; seconds per model) instead of showing '
                        'the stored table (registry/symmetry.json); exit 1 if a claim or description disagrees')
    p.add_argument('--write', action='store_true',
                   help='with --measure: store the measurements in registry/symmetry.json')


@reports_errors('list')
def run(args) -> int:
    import time

    import timm

    from .. import registry, symmetry
    if args.write and not args.measure:
        print("gequiv-timm list: --write stores measurements; add --measure", file=sys.stderr)
        return 2
    table = {} if args.measure else symmetry.load_table()
    measured, t0 = {}, time.perf_counter()
    broken = registry.manifest_problem()  # a broken manifest: list the models anyway, say so, exit 1
    if broken:
        print(f"gequiv-timm list: {broken}; tags are listed without their files and metrics", file=sys.stderr)
    man = registry.manifest(strict=False)
    for n in timm.list_models(args.pattern):
        try:
            e = registry.get_entry(n)
        except KeyError:
            continue
        tags = timm.list_pretrained(f'{n}.*')
        if args.pretrained and not tags:
            continue
        missing = e.missing_extras()
        note = f"  (needs extra: {','.join(missing)})" if missing else ''
        print(f"{n:32s} {e.summary}{note}")
        rep = table.get(n)
        if args.measure and not missing:
            rep = measured[n] = symmetry.measure_symmetry(n)
        sym = symmetry.format_report(rep) if rep else (
            "not measured" + ('' if args.measure else " (gequiv-timm list --measure --write)"))
        print(f"    symmetry: {sym}")
        for t in tags:
            m = man.get(t, {})
            where = 'manifest broken' if broken else 'local' if m.get('file') else 'hub'
            metric = m.get('metrics', {})
            mtxt = ', '.join(f"{k}={v}" for k, v in metric.items() if not isinstance(v, (dict, list)))
            print(f"    .{t.split('.', 1)[1]:28s} [{where}] {mtxt}")
    if not args.measure:
        return 1 if broken else 0
    print(f"measured {len(measured)} models in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    problems = symmetry.table_problems(measured, {n: registry.get_entry(n) for n in measured})
    for p in problems:
        print(f"gequiv-timm list: {p}", file=sys.stderr)
    if args.write and measured:
        print(f"wrote {symmetry.write_table(measured)}", file=sys.stderr)
    return 1 if problems or broken else 0
