"""PNG of STN inputs, rectified outputs and grids.

``gequiv-timm stn-viz [--model NAME] [--checkpoint FILE] [--fit-epochs N] --out stn.png``
(:func:`gequiv_timm.viz.render_stn`).
"""
from __future__ import annotations

import argparse

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


def run(args) -> int:
    from ..viz import StnVizError, render_stn
    try:
        path = render_stn(args.model, args.out, checkpoint=args.checkpoint, protocol=args.protocol, num=args.num,
                          grid=args.grid, fit_epochs=args.fit_epochs, seed=args.seed,
                          log=lambda msg: print(msg, flush=True))
    except StnVizError as e:
        print(f"stn-viz: {e}")
        return 2
    print(f"wrote {path}")
    return 0
