"""The ``gequiv-timm`` command. It only wires things together: parse the command line, then call library functions
with plain arguments.

Each subcommand is a module ``gequiv_timm.cli.<name>`` (listed in :data:`COMMANDS`) that provides
``add_arguments(parser)`` and ``run(args) -> int``; the first line of its docstring is the subcommand's help.
argparse is used here and nowhere else in the package.

Errors: a subcommand checks its arguments, its inputs and its output locations before any work and raises the
library's own error types; its ``run`` is wrapped by :func:`gequiv_timm.cli._errors.reports_errors`, which turns
every user-facing error (:data:`~gequiv_timm.cli._errors.USER_ERRORS`, plus any exception class defined in
gequiv_timm) into one line on standard error, ``gequiv-timm COMMAND: what is wrong; what to do``, and an exit
code, never a traceback (:func:`main` does the same for anything raised outside ``run``):

* 2: the command was refused (bad arguments, a missing or unreadable input, an unwritable output, a missing
  extra); argparse's own usage errors are one line and exit 2 as well;
* 1: the command ran and failed (a checksum or a verification did not match, the upload failed, the training
  loss diverged; ``check`` and ``list --measure`` also exit 1 when a check fails);
* 130: interrupted (Ctrl-C).

``gequiv-timm --debug COMMAND ...`` (or ``--debug`` after the command) re-raises instead, to show the traceback.
Any other exception (a bug) is not caught and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, NoReturn, Optional

from ._errors import report_error

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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``gequiv-timm train: argument --lr: ... (see ...)``), and an empty
    value for an option whose default is not empty (``--checkpoint ''``, ``--data ''``) refused as a usage error
    rather than read as "not given" (or as the current folder)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        for a in self._actions:
            if a.option_strings and a.nargs in (None, '?') and a.default != '' and \
                    getattr(ns, a.dest, None) == '' and a.type in (None, str):
                self.error(f"argument {'/'.join(a.option_strings)}: an empty value; give one or leave the option "
                           f"out")
        return ns, extra


def _help(module) -> str:
    doc = (module.__doc__ or '').strip()
    return doc.splitlines()[0].rstrip('.') if doc else ''


def _add_debug(p: argparse.ArgumentParser, default) -> None:
    p.add_argument('--debug', action='store_true', default=default,
                   help='on an error, show the full traceback instead of one line')


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='gequiv-timm', description='Geometric deep learning for timm.')
    _add_debug(parser, False)
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
        _add_debug(p, argparse.SUPPRESS)  # SUPPRESS: a --debug before the command is kept
        p.set_defaults(_command=name)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed by _Parser.error)
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    if not getattr(args, '_command', None):
        parser.print_help()
        return 2
    if getattr(args, '_unavailable', None):
        print(f"gequiv-timm: {args._unavailable}", file=sys.stderr)
        return 2
    cmd = args._command
    try:
        import gequiv_timm  # noqa: F401  (registers the models)
        return int(importlib.import_module(COMMANDS[cmd]).run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print('gequiv-timm: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # a user error raised outside a subcommand's run() (each run() reports its own)
        return report_error(cmd, e, args)
