"""Issue 16 layer benchmarks: C_N / D_N group convolutions beyond quarter turns.

1. **Filter basis** (``--part basis``): how equivariant a C8 layer is at 45 degrees with each way of rotating a
   sampled filter: our ``'harmonic'`` basis (``max_frequency`` 2 and 1), ``'bilinear'`` resampling of the pixel grid,
   a bicubic (Keys, a = -0.5) resampling written here for the comparison only, and a deliberately broken map
   (no rotation at all: the identity's filter at every element) as the scale of "not equivariant".
2. **Per layer** (``--part layers``): the error at the rotation ``2 pi / N`` (element 1) and the largest over all
   elements, for C_N and D_N with N in {8, 12, 16}: lifting and group convolutions (3x3 and 5x5), spatial max /
   average pooling, group batch norm, group pooling, and a small stack of them.
3. **Speed** (``--part speed``): a C8 layer (16 -> 16 regular fields, 3x3, padding 1, 32x32, batch 32, no bias)
   train step (forward + backward) against its expanded-conv floor (one ``F.conv2d`` with a fixed bank of the
   same shape) and against escnn's ``R2Conv`` on C8 with 16 regular fields (same number of weights: 12,288), side by
   side in one run (rounds of one call each, in a random order; wall and CPU time: :func:`shuffled_round_robin`),
   repeated ``--runs`` times; medians of the ratios.

How the error is measured (all float64, He-random weights, seeds 0..2, mean over seeds): inputs are random
band-limited fields (:class:`gequiv_timm.layers.RandomField`, wavelengths >= ``--wavelength`` pixels, batch 8 of
planar images or 2 of maps on the group, which carry ``|G|`` fields per channel)
sampled *exactly* at the rotated coordinates, and outputs are compared at the rotation centre, where rotating the
output moves no pixel (only the group axis is permuted), so no interpolation enters the figure. Figure: the relative
error ``max |f(g x) - g f(x)| / max |f(x)|`` of :func:`gequiv_timm.layers.checks.check_equivariance`.

Run: .venv/bin/python benchmarks/bench_cn.py [--part all] [--threads 2] [--runs 3] [--out benchmarks/results/cn.md]
"""
import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_device_arg, device_label, escnn_field_type, layer_step_fns, report, resolve_device, shuffled_round_robin,
    synced, verdict,
)

from gequiv_timm.layers import (  # noqa: E402
    GroupAvgPool2d, GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool, RandomField, centre, count_parameters,
    get_group,
)
from gequiv_timm.layers.checks import check_equivariance  # noqa: E402
from gequiv_timm.layers.filter_basis import expansion_map, rotation_maps  # noqa: E402

SEEDS = (0, 1, 2)


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------
def centre_error(f, group, in_shape, size, elements, wavelength, out_planar=False, seed=0):
    """Relative error of ``f`` at the elements, on exactly rotated band-limited fields, compared at the centre.
    ``in_shape`` is ``(B, C)`` for planar input, ``(B, C, |G|)`` for a map on the group."""
    g = get_group(group)
    field = RandomField(in_shape, (size, size), wavelength, seed=seed)
    planar_in = len(in_shape) == 2

    def act_out(y, e):
        return y if out_planar else y[..., g.permutation(e)]
    return check_equivariance(lambda t: centre(f(t)), field.sample(),
                              lambda t, e: field.sample(g, e, group_axis=not planar_in), act_out, elements)


def _keys_cubic(t):
    t = abs(t)
    a = -0.5
    if t < 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_rotation_maps(group, k):
    """[|G|, k*k, k*k]: the k x k grid resampled bicubically at R^-1 p (a candidate we measured and did not ship)."""
    g = get_group(group)
    c = (k - 1) / 2
    maps = []
    for h in range(g.order):
        m, r = g.decompose(h)
        q = (4 * r) // g.rotations
        rest = 2 * math.pi * r / g.rotations - q * math.pi / 2
        cs, sn = math.cos(rest), math.sin(rest)
        a = torch.zeros(k * k, k * k, dtype=torch.float64)
        for p in range(k * k):
            u, v = divmod(p, k)
            u, v = u - c, v - c
            su, sv = cs * u + sn * v + c, -sn * u + cs * v + c
            for i in range(k):
                for j in range(k):
                    a[p, i * k + j] = _keys_cubic(su - i) * _keys_cubic(sv - j)
        a = torch.rot90(a.view(k, k, -1), q, dims=(0, 1))
        if m:
            a = torch.flip(a, dims=(0,))
        maps.append(a.reshape(k * k, -1))
    return torch.stack(maps)


def with_map(conv, maps):
    """Give ``conv`` other rotation maps [|G|, k*k, nb] (for the comparison only)."""
    fmap, idx = expansion_map(conv.in_group, conv.out_group, conv.kernel_size, maps=maps)
    conv.filter_map, conv.filter_idx = fmap.to(conv.weight.dtype), idx
    return conv


def unrotated(conv):
    """The deliberately broken map: every element gets the identity's filter (the group axis is still permuted)."""
    maps = rotation_maps(conv.out_group, conv.kernel_size, conv.filter_basis, conv.max_frequency)
    return with_map(conv, maps[:1].expand_as(maps))


def make_pair(group, k, variant, seed, fields=8):
    torch.manual_seed(seed)
    basis, mf = {'harmonic': ('harmonic', None), 'harmonic, max_frequency=1': ('harmonic', 1),
                 'bilinear': ('bilinear', None), 'bicubic': ('bilinear', None),
                 'no rotation (broken)': ('harmonic', None)}[variant]
    lift = GroupConv2d(1, fields, k, 'z2', group, padding=k // 2, filter_basis=basis, max_frequency=mf).double()
    conv = GroupConv2d(fields, fields, k, group, group, padding=k // 2, filter_basis=basis,
                       max_frequency=mf).double()
    if variant == 'bicubic':
        maps = bicubic_rotation_maps(group, k)
        with_map(lift, maps)
        with_map(conv, maps)
    if variant.startswith('no rotation'):
        unrotated(lift)
        unrotated(conv)
    return lift, conv


def basis_part(wavelengths):
    variants = ['harmonic', 'harmonic, max_frequency=1', 'bilinear', 'bicubic', 'no rotation (broken)']
    rows, res = [], {}
    for k in (3, 5):
        size = 4 * (k // 2) + 5
        for variant in variants:
            vals = []
            for wl in wavelengths:
                lift_e, stack_e = [], []
                for s in SEEDS:
                    lift, conv = make_pair('c8', k, variant, s)
                    with torch.no_grad():
                        lift_e.append(centre_error(lift, 'c8', (8, 1), size, [1], wl, seed=s).relative)
                        stack_e.append(centre_error(lambda t, a=lift, b=conv: b(torch.relu(a(t))), 'c8', (8, 1), size,
                                                    [1], wl, seed=s).relative)
                vals += [statistics.mean(lift_e), statistics.mean(stack_e)]
                res[f'c8 k{k} {variant} wl{wl:g}'] = {'lift': vals[-2], 'stack': vals[-1]}
            nb = make_pair('c8', k, variant, 0)[0].weight.shape[-1] if 'harmonic' in variant or 'broken' in variant \
                else k * k
            rows.append(f"| {k}x{k} | {variant} | {nb} | " + ' | '.join(f"{v:.4f}" for v in vals) + ' |')
    head = ' | '.join(f"lift wl{w:g} | lift+ReLU+gconv wl{w:g}" for w in wavelengths)
    lines = ['## Filter basis: C8 at 45 degrees (relative error, mean of 3 seeds)', '',
             f"| kernel | basis | weights per filter | {head} |", '|---' * (3 + 2 * len(wavelengths)) + '|'] + rows
    return '\n'.join(lines), res


# ----------------------------------------------------------------------------------------------------------------
# per layer
# ----------------------------------------------------------------------------------------------------------------
def layer_cases(group):
    g = get_group(group)
    G = g.order

    def lift(k):
        return lambda: GroupConv2d(2, 6, k, 'z2', group, padding=k // 2).double(), (8, 2), 13, False

    def gconv(k):
        return lambda: GroupConv2d(6, 6, k, group, group, padding=k // 2).double(), (2, 6, G), 13, False

    def bn():
        m = GroupBatchNorm(6, group).double()
        with torch.no_grad():
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.normal_()
            m.bias.normal_()
        return m.eval()

    class Stack(nn.Module):
        def __init__(self, pool=GroupMaxPool2d):
            super().__init__()
            self.lift = GroupConv2d(1, 6, 3, 'z2', group, padding=1)
            self.bn = GroupBatchNorm(6, group)
            self.conv = GroupConv2d(6, 6, 3, group, group, padding=1)
            self.pool = pool(2, group=group)
            self.conv2 = GroupConv2d(6, 6, 3, group, group, padding=1)
            self.gpool = GroupPool(group, 'max')

        def forward(self, x):
            y = torch.relu(self.bn(self.lift(x)))
            y = self.pool(torch.relu(self.conv(y)))
            return self.gpool(self.conv2(y))

    return {
        'lift z2->G 3x3': lift(3),
        'lift z2->G 5x5': lift(5),
        'group conv G->G 3x3': gconv(3),
        'group conv G->G 5x5': gconv(5),
        'GroupMaxPool2d(2)': (lambda: GroupMaxPool2d(2, group=group), (2, 6, G), 14, False),
        'GroupAvgPool2d(2)': (lambda: GroupAvgPool2d(2, group=group), (2, 6, G), 14, False),
        'GroupBatchNorm (eval)': (bn, (2, 6, G), 9, False),
        'GroupPool (max)': (lambda: GroupPool(group, 'max'), (2, 6, G), 9, True),
        'stack lift-BN-ReLU-gconv-ReLU-maxpool-gconv-GroupPool': (lambda: Stack().double().eval(), (8, 1), 30, True),
        'the same stack with avgpool': (lambda: Stack(GroupAvgPool2d).double().eval(), (8, 1), 30, True),
    }


def layers_part(groups, wavelength):
    res, rows = {}, []
    for group in groups:
        g = get_group(group)
        for name, (make, shape, size, out_planar) in layer_cases(group).items():
            first, worst, exact = [], [], 0.0
            for s in SEEDS:
                torch.manual_seed(s)
                m = make()
                with torch.no_grad():
                    e = centre_error(m, group, shape, size, g.elements(), wavelength, out_planar, seed=s)
                scale = e.absolute / e.relative if e.relative else 1.0  # max |f(x)| at the centre
                first.append(e.per_element[1] / scale)
                worst.append(e.relative)
                exact = max(exact, max(e.per_element[h] for h in g.grid_elements()))
            res[f'{group} {name}'] = {'element1': statistics.mean(first), 'max': statistics.mean(worst),
                                      'grid_elements_abs': exact}
            rows.append(f"| {group} | {name} | {statistics.mean(first):.4f} | {statistics.mean(worst):.4f} | "
                        f"{exact:.1e} |")
    lines = [f'## Per layer (relative error on band-limited fields, wavelengths >= {wavelength:g} px, mean of 3 '
             f'seeds)', '', '| group | layer | at 2*pi/N | max over elements | quarter turns & mirrors (abs) |',
             '|---|---|---|---|---|'] + rows
    return '\n'.join(lines), res


# ----------------------------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------------------------
def speed_part(runs, repeats, dev, fields=16, size=32, batch=32):
    fns = synced(layer_step_fns('c8', fields, batch, size, 'train', dev, bias=False), dev)
    ratios = {k: [] for k in TARGETS}
    for run in range(runs):
        wall, cpu = shuffled_round_robin(fns, reps=repeats, seed=run)
        ratios['train_vs_floor'].append(wall['ours'] / wall['floor'])
        ratios['train_vs_escnn'].append(wall['ours'] / wall['escnn'])
        ratios['train_vs_floor (CPU time)'].append(cpu['ours'] / cpu['floor'])
        ratios['train_vs_escnn (CPU time)'].append(cpu['ours'] / cpu['escnn'])
    out = {k: statistics.median(v) for k, v in ratios.items()}
    out['runs'] = ratios
    out['weights'] = {'ours': count_parameters(fields, fields, 3, 'c8', 'c8', bias=False),
                      'escnn': escnn_weight_count('c8', fields)}
    return out


def escnn_weight_count(group, fields):
    from gequiv_timm.models.escnn_baselines import import_escnn
    _, enn = import_escnn()
    ft = escnn_field_type(group, fields)
    return enn.R2Conv(ft, ft, 3, padding=1, bias=False).weights.numel()


TARGETS = {'train_vs_floor': 1.10, 'train_vs_escnn': 1.00, 'train_vs_floor (CPU time)': 1.10,
           'train_vs_escnn (CPU time)': 1.00}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--part', choices=['all', 'basis', 'layers', 'speed'], default='all')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--wavelength', type=float, default=8.0)
    add_device_arg(ap)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    text, res = [f"# C_N / D_N layers (torch {torch.__version__}, {device_label(dev, args.threads)})"], {}
    if args.part in ('all', 'basis'):
        t, r = basis_part((args.wavelength, 5.0))
        text.append(t)
        res['basis'] = r
    if args.part in ('all', 'layers'):
        t, r = layers_part(['c8', 'd8', 'c12', 'd12', 'c16', 'd16'], args.wavelength)
        text.append(t)
        res['layers'] = r
    if args.part in ('all', 'speed'):
        r = speed_part(args.runs, args.repeats, dev)
        res['speed'] = r
        lines = [f"## Speed: C8 16 -> 16 regular fields, 3x3, 32x32, batch 32, train step (medians of {args.runs} "
                 f"runs of {args.repeats} shuffled rounds; wall time and process CPU time)", '',
                 '| measure | ratio | target | |', '|---|---|---|---|']
        for k, tgt in TARGETS.items():
            lines.append(f"| {k} | {r[k]:.3f} (runs: {', '.join(f'{v:.3f}' for v in r['runs'][k])}) | <= {tgt} | "
                         f"{verdict(r[k], tgt)} |")
        lines.append('')
        lines.append(f"weights: ours {r['weights']['ours']:,}, escnn {r['weights']['escnn']:,}")
        text.append('\n'.join(lines))
    report('\n\n'.join(text), res, args.out)


if __name__ == '__main__':
    main()
