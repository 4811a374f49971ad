"""The ``gequiv-timm`` command. It only wires things together: each subcommand lives in its own module, which
provides ``add_arguments(parser)`` and ``run(args) -> int`` (or named variants, see ``COMMANDS``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, add_arguments function, run function, help)
COMMANDS = {
    'list': ('gequiv_timm.cli', '_add_list', '_run_list', 'list the registered models and their tags'),
    'compare': ('gequiv_timm.compare', 'add_arguments', 'run',
                'train and evaluate ours against escnn baselines on rotated MNIST; write table and plots'),
    'train': ('gequiv_timm.train', 'add_arguments', 'run', 'train or fine-tune a registered model'),
    'export': ('gequiv_timm.hub', 'add_export_arguments', 'run_export', 'write a model in the Hub layout'),
    'push': ('gequiv_timm.hub', 'add_push_arguments', 'run_push', 'export, verify and upload to the Hub'),
    'check': ('gequiv_timm.hub', 'add_check_arguments', 'run_check',
              'verify shipped weights against the manifest (sha256, metrics)'),
    'stn-viz': ('gequiv_timm.viz', 'add_arguments', 'run', 'PNG of STN inputs, rectified outputs and grids'),
}


def _add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument('pattern', nargs='?', default='gequiv_*', help="name filter (fnmatch), default 'gequiv_*'")
    p.add_argument('--pretrained', action='store_true', help='only models with pretrained tags')
    p.add_argument('--measure', action='store_true',
                   help='measure each listed model\'s symmetry now (float64; seconds per model) instead of showing '
                        'the stored table (registry/symmetry.json); exit 1 if a claim or description disagrees')
    p.add_argument('--write', action='store_true',
                   help='with --measure: store the measurements in registry/symmetry.json')


def _run_list(args) -> int:
    import time

    import timm

    from . import registry, symmetry
    if args.write and not args.measure:
        print("gequiv-timm list: --write stores measurements; add --measure", file=sys.stderr)
        return 2
    table = {} if args.measure else symmetry.load_table()
    measured, t0 = {}, time.perf_counter()
    names = timm.list_models(args.pattern, pretrained=args.pretrained)
    tagged = set(timm.list_models(args.pattern, pretrained=True))
    base_seen = []
    for n in timm.list_models(args.pattern):
        if n in base_seen:
            continue
        base_seen.append(n)
    man = registry.manifest()
    for n in base_seen:
        try:
            e = registry.get_entry(n)
        except KeyError:
            continue
        tags = [t for t in timm.list_pretrained(f'{n}.*') if t in tagged] if n in names or not args.pretrained \
            else []
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
            where = 'local' if m.get('file') else 'hub'
            metric = m.get('metrics', {})
            mtxt = ', '.join(f"{k}={v}" for k, v in metric.items() if not isinstance(v, (dict, list)))
            print(f"    .{t.split('.', 1)[1]:28s} [{where}] {mtxt}")
    if not args.measure:
        return 0
    print(f"measured {len(measured)} models in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    problems = symmetry.table_problems(measured, {n: registry.get_entry(n) for n in measured})
    for p in problems:
        print(f"gequiv-timm list: {p}", file=sys.stderr)
    if args.write and measured:
        print(f"wrote {symmetry.write_table(measured)}", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='gequiv-timm', description='Geometric deep learning for timm.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (mod, add, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            getattr(importlib.import_module(mod), add)(p)
        except (ImportError, AttributeError) as e:
            p.set_defaults(_unavailable=f"'gequiv-timm {name}' is not available in this installation: {e}")
        p.set_defaults(_command=name)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, '_command', None):
        parser.print_help()
        return 2
    if getattr(args, '_unavailable', None):
        print(f"gequiv-timm: {args._unavailable}", file=sys.stderr)
        return 2
    mod, _, run, _ = COMMANDS[args._command]
    import gequiv_timm  # noqa: F401  (registers the models)
    try:
        return int(getattr(importlib.import_module(mod), run)(args) or 0)
    except KeyboardInterrupt:
        print('gequiv-timm: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
