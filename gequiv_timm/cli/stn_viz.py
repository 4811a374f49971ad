"""PNG of STN inputs, rectified outputs and grids.

``gequiv-timm stn-viz [--model NAME] [--checkpoint FILE] [--fit-epochs N] --out stn.png``
(:func:`gequiv_timm.viz.render_stn`).
"""
from __future__ import annotations

import argparse

from ._common import check_input_file, check_range
from ._errors import reports_errors

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='gequiv_stn_cnn_mnist', help='a registered STN model (gequiv_stn_*)')
    parser.add_argument('--checkpoint', default=None, help='safetensors weights to load (e.g. from gequiv-timm train)')
    parser.add_argument('--protocol', default='RTS', choices=['R', 'RTS', 'P', 'E'],
                        help='distorted-MNIST protocol of the test images (default RTS)')
    parser.add_argument('--num', type=int, default=8, help='number of test images (rows)')
    parser.add_argument('--grid', type=int, default=7, help='grid lines per side drawn on each input')
    parser.add_argument('--fit-epochs', type=int, default=0,
                        help='first train the model this many epochs on the protocol (AdamW, cosine; 0 = no)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='stn.png', help='PNG file to write')


@reports_errors('stn-viz')
def run(args) -> int:
    from ..outputs import check_output_file
    from ..viz import render_stn
    check_range('--num', args.num, args.num >= 1, 'at least 1 (images, one row each)')
    check_range('--grid', args.grid, 2 <= args.grid <= 64, 'in [2, 64] (grid lines per side)')
    check_range('--fit-epochs', args.fit_epochs, args.fit_epochs >= 0, '>= 0 (0: no fitting)')
    check_range('--seed', args.seed, 0 <= args.seed < 2 ** 31, 'in [0, 2**31)')
    check_output_file(args.out, '--out', suffix='.png')
    if args.checkpoint:
        check_input_file(args.checkpoint, '--checkpoint', 'weights file')
    path = render_stn(args.model, args.out, checkpoint=args.checkpoint, protocol=args.protocol, num=args.num,
                      grid=args.grid, fit_epochs=args.fit_epochs, seed=args.seed,
                      log=lambda msg: print(msg, flush=True))
    print(f"wrote {path}")
    return 0
