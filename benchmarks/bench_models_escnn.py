"""Model level, side by side in one run: ``gequiv_p4cnn`` against ``gequiv_escnn_c4cnn`` (same P4CNN layout,
parameters matched): construction time, train step (batch 64, forward + backward + AdamW), batch-1 latency
(eval, after ``export()`` where the model has one) and memory, as ratios ours / escnn.

Memory is the accounting of :func:`gequiv_timm.measure.train_memory_bytes`: parameters, gradients, AdamW state
and the tensors autograd saves for backward at one train step (deterministic; a CPU has no allocator peak
counter, and process RSS is dominated by escnn's basis construction, not by training).

Run: .venv/bin/python benchmarks/bench_models_escnn.py [--ours gequiv_p4cnn] [--theirs gequiv_escnn_c4cnn]
         [--threads 1] [--out benchmarks/results/escnn_models.md]
"""
import argparse
import statistics
import time
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

import timm  # noqa: E402

import gequiv_timm  # noqa: E402,F401
from gequiv_timm.measure import count_macs, time_round_robin, train_memory_bytes  # noqa: E402


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--ours', default='gequiv_p4cnn')
    ap.add_argument('--theirs', default='gequiv_escnn_c4cnn')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=20)
    ap.add_argument('--out', default=None, help='write the markdown table here (and .json beside it)')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = {'ours': args.ours, 'escnn': args.theirs}
    res = {k: {} for k in names}
    for k, n in names.items():
        res[k]['first_build_s'], res[k]['build_s'] = build_time(n, max(3, args.repeats // 4))
    torch.manual_seed(0)
    models = {k: timm.create_model(n) for k, n in names.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    x1 = x[:1]
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

    t = time_round_robin({k: step(k) for k in models}, reps=args.repeats, warmup=3)
    for k in models:
        res[k]['train_step_s'] = t[k]
    for k, m in models.items():
        mem = train_memory_bytes(m, x, y)
        res[k]['train_memory_mib'] = mem['total'] / 2 ** 20
        res[k]['activation_mib'] = mem['activations'] / 2 ** 20
        res[k]['params'] = sum(p.numel() for p in m.parameters())
    infer = {}
    for k, m in models.items():
        m.eval()
        e = m.export() if callable(getattr(m, 'export', None)) else m
        res[k]['exported'] = e is not m
        res[k]['macs'] = count_macs(e)

        def f(e=e):
            with torch.no_grad():
                e(x1)
        infer[k] = f
    t = time_round_robin(infer, reps=args.repeats * 3, warmup=5, inner=5)
    for k in models:
        res[k]['latency_b1_s'] = t[k]

    rows = [('construction (s, after the first)', 'build_s', 1), ('first construction (s)', 'first_build_s', 1),
            (f'train step, batch {args.batch_size} (ms)', 'train_step_s', 1e3), ('batch-1 latency (ms)',
                                                                                 'latency_b1_s', 1e3),
            ('train memory, accounting (MiB)', 'train_memory_mib', 1), ('of which saved for backward (MiB)',
                                                                              'activation_mib', 1),
            ('parameters', 'params', 1), ('MACs, batch 1', 'macs', 1)]
    lines = [f"# Models: `{args.ours}` vs `{args.theirs}` (torch {torch.__version__}, {args.threads} thread(s), "
             f"medians of {args.repeats}+ rotated round-robin rounds)", '',
             '| measure | ours | escnn | ours / escnn |', '|---|---|---|---|']
    for label, key, scale in rows:
        a, b = res['ours'][key] * scale, res['escnn'][key] * scale
        fmt = (lambda v: f'{v:,.0f}') if key in ('params', 'macs') else (lambda v: f'{v:.3f}')
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {a / b:.3g} |")
    lines.append('')
    lines.append(f"Latency is measured on the exported models (ours exported: {res['ours']['exported']}, escnn "
                 f"exported: {res['escnn']['exported']}).")
    report('\n'.join(lines), dict(args=vars(args), results=res), args.out)
    return res


if __name__ == '__main__':
    main()
