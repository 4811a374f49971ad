"""The ``gequiv-timm`` command. It only wires things together: parse the command line, then call library functions
with plain arguments.

Each subcommand is a module ``gequiv_timm.cli.<name>`` (listed in :data:`COMMANDS`) that provides
``add_arguments(parser)`` and ``run(args) -> int``; the first line of its docstring is the subcommand's help.
argparse is used here and nowhere else in the package.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

__all__ = ['COMMANDS', 'build_parser', 'main']

# command name -> module providing add_arguments(parser) and run(args) -> int
COMMANDS = {
    'list': 'gequiv_timm.cli.list',
    'compare': 'gequiv_timm.cli.compare',
    'train': 'gequiv_timm.cli.train',
    'export': 'gequiv_timm.cli.export',
    'push': 'gequiv_timm.cli.push',
    'check': 'gequiv_timm.cli.check',
    'stn-viz': 'gequiv_timm.cli.stn_viz',
}


def _help(module) -> str:
    doc = (module.__doc__ or '').strip()
    return doc.splitlines()[0].rstrip('.') if doc else ''


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='gequiv-timm', description='Geometric deep learning for timm.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, path in COMMANDS.items():
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            p = sub.add_parser(name)
            p.set_defaults(_unavailable=f"'gequiv-timm {name}' is not available in this installation: {e}")
        else:
            p = sub.add_parser(name, help=_help(module), description=_help(module))
            module.add_arguments(p)
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
    import gequiv_timm  # noqa: F401  (registers the models)
    try:
        return int(importlib.import_module(COMMANDS[args._command]).run(args) or 0)
    except KeyboardInterrupt:
        print('gequiv-timm: interrupted', file=sys.stderr)
        return 130
