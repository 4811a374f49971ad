"""Layer level, side by side in one run: our group convolution against escnn's ``R2Conv`` on the same regular fields
(p4 / C4 and p4m / D4 by default; any of our groups with ``--groups``, 3x3, padding 1, bias) and against the
plain-conv floor (one ``F.conv2d`` with our expanded filter bank and bias as fixed tensors), in train mode (an inner
layer's step: forward, and backward to the weights and the input with a dense upstream gradient; the filter bank is
rebuilt from the weights every call by both libraries) and eval mode (no grad; escnn caches its expanded filter,
ours reuses its bank while the weights hold the same bits), at batch 1 and 32. The callables are
:func:`common.layer_step_fns`, shared with ``bench_gconv.py``.

Ratios only (the machine is shared and noisy): medians of shuffled rounds (:func:`common.shuffled_round_robin`),
wall time and process CPU time.

Run: .venv/bin/python benchmarks/bench_layers_escnn.py [--groups p4,p4m] [--fields 16] [--size 28] [--threads 1]
         [--device cpu] [--out benchmarks/results/escnn_layers.md]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_device_arg, device_label, layer_step_fns, report, resolve_device, shuffled_round_robin, synced,
)

from gequiv_timm.layers import get_group  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--groups', default='p4,p4m')
    ap.add_argument('--fields', type=int, default=16, help='regular fields in and out (channels = fields * |G|)')
    ap.add_argument('--size', type=int, default=28)
    ap.add_argument('--batches', default='1,32')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=15)
    add_device_arg(ap)
    ap.add_argument('--out', default=None, help='write the markdown table here (and .json beside it)')
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(',')]
    cpu_col = dev.type == 'cpu'
    lines = [f"# Layers: ours vs escnn R2Conv vs plain-conv floor ({args.fields} regular fields in/out, 3x3, "
             f"padding 1, bias, {args.size}x{args.size}; {device_label(dev, args.threads)}, torch {torch.__version__}, "
             f"medians of {args.repeats} shuffled rounds)", '',
             'Train = an inner layer\'s step (forward, backward to the weights and the input, dense upstream gradient; '
             'filter bank rebuilt from the weights each call); eval = no grad. Floor = one `F.conv2d` with our '
             'expanded bank as a fixed tensor.' + (' Process CPU-time ratios in brackets.' if cpu_col else ''), '',
             '| group | mode | ours (ms) | escnn (ms) | floor (ms) | ours / escnn | ours / floor | escnn / floor |',
             '|---|---|---|---|---|---|---|---|']
    res = {}
    for g in args.groups.split(','):
        res[g] = {}
        for mode in ('train', 'eval'):
            for b in batches:
                fns = synced(layer_step_fns(g, args.fields, b, args.size, mode, dev), dev)
                inner = 10 if b == 1 else 1
                wall, cpu = shuffled_round_robin(fns, reps=args.repeats, seed=b, inner=inner)
                res[g][f'{mode} b{b}'] = {'wall': wall, 'cpu': cpu}

                def r(a, c):
                    return f"{wall[a] / wall[c]:.2f}" + (f" ({cpu[a] / cpu[c]:.2f})" if cpu_col else '')
                lines.append(f"| {g} ({get_group(g).order}) | {mode} b{b} | {1e3 * wall['ours']:.3f} | "
                             f"{1e3 * wall['escnn']:.3f} | {1e3 * wall['floor']:.3f} | {r('ours', 'escnn')} | "
                             f"{r('ours', 'floor')} | {r('escnn', 'floor')} |")
                print(lines[-1], flush=True)
    report('\n'.join(lines), dict(args=vars(args), device=device_label(dev, args.threads), results=res), args.out)
    return res


if __name__ == '__main__':
    main()
