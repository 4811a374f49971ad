"""Train and evaluate ours against escnn baselines on rotated MNIST; write table and plots.

``gequiv-timm compare [--models ...] [--budget N] [--seeds N] [--out DIR] ...``: parses the options into a
:class:`gequiv_timm.compare.CompareConfig` and runs :func:`gequiv_timm.compare.run_comparison`, which says what it
measures; prints the markdown table; exit code 2 on a user-facing problem (one line on standard error, checked before
any work).
"""
from __future__ import annotations

import argparse

from ..compare import (
    CORE_MODELS,
    DEFAULT_BUDGET,
    ESCNN_MODELS,
    EXTENDED_MODELS,
    REFERENCE,
    CompareConfig,
    run_comparison,
)
from ._errors import reports_errors

__all__ = ['add_arguments', 'config_from_args', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--models', default=None,
                   help='comma-separated model names, or "all" (default: ' + ','.join(CORE_MODELS + ESCNN_MODELS) +
                        '; "all" adds ' + ','.join(EXTENDED_MODELS) +
                        ', about twice the time). '
                        f'{REFERENCE} is always added: the time ratios are relative to it')
    p.add_argument('--budget', type=int, default=DEFAULT_BUDGET,
                   help=f'training epochs per model and protocol, the same for every model (default '
                        f'{DEFAULT_BUDGET}). The run logs its own estimate after timing and reports its wall clock '
                        f'and CPU time')
    p.add_argument('--seed', type=int, default=0, help='first seed: data split, rotations, init, data order')
    p.add_argument('--seeds', type=int, default=1, help='repeat the whole comparison with N seeds (mean +- std)')
    p.add_argument('--out', default='gequiv-compare', help='output directory (created if missing)')
    p.add_argument('--name', default='compare',
                   help="file name stem of the outputs: NAME.md, NAME.json, NAME_*.png (default 'compare')")
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--protocols', default='rotated,upright',
                   help="which protocols to train: 'rotated', 'upright' or both (default both)")
    p.add_argument('--sweep-digits', type=int, default=250,
                   help='test digits used for the accuracy-vs-angle sweep (default 250 of the 1,000, evenly spread)')
    p.add_argument('--train-digits', type=int, default=0,
                   help='train on only the first N of the 4,000 train digits (smoke tests; default all)')
    p.add_argument('--timing-reps', type=int, default=10, help='timed rounds for step time and latency')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads per process (default 1). A seeded run repeats bit for bit with the same '
                        'thread count on the same machine; another thread count gives other numbers')
    p.add_argument('--workers', type=int, default=0,
                   help='training processes run side by side, one job (model, protocol, seed) at a time each '
                        '(default 0: one per CPU this process may use). The numbers do not depend on it')
    p.add_argument('--no-plots', action='store_true', help='skip the PNG plots (no matplotlib needed)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The parsed options as the library's plain configuration."""
    return CompareConfig(models=args.models, budget=args.budget, seed=args.seed, seeds=args.seeds, out=args.out,
                         name=args.name, batch_size=args.batch_size, lr=args.lr, protocols=args.protocols,
                         sweep_digits=args.sweep_digits, train_digits=args.train_digits,
                         timing_reps=args.timing_reps, threads=args.threads, workers=args.workers,
                         plots=not args.no_plots, progress=not args.no_progress)


@reports_errors('compare')
def run(args: argparse.Namespace) -> int:
    result = run_comparison(config_from_args(args))  # a CompareError is one line from gequiv_timm.cli.main, exit 2
    print(result.markdown)
    return 0
