"""Layer level, side by side in one run: our ``P4ConvP4`` / ``P4MConvP4M`` against escnn's ``R2Conv`` on the same
fields (C4 / D4 regular fields, 3x3, padding 1) and against the plain-conv floor (one ``F.conv2d`` with a fixed,
already expanded filter bank of the same shape), in train mode (forward + backward, the filter bank is rebuilt
from the weights every call) and eval mode (no grad; both libraries cache the expanded filter), batch 1 and 32.

Ratios only (the machine is shared and noisy): medians of round-robin rounds whose order rotates every round
(:func:`gequiv_timm.measure.time_round_robin`).

Run: .venv/bin/python benchmarks/bench_layers_escnn.py [--fields 16] [--size 28] [--threads 1]
         [--out benchmarks/results/escnn_layers.md]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import layer_train_steps, report  # noqa: E402

from gequiv_timm.measure import time_round_robin  # noqa: E402
from gequiv_timm.layers import P4ConvP4, P4MConvP4M  # noqa: E402
from gequiv_timm.models.escnn_baselines import import_escnn  # noqa: E402

GROUPS = {'p4 / C4': (P4ConvP4, 'c4', 4), 'p4m / D4': (P4MConvP4M, 'd4', 8)}


def make_layers(group_key, fields):
    ours_cls, eg, order = GROUPS[group_key]
    gspaces, enn = import_escnn()
    gs = gspaces.rot2dOnR2(4) if eg == 'c4' else gspaces.flipRot2dOnR2(4)
    ft = enn.FieldType(gs, fields * [gs.regular_repr])
    torch.manual_seed(0)
    ours = ours_cls(fields, fields, 3, padding=1, bias=False)
    esc = enn.R2Conv(ft, ft, 3, padding=1, bias=False)
    w = ours.expanded_weight().detach().clone()
    return ours, esc, ft, w, order


def bench_group(group_key, fields, size, batches, repeats):
    ours, esc, ft, w, order = make_layers(group_key, fields)
    _, enn = import_escnn()
    out = {}
    for b in batches:
        torch.manual_seed(1)
        x5 = torch.randn(b, fields, order, size, size)
        xf = x5.flatten(1, 2)
        xg = enn.GeometricTensor(xf.clone(), ft)
        # ----- train: forward + backward through the filter construction
        t = time_round_robin(layer_train_steps(ours, esc, x5, ft), reps=repeats, inner=1 if b > 1 else 5)
        out[f'train b{b}'] = t
        # ----- eval: cached filters, no grad
        ours.eval()
        esc.eval()

        def ev(f):
            def g():
                with torch.no_grad():
                    f()
            return g

        t = time_round_robin({'ours': ev(lambda: ours(x5)), 'escnn': ev(lambda: esc(xg)),
                         'floor': ev(lambda: F.conv2d(xf, w, None, 1, 1))}, reps=repeats,
                        inner=1 if b > 1 else 10)
        out[f'eval b{b}'] = t
    params = {'ours': sum(p.numel() for p in ours.parameters()),
              'escnn': sum(p.numel() for p in esc.parameters()), 'floor': w.numel()}
    return out, params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--fields', type=int, default=16, help='regular fields in and out (channels = fields * |G|)')
    ap.add_argument('--size', type=int, default=28)
    ap.add_argument('--batches', default='1,32')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--out', default=None, help='write the markdown table here (and .json beside it)')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(',')]
    res = {}
    lines = [f"# Layers: ours vs escnn R2Conv vs plain-conv floor ({args.fields} regular fields in/out, 3x3, "
             f"padding 1, {args.size}x{args.size}; torch {torch.__version__}, {args.threads} thread(s), medians of "
             f"{args.repeats} interleaved rounds)", '',
             'Train = forward + backward (filter bank rebuilt from the weights each call); eval = no grad, cached '
             'filter bank. Floor = one `F.conv2d` with a fixed expanded filter bank of the same shape.', '',
             '| group | mode | ours (ms) | escnn (ms) | floor (ms) | ours / escnn | ours / floor | escnn / floor |',
             '|---|---|---|---|---|---|---|---|']
    for g in GROUPS:
        t, params = bench_group(g, args.fields, args.size, batches, args.repeats)
        res[g] = dict(times=t, params=params)
        for mode, v in t.items():
            lines.append(f"| {g} | {mode} | {1e3 * v['ours']:.3f} | {1e3 * v['escnn']:.3f} | {1e3 * v['floor']:.3f} | "
                         f"{v['ours'] / v['escnn']:.2f} | {v['ours'] / v['floor']:.2f} | "
                         f"{v['escnn'] / v['floor']:.2f} |")
    lines.append('')
    for g in GROUPS:
        p = res[g]['params']
        lines.append(f"- {g} parameters: ours {p['ours']:,} (free filters), escnn {p['escnn']:,} (band-limited "
                     f"steerable basis), expanded bank {p['floor']:,}")
    report('\n'.join(lines), dict(args=vars(args), results=res), args.out)
    return res


if __name__ == '__main__':
    main()
