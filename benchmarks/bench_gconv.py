"""Issue 2 benchmarks: P4ConvP4 against the plain-conv floor, and gequiv_p4cnn against a planar CNN of the
same expanded width. Everything side by side in one run; ratios only (the machine is shared and noisy).

Run: .venv/bin/python benchmarks/bench_gconv.py [--threads 2] [--out benchmarks/results/gconv.md]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, verdict  # noqa: E402

import timm  # noqa: E402
import gequiv_timm  # noqa: E402,F401
from gequiv_timm.layers import P4ConvP4, export_group_convs  # noqa: E402
from gequiv_timm.measure import time_round_robin  # noqa: E402


def layer_bench(repeats):
    torch.manual_seed(0)
    conv = P4ConvP4(16, 16, 3, padding=1)
    x = torch.randn(32, 16, 4, 32, 32)
    w = conv.expanded_weight().detach().clone().requires_grad_(True)
    b = torch.zeros(64, requires_grad=True)
    xf = x.flatten(1, 2)

    def ours_train():
        conv.zero_grad(set_to_none=True)
        conv(x).sum().backward()

    def floor_train():
        w.grad = None
        F.conv2d(xf, w, b, 1, 1).sum().backward()

    conv.train()
    t = time_round_robin({'ours': ours_train, 'floor': floor_train}, reps=repeats, warmup=5)
    res = {'layer_train_ratio': t['ours'] / t['floor']}
    conv.eval()
    wd, bd = w.detach(), b.detach()

    def ours_eval():
        with torch.no_grad():
            conv(x)

    def floor_eval():
        with torch.no_grad():
            F.conv2d(xf, wd, bd, 1, 1)

    t = time_round_robin({'ours': ours_eval, 'floor': floor_eval}, reps=repeats, warmup=5)
    res['layer_eval_ratio'] = t['ours'] / t['floor']

    # batch 1, eval: the layer expands its bank from the current weights on every call (no cache since issue 13);
    # "cached" is what the removed eval cache served (the same input check, then conv2d with a bank made once);
    # "export" is the plain nn.Conv2d from export(), the inference speed path.
    x1 = torch.randn(1, 16, 4, 32, 32)
    x1f = x1.flatten(1, 2)
    bank, bias = conv.expanded_weight().detach(), conv.expanded_bias().detach()
    plain = conv.export().eval()
    from gequiv_timm.layers import check_group_input

    def ours_b1():
        with torch.no_grad():
            conv(x1)

    def cached_b1():
        with torch.no_grad():
            check_group_input(x1, 16, 4, 'P4ConvP4', 1)
            F.conv2d(x1f, bank, bias, 1, 1).unflatten(1, (16, 4))

    def export_b1():
        with torch.no_grad():
            plain(x1f)

    t = time_round_robin({'ours': ours_b1, 'cached': cached_b1, 'export': export_b1}, reps=repeats * 5, inner=10,
                         warmup=5)
    res['layer_b1_eval_ratio_vs_old_cache'] = t['ours'] / t['cached']
    res['layer_b1_eval_ratio_vs_export'] = t['ours'] / t['export']
    return res


class PlanarCNN(nn.Module):
    """The P4CNN layout with plain convolutions of the same expanded width (40 channels)."""

    def __init__(self, width=40, depth=7, num_classes=10):
        super().__init__()
        layers, prev = [], 1
        for i in range(depth):
            layers += [nn.Conv2d(prev, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def model_bench(repeats):
    torch.manual_seed(0)
    ours = timm.create_model('gequiv_p4cnn')
    ref = PlanarCNN()
    res = {}
    x1 = torch.randn(1, 1, 28, 28)
    ours.eval(), ref.eval()

    def run(m, x):
        def f():
            with torch.no_grad():
                m(x)
        return f

    fast = export_group_convs(ours)  # the inference path: frozen plain convs, no filter expansion
    t = time_round_robin({'ours': run(ours, x1), 'ours_exported': run(fast, x1), 'ref': run(ref, x1)},
                         reps=repeats * 5, inner=5, warmup=5)
    res['model_b1_eval_ratio'] = t['ours'] / t['ref']
    res['model_b1_eval_exported_ratio'] = t['ours_exported'] / t['ref']
    x64 = torch.randn(64, 1, 28, 28)
    y64 = torch.randint(0, 10, (64,))
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01)
    ours.train(), ref.train()

    def step(m, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x64), y64).backward()
            opt.step()
        return f

    t = time_round_robin({'ours': step(ours, opt_o), 'ref': step(ref, opt_r)}, reps=repeats, warmup=5)
    res['model_b64_train_ratio'] = t['ours'] / t['ref']
    res['params_ours'] = sum(p.numel() for p in ours.parameters())
    res['params_planar_same_width'] = sum(p.numel() for p in ref.parameters())
    return res


TARGETS = {'layer_train_ratio': 1.05, 'layer_eval_ratio': 1.02, 'layer_b1_eval_ratio_vs_old_cache': 1.10,
           'layer_b1_eval_ratio_vs_export': 1.10, 'model_b1_eval_ratio': 1.15, 'model_b1_eval_exported_ratio': 1.15,
           'model_b64_train_ratio': 1.05}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=30)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {**layer_bench(args.repeats), **model_bench(args.repeats)}
    lines = [f"# gconv benchmark (torch {torch.__version__}, {args.threads} threads, medians of {args.repeats} "
             f"interleaved rounds)", '', '| measure | ratio ours / floor | target | |', '|---|---|---|---|']
    for k, tgt in TARGETS.items():
        lines.append(f"| {k} | {res[k]:.3f} | <= {tgt} | {verdict(res[k], tgt)} |")
    lines.append('')
    lines.append(f"parameters: gequiv_p4cnn {res['params_ours']:,}; planar CNN of the same expanded width "
                 f"{res['params_planar_same_width']:,}")
    report('\n'.join(lines), res, args.out)


if __name__ == '__main__':
    main()
