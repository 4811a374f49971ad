"""Group-convolution speed (issues 2 and 18): every group layer against the plain-conv floor and escnn's ``R2Conv``,
a profile of where a ``P4ConvP4``'s time goes, and ``gequiv_p4cnn`` against a planar CNN of the same width.
Everything side by side in one run; ratios only (the machine is shared and noisy).

Parts (``--part``, default ``all``):

* ``profile``: ``P4ConvP4`` 16 -> 16 fields, 3x3, padding 1, 32x32, with bias (the layer's default): the train step
  at batch 32 and eval at batch 1, split into the pieces the layer adds to the floor (input check, filter expansion
  forward and backward, bias expansion), each timed alone in the same shuffled rounds as the whole step, for the
  layer as it was before issue 18 (``before``: the bank rebuilt by the reference :meth:`GroupConv2d._expand`, a
  gather, a transpose and a copy, on every call, eval included) and as it is now (``now``). Then torch.profiler's
  busiest operators of one step. Two train steps are profiled: the old benchmark's ``layer(x).sum().backward()``
  (weight gradient only; the gradient of a sum is a stride-0 tensor) and an inner layer's step (input gradient
  too, a dense upstream gradient: what a network sends).
* ``layers``: for every group (p4, p4m, c8, d8, c16; fields so that a layer has 64-128 channels), ours / floor,
  escnn / floor and ours / escnn, in train (batch 32, an inner layer's step: :func:`common.layer_step_fns`), eval
  batch 1 and eval batch 32, medians of shuffled rounds, wall and process CPU time; each ratio beside its goal.
* ``model``: ``gequiv_p4cnn`` (and after ``export()``) against a planar CNN of the same expanded width.

Run: .venv/bin/python benchmarks/bench_gconv.py [--part all] [--threads 2] [--device cpu] [--repeats 20]
         [--out benchmarks/results/gconv.md]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_device_arg, device_label, layer_step_fns, no_grad_call, paired_ratio, report, resolve_device,
    shuffled_round_robin, synced, verdict,
)

import timm  # noqa: E402
import gequiv_timm  # noqa: E402,F401
from gequiv_timm.layers import GroupConv2d, P4ConvP4, check_group_input, export_group_convs, get_group  # noqa: E402
from gequiv_timm.measure import time_round_robin  # noqa: E402

# the goals of issue 18 (layer) and issue 2 (model): ratio ours / floor
LAYER_TARGETS = {'train b32': 1.05, 'eval b1': 1.03, 'eval b32': 1.02}
GROUPS = ('p4', 'p4m', 'c8', 'd8', 'c16')


def default_fields(group: str) -> int:
    """16 fields (64-128 channels) up to |G| = 8, 8 fields for |G| = 16 (128 channels)."""
    return 16 if get_group(group).order <= 8 else 8


# ----------------------------------------------------------------------------------------------------------------
# profile
# ----------------------------------------------------------------------------------------------------------------
def _before_forward(conv, x):
    """The layer's forward as it was before issue 18: the reference expansion on every call, no eval reuse."""
    check_group_input(x, conv.in_channels, conv.in_order, 'P4ConvP4', conv._min_size())
    w, b = conv._expand(conv.weight), conv._expand_bias(conv.bias)
    y = F.conv2d(x.flatten(1, 2), w, b, conv.stride, conv.padding, conv.dilation)
    return y.unflatten(1, (conv.out_channels, conv.out_order))


def profile_part(repeats, dev, batch=32, fields=16, size=32):
    torch.manual_seed(0)
    conv = P4ConvP4(fields, fields, 3, padding=1).to(dev)
    c = fields * 4
    x = torch.randn(batch, fields, 4, size, size, device=dev)
    xf = x.flatten(1, 2)
    w = conv.expanded_weight().detach().clone().requires_grad_(True)
    b = conv.expanded_bias().detach().clone().requires_grad_(True)
    gy = torch.randn(batch, c, size, size, device=dev)
    gbank = torch.randn_like(w)
    gbias = torch.randn_like(b)
    xg = x.clone().requires_grad_(True)
    xfg = xf.clone().requires_grad_(True)
    conv.train()

    def step_sum(f):  # the old benchmark's step: weight gradient only, d(sum)/dy is a stride-0 tensor
        def g():
            conv.zero_grad(set_to_none=True)
            w.grad = b.grad = None
            f().sum().backward()
        return g

    def expand_fb(fn):
        def g():
            conv.zero_grad(set_to_none=True)
            fn(conv.weight).backward(gbank)
        return g

    def bias_fb():
        conv.zero_grad(set_to_none=True)
        conv._expand_bias(conv.bias).backward(gbias)

    def check():
        check_group_input(x, fields, 4, 'P4ConvP4', 1)

    fns = {
        'step (sum): before': step_sum(lambda: _before_forward(conv, x)),
        'step (sum): now': step_sum(lambda: conv(x)),
        'step (sum): floor': step_sum(lambda: F.conv2d(xf, w, b, 1, 1)),
        'step (inner): before': lambda: (conv.zero_grad(set_to_none=True), setattr(xg, 'grad', None),
                                         _before_forward(conv, xg).backward(gy.view(batch, fields, 4, size, size))),
        'step (inner): now': lambda: (conv.zero_grad(set_to_none=True), setattr(xg, 'grad', None),
                                      conv(xg).backward(gy.view(batch, fields, 4, size, size))),
        'step (inner): floor': lambda: (setattr(w, 'grad', None), setattr(b, 'grad', None),
                                        setattr(xfg, 'grad', None), F.conv2d(xfg, w, b, 1, 1).backward(gy)),
        'expansion fwd+bwd: before': expand_fb(conv._expand),
        'expansion fwd+bwd: now': expand_fb(conv._expand_fast),
        'bias expansion fwd+bwd': bias_fb,
        'input check': check,
    }
    raw = {}
    wall, cpu = shuffled_round_robin(synced(fns, dev), reps=repeats, seed=1, raw=raw)
    res = {'train': {'wall': wall, 'cpu': cpu, 'rounds': raw}}
    # ----- eval, batch 1
    conv.eval()
    x1 = torch.randn(1, fields, 4, size, size, device=dev)
    x1f = x1.flatten(1, 2)
    wd, bd = w.detach(), b.detach()

    def nograd(f):
        def g():
            with torch.no_grad():
                f()
        return g
    efns = {
        'eval b1: before': nograd(lambda: _before_forward(conv, x1)),
        'eval b1: now': nograd(lambda: conv(x1)),
        'eval b1: floor': nograd(lambda: F.conv2d(x1f, wd, bd, 1, 1)),
        'expansion fwd: before': nograd(lambda: (conv._expand(conv.weight), conv._expand_bias(conv.bias))),
        'expansion fwd: now (no reuse)': nograd(lambda: (conv._expand_fast(conv.weight),
                                                         conv._expand_bias(conv.bias))),
        'eval reuse check (equal weights)': nograd(lambda: conv._bank()),
        'input check': lambda: check_group_input(x1, fields, 4, 'P4ConvP4', 1),
    }
    raw = {}
    wall, cpu = shuffled_round_robin(synced(efns, dev), reps=repeats * 4, seed=2, inner=10, raw=raw)
    res['eval_b1'] = {'wall': wall, 'cpu': cpu, 'rounds': raw}
    # ----- torch.profiler: the busiest operators of one train step (inner layer and the old sum step)
    res['profiler'] = {}
    if dev.type == 'cpu':
        from torch.profiler import ProfilerActivity, profile
        conv.train()
        for name in ('step (sum): before', 'step (sum): now', 'step (inner): now', 'step (inner): floor'):
            f = fns[name]
            f()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    f()
            rows = []
            for e in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:8]:
                rows.append((e.key, str(e.input_shapes)[:70], e.self_cpu_time_total / 3 / 1e3, e.count // 3))
            res['profiler'][name] = rows
    return res


def profile_text(res):
    tw, tc, tr = res['train']['wall'], res['train']['cpu'], res['train']['rounds']
    lines = ['## Profile: P4ConvP4 16 -> 16 fields, 3x3, 32x32, bias; train batch 32, eval batch 1', '',
             '`before` = the layer before issue 18 (the reference expansion, a gather + transpose + copy, on every '
             'call, eval included); `now` = this version; `(sum)` = the old benchmark\'s step `layer(x).sum()'
             '.backward()` (weight gradient only), `(inner)` = an inner layer\'s step (input gradient too, dense '
             'upstream gradient). Steps: the median over shuffled rounds of step / floor in the same round. Pieces '
             '(timed alone, in the same rounds): median time / the floor step\'s median.', '',
             '| train, batch 32 | ms (wall) | ms (CPU) | / floor (wall) | / floor (CPU) |', '|---|---|---|---|---|']
    for k in tw:
        floor = 'step (sum): floor' if '(sum)' in k else 'step (inner): floor'
        if k.startswith('step'):
            rw, rc = paired_ratio(tr['wall'], k, floor), paired_ratio(tr['cpu'], k, floor)
        else:
            rw, rc = tw[k] / tw[floor], tc[k] / tc[floor]
        lines.append(f"| {k} | {tw[k] * 1e3:.3f} | {tc[k] * 1e3:.3f} | {rw:.4f} | {rc:.4f} |")
    for when in ('before', 'now'):
        added = tc[f'expansion fwd+bwd: {when}'] + tc['bias expansion fwd+bwd'] + tc['input check']
        lines.append(f"| **the layer's own work, {when}** (expansion fwd+bwd, bias, check; CPU) | | "
                     f"{added * 1e3:.3f} | | {added / tc['step (inner): floor']:.4f} |")
    ew, ec, er = res['eval_b1']['wall'], res['eval_b1']['cpu'], res['eval_b1']['rounds']
    lines += ['', '| eval, batch 1 | us (wall) | us (CPU) | / floor (wall) | / floor (CPU) |', '|---|---|---|---|---|']
    for k in ew:
        if k.startswith('eval b1'):
            rw, rc = paired_ratio(er['wall'], k, 'eval b1: floor'), paired_ratio(er['cpu'], k, 'eval b1: floor')
        else:
            rw, rc = ew[k] / ew['eval b1: floor'], ec[k] / ec['eval b1: floor']
        lines.append(f"| {k} | {ew[k] * 1e6:.1f} | {ec[k] * 1e6:.1f} | {rw:.4f} | {rc:.4f} |")
    for name, rows in res.get('profiler', {}).items():
        lines += ['', f"torch.profiler, {name} (self CPU time per step, 1 step = mean of 3):", '',
                  '| operator | input shapes | ms | calls |', '|---|---|---|---|']
        lines += [f"| {k} | `{s}` | {t:.3f} | {n} |" for k, s, t, n in rows]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------
# every group: ours / floor / escnn
# ----------------------------------------------------------------------------------------------------------------
LAYER_MODES = (('train', 32), ('eval', 1), ('eval', 32))


def _quartiles(times, a, b):
    """The 25th and 75th percentiles over rounds of ``a``'s time over ``b``'s in the same round: the spread the
    median ratio comes from (per-round ratios scatter by a few % on a shared machine)."""
    r = sorted(x / y for x, y in zip(times[a], times[b]))
    return r[len(r) // 4], r[(3 * len(r)) // 4]


MODULE_KEYS = ('nn.Conv2d', 'exported')


def module_fns(group, fields, batch, size, dev):
    """Eval-mode references beside the floor (a bare ``F.conv2d``): the same conv as an ``nn.Conv2d`` module (what
    any module around one conv costs at batch 1: the module call), and our layer exported
    (:func:`~gequiv_timm.layers.export_group_convs`: that module plus our input check and the two views; no bank
    reuse check). Same shapes as the floor, own random tensors."""
    g = get_group(group)
    torch.manual_seed(1)
    layer = GroupConv2d(fields, fields, 3, g, g, padding=1).to(dev).eval()
    conv = nn.Conv2d(fields * g.order, fields * g.order, 3, padding=1).to(dev).eval()
    with torch.no_grad():
        conv.weight.copy_(layer.expanded_weight())
        conv.bias.copy_(layer.expanded_bias())
    exported = export_group_convs(layer)
    x5 = torch.randn(batch, fields, g.order, size, size, device=dev)
    xf = x5.flatten(1, 2).clone()
    return {'nn.Conv2d': no_grad_call(lambda: conv(xf)), 'exported': no_grad_call(lambda: exported(x5))}


def layers_part(groups, repeats, dev, size=32, modes=None):
    res = {}
    for group in groups:
        f = default_fields(group)
        for mode, batch in LAYER_MODES:
            key = f"{mode} b{batch}"
            if modes is not None and key not in modes:
                continue
            fns = layer_step_fns(group, f, batch, size, mode, dev)
            if mode == 'eval':
                fns.update(module_fns(group, f, batch, size, dev))
            fns = synced(fns, dev)
            inner = 10 if batch == 1 else 1
            raw = {}
            wall, cpu = shuffled_round_robin(fns, reps=repeats * (3 if batch == 1 else 1), seed=3, inner=inner,
                                             raw=raw)
            pairs = [('ours', 'floor'), ('escnn', 'floor'), ('ours', 'escnn')]
            pairs += [(k, 'floor') for k in MODULE_KEYS if k in fns]
            paired = {f"{a}/{b}": {t: paired_ratio(raw[t], a, b) for t in ('wall', 'cpu')} for a, b in pairs}
            res[f"{group} {key}"] = {'fields': f, 'channels': f * get_group(group).order, 'wall': wall, 'cpu': cpu,
                                     'paired': paired, 'rounds': raw,
                                     'ours/floor quartiles': {t: _quartiles(raw[t], 'ours', 'floor')
                                                              for t in ('wall', 'cpu')}}
            print(f"  {group} {key}: ours/floor {paired['ours/floor']['wall']:.3f} (CPU "
                  f"{paired['ours/floor']['cpu']:.3f}), ours/escnn {paired['ours/escnn']['wall']:.3f}", flush=True)
    return res


def layers_text(res, dev):
    cpu_col = dev.type == 'cpu'
    lines = ['## Every group: ours vs the floor and escnn R2Conv (3x3, padding 1, 32x32, bias, regular fields)', '',
             'train = an inner layer\'s step at batch 32 (forward, backward to the weights and the input with a dense '
             'upstream gradient); eval = no grad. Floor = one `F.conv2d` with our expanded bank and bias as fixed '
             'tensors. Each ratio is the median over shuffled rounds of the two times measured in the same round, '
             'wall time' + (' (process CPU time in brackets)' if cpu_col else '') + '; "quartiles" are the 25th and '
             '75th '
             'percentiles of the per-round ratio ours / floor (wall), the spread behind the median. In eval, two more '
             'references against the same floor: `nn.Conv2d` = the same conv as a plain torch module (what a module '
             'call costs), exported = our layer frozen by `export_group_convs` (that module plus our input check and '
             'the two views, no bank reuse check).', '',
             '| group | fields (channels) | mode | ours / floor | quartiles | goal | | escnn / floor | ours / escnn | '
             'nn.Conv2d / floor | exported / floor | ours (ms) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for key, r in res.items():
        group, mode = key.split(' ', 1)
        w, pr = r['wall'], r['paired']
        ratio = pr['ours/floor']['wall']
        tgt = LAYER_TARGETS[mode]

        def fmt(a, b):
            q = pr.get(f"{a}/{b}")
            if q is None:
                return '-'
            return f"{q['wall']:.3f}" + (f" ({q['cpu']:.3f})" if cpu_col else '')
        q = r.get('ours/floor quartiles', {}).get('wall')
        qs = f"{q[0]:.3f}-{q[1]:.3f}" if q else '-'
        lines.append(f"| {group} | {r['fields']} ({r['channels']}) | {mode} | {fmt('ours', 'floor')} | {qs} | "
                     f"<= {tgt} | "
                     f"{verdict(ratio, tgt)} | {fmt('escnn', 'floor')} | {fmt('ours', 'escnn')} | "
                     f"{fmt('nn.Conv2d', 'floor')} | {fmt('exported', 'floor')} | "
                     f"{w['ours'] * 1e3:.3f} |")
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------
# model: gequiv_p4cnn against a planar CNN of the same expanded width
# ----------------------------------------------------------------------------------------------------------------
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


MODEL_TARGETS = {'model_b1_eval_ratio': 1.15, 'model_b1_eval_exported_ratio': 1.15, 'model_b64_train_ratio': 1.05}


def model_part(repeats, dev):
    torch.manual_seed(0)
    ours = timm.create_model('gequiv_p4cnn').to(dev)
    ref = PlanarCNN().to(dev)
    res = {}
    x1 = torch.randn(1, 1, 28, 28, device=dev)
    ours.eval(), ref.eval()

    def run(m, x):
        def f():
            with torch.no_grad():
                m(x)
        return f

    fast = export_group_convs(ours)  # the inference path: frozen plain convs, no filter expansion
    t = time_round_robin(synced({'ours': run(ours, x1), 'ours_exported': run(fast, x1), 'ref': run(ref, x1)}, dev),
                         reps=repeats * 5, inner=5, warmup=5)
    res['model_b1_eval_ratio'] = t['ours'] / t['ref']
    res['model_b1_eval_exported_ratio'] = t['ours_exported'] / t['ref']
    x64 = torch.randn(64, 1, 28, 28, device=dev)
    y64 = torch.randint(0, 10, (64,), device=dev)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01)
    ours.train(), ref.train()

    def step(m, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x64), y64).backward()
            opt.step()
        return f

    t = time_round_robin(synced({'ours': step(ours, opt_o), 'ref': step(ref, opt_r)}, dev), reps=repeats, warmup=5)
    res['model_b64_train_ratio'] = t['ours'] / t['ref']
    res['params_ours'] = sum(p.numel() for p in ours.parameters())
    res['params_planar_same_width'] = sum(p.numel() for p in ref.parameters())
    return res


def model_text(res):
    lines = ['## gequiv_p4cnn vs a planar CNN of the same expanded width (40 channels)', '',
             '| measure | ratio ours / planar | goal | |', '|---|---|---|---|']
    for k, tgt in MODEL_TARGETS.items():
        lines.append(f"| {k} | {res[k]:.3f} | <= {tgt} | {verdict(res[k], tgt)} |")
    lines.append('')
    lines.append(f"parameters: gequiv_p4cnn {res['params_ours']:,}; planar CNN of the same expanded width "
                 f"{res['params_planar_same_width']:,}")
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--part', choices=['all', 'profile', 'layers', 'model'], default='all')
    ap.add_argument('--groups', default=','.join(GROUPS))
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=20)
    ap.add_argument('--modes', default=None,
                    help="comma-separated subset of the layer part's modes ('train b32', 'eval b1', 'eval b32'; "
                         "default all)")
    add_device_arg(ap)
    ap.add_argument('--out', default=None)
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    text = [f"# gconv benchmark ({device_label(dev, args.threads)}, torch {torch.__version__}, {args.repeats} rounds)"]
    res = {'args': vars(args), 'device': device_label(dev, args.threads)}
    if args.part in ('all', 'profile'):
        res['profile'] = profile_part(args.repeats, dev)
        text.append(profile_text(res['profile']))
    if args.part in ('all', 'layers'):
        modes = None
        if args.modes is not None:
            modes = [m.strip() for m in args.modes.split(',')]
            known = [f"{m} b{b}" for m, b in LAYER_MODES]
            bad = [m for m in modes if m not in known]
            if bad:
                ap.error(f"--modes: unknown {bad}; choose from {known}")
        res['layers'] = layers_part(args.groups.split(','), args.repeats, dev, modes=modes)
        text.append(layers_text(res['layers'], dev))
    if args.part in ('all', 'model'):
        res['model'] = model_part(args.repeats, dev)
        text.append(model_text(res['model']))
    report('\n\n'.join(text), res, args.out)
    return res


if __name__ == '__main__':
    main()
