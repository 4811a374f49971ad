"""Model level, side by side in one run: each of our G-CNNs against its escnn equivalent (the same P4CNN layout,
parameters matched: ``gequiv_p4cnn`` / ``gequiv_escnn_c4cnn``, ``gequiv_p4mcnn`` / ``gequiv_escnn_d4cnn``,
``gequiv_c8cnn`` / ``gequiv_escnn_c8cnn``): construction time, train step (batch 64, forward + backward + AdamW),
batch-1 latency in eval mode both as built and after ``export()`` (both sides treated alike), MACs and training
memory, as ratios ours / escnn, each beside its goal (issue 18: batch-1 latency at most escnn's).

Memory, two figures: the accounting of :func:`gequiv_timm.measure.train_memory_bytes` (parameters, gradients,
AdamW state and the tensors autograd saves for backward at one train step: deterministic), and the measured peak of
one train step (on the CPU the process's peak resident memory above the level before the step,
:func:`gequiv_timm.measure.peak_rss_bytes`, meaningful with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment,
which ``main`` sets for itself by re-executing; on CUDA ``torch.cuda.max_memory_allocated``).

Run: .venv/bin/python benchmarks/bench_models_escnn.py [--pairs gequiv_p4cnn:gequiv_escnn_c4cnn,...]
         [--threads 1] [--device cpu] [--out benchmarks/results/escnn_models.md]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_arg, device_label, report, resolve_device, synced, verdict  # noqa: E402

import timm  # noqa: E402

import gequiv_timm  # noqa: E402,F401
from gequiv_timm.measure import count_macs, peak_rss_bytes, time_round_robin, train_memory_bytes  # noqa: E402

PAIRS = (('gequiv_p4cnn', 'gequiv_escnn_c4cnn'), ('gequiv_p4mcnn', 'gequiv_escnn_d4cnn'),
         ('gequiv_c8cnn', 'gequiv_escnn_c8cnn'))
LATENCY_TARGET = 1.0  # issue 18: batch-1 latency of every G-CNN at most escnn's equivalent


def build_time(name, reps):
    """Median seconds of ``timm.create_model(name)`` (the first build, which fills escnn's basis caches, is
    reported separately as ``first``)."""
    t0 = time.perf_counter()
    timm.create_model(name)
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        timm.create_model(name)
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def measured_peak(m, x, y, dev) -> float:
    """MiB: the measured peak of one train step (forward, backward, AdamW) above the level before it."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    m.train()

    def step():
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()  # AdamW state exists from here on, as in training
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    return peak_rss_bytes(step) / 2 ** 20


def bench_pair(ours_name, theirs_name, args, dev):
    names = {'ours': ours_name, 'escnn': theirs_name}
    res = {k: {'model': n} for k, n in names.items()}
    for k, n in names.items():
        res[k]['first_build_s'], res[k]['build_s'] = build_time(n, max(2, args.repeats // 8))
    torch.manual_seed(0)
    models = {k: timm.create_model(n).to(dev) for k, n in names.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(dev)
    x1 = x[:1].clone()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(k):
        m, opt = models[k], opts[k]

        def f():
            m.train()
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    t = time_round_robin(synced({k: step(k) for k in models}, dev), reps=args.repeats, warmup=3)
    for k in models:
        res[k]['train_step_s'] = t[k]
    for k, m in models.items():
        mem = train_memory_bytes(m, x, y)
        res[k]['train_memory_mib'] = mem['total'] / 2 ** 20
        res[k]['activation_mib'] = mem['activations'] / 2 ** 20
        res[k]['peak_step_mib'] = measured_peak(m, x, y, dev)
        res[k]['params'] = sum(p.numel() for p in m.parameters())
    infer = {}
    for k, m in models.items():
        m.eval()
        e = m.export()
        res[k]['macs'] = count_macs(e)
        for tag, mod in (('eager', m), ('exported', e)):
            def f(mod=mod):
                with torch.no_grad():
                    mod(x1)
            infer[f'{k} {tag}'] = f
    t = time_round_robin(synced(infer, dev), reps=args.repeats * 3, warmup=5, inner=5)
    for k in models:
        res[k]['latency_b1_s'] = t[f'{k} eager']
        res[k]['latency_b1_exported_s'] = t[f'{k} exported']
    return res


ROWS = [('construction (s, after the first)', 'build_s', 1), ('first construction (s)', 'first_build_s', 1),
        ('train step, batch {b} (ms)', 'train_step_s', 1e3), ('batch-1 latency, eval (ms)', 'latency_b1_s', 1e3),
        ('batch-1 latency, export() (ms)', 'latency_b1_exported_s', 1e3),
        ('train memory, accounting (MiB)', 'train_memory_mib', 1),
        ('of which saved for backward (MiB)', 'activation_mib', 1),
        ('train step peak, measured (MiB)', 'peak_step_mib', 1), ('parameters', 'params', 1),
        ('MACs, batch 1', 'macs', 1)]


def pair_text(res, batch):
    o, e = res['ours'], res['escnn']
    lines = [f"## `{o['model']}` vs `{e['model']}`", '', '| measure | ours | escnn | ours / escnn | goal | |',
             '|---|---|---|---|---|---|']
    for label, key, scale in ROWS:
        a, b = o[key] * scale, e[key] * scale
        fmt = (lambda v: f'{v:,.0f}') if key in ('params', 'macs') else (lambda v: f'{v:.3f}')
        goal = ''
        if key in ('latency_b1_s', 'latency_b1_exported_s'):
            goal = f"<= {LATENCY_TARGET} | {verdict(a / b, LATENCY_TARGET)}"
        else:
            goal = ' |'
        lines.append(f"| {label.format(b=batch)} | {fmt(a)} | {fmt(b)} | {a / b:.3g} | {goal} |")
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--pairs', default=','.join(f'{a}:{b}' for a, b in PAIRS),
                    help='comma-separated ours:escnn model pairs')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=20)
    add_device_arg(ap)
    ap.add_argument('--out', default=None, help='write the markdown table here (and .json beside it)')
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    if dev.type == 'cpu' and os.environ.get('MALLOC_MMAP_THRESHOLD_') is None and argv is None:
        # every large tensor its own mmap: the measured peak is the step's own (see gequiv_timm.measure)
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'})
    torch.set_num_threads(args.threads)
    pairs = [tuple(p.split(':')) for p in args.pairs.split(',') if p]
    out = {'args': vars(args), 'device': device_label(dev, args.threads), 'pairs': []}
    text = [f"# Models: ours vs escnn ({device_label(dev, args.threads)}, torch {torch.__version__}, medians of "
            f"{args.repeats}+ rotated round-robin rounds)",
            'Latency: eval mode, batch 1, no grad, as built (`eval`: ours reuses its filter banks while the weights '
            'are unchanged, escnn caches its filters in eval mode) and after `export()` on both sides.']
    for a, b in pairs:
        r = bench_pair(a, b, args, dev)
        out['pairs'].append(r)
        text.append(pair_text(r, args.batch_size))
        print(text[-1], flush=True)
    report('\n\n'.join(text), out, args.out)
    return out


if __name__ == '__main__':
    main()
