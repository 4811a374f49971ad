"""gequiv_p4_resnet18 against timm's resnet18, side by side in one run, at 224x224 on CPU.

Measures, for both models, interleaved (A, B, A, B, ...) and reported as medians and ratios (ours / plain):

* a train step (forward + backward + SGD step, batch ``--train-batch``, train mode),
* eval forward at batch 1 and batch 32 (``torch.no_grad``, eval mode),
* the stem alone at batch 32 (eval): ``conv1 -> bn1 -> act1`` for resnet18, the injected EquivariantStem for ours,
  and its share of the whole eval forward,
* parameters, and peak memory (peak RSS growth of a fresh subprocess running one train step and one batch-32 eval;
  CPU tensors are not seen by tracemalloc, so RSS it is).

Usage::

    python benchmarks/bench_stem.py --threads 2 --repeats 3 --out benchmarks/results/stem

The machine is shared: absolute times move with the load, the ratios (measured back to back) much less.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import gequiv_timm  # noqa: E402,F401
from gequiv_timm.models.stems import get_stem  # noqa: E402

MODELS = ('resnet18', 'gequiv_p4_resnet18')


def _create(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name)


def _stem(model: nn.Module, name: str) -> nn.Module:
    if name.startswith('gequiv_'):
        return get_stem(model)
    return nn.Sequential(model.conv1, model.bn1, model.act1)


def _time(fn, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _train_step(model, x, y, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def _rss_kb() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024


def _hwm_kb() -> int:
    """Peak resident set (VmHWM) of this process. Not ru_maxrss: Linux keeps that across fork + exec, so a child
    would report its parent's peak."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    raise RuntimeError('no VmHWM in /proc/self/status')


def _memory_child(name: str, size: int, train_batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = _create(name)
    x = torch.randn(train_batch, 3, size, size)
    y = torch.randint(0, 1000, (train_batch,))
    xe = torch.randn(32, 3, size, size)
    base = _rss_kb()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    _train_step(model, x, y, opt)()
    model.eval()
    with torch.no_grad():
        model(xe)
    peak = _hwm_kb()
    print(json.dumps(dict(peak_rss_growth_mb=round((peak - base) / 1024, 1), peak_rss_mb=round(peak / 1024, 1))))


def _measure_memory(name, args):
    out = subprocess.run([sys.executable, __file__, '--memory-child', name, '--size', str(args.size), '--train-batch',
                          str(args.train_batch), '--threads', str(args.threads)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_only(args):
    outp = Path(args.out)
    result = json.loads(outp.with_suffix('.json').read_text())
    for n in MODELS:
        result['models'][n].update(_measure_memory(n, args))
    a, b = result['models']['gequiv_p4_resnet18'], result['models']['resnet18']
    result['ratios_ours_over_plain']['peak_rss_growth'] = round(a['peak_rss_growth_mb'] / b['peak_rss_growth_mb'], 2)
    result['setup']['memory_command'] = ' '.join(sys.argv)
    outp.with_suffix('.json').write_text(json.dumps(result, indent=2))
    md = outp.with_suffix('.md').read_text().splitlines()
    md = [l for l in md if not l.startswith('| peak RSS')]
    md.append(f"| peak RSS growth (MB) | {b['peak_rss_growth_mb']} | {a['peak_rss_growth_mb']} | "
              f"{result['ratios_ours_over_plain']['peak_rss_growth']} |")
    outp.with_suffix('.md').write_text('\n'.join(md) + '\n')
    print('\n'.join(md))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, default=1, help='torch threads (the house default is 1; the issue asks 2)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'stem'))
    p.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--memory-only', action='store_true', help='re-measure peak memory into an existing result')
    args = p.parse_args(argv)
    if args.memory_child:
        return _memory_child(args.memory_child, args.size, args.train_batch, args.threads)

    if args.memory_only:
        return _memory_only(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    s = args.size
    x1, x32 = torch.randn(1, 3, s, s), torch.randn(32, 3, s, s)
    xt, yt = torch.randn(args.train_batch, 3, s, s), torch.randint(0, 1000, (args.train_batch,))
    models = {n: _create(n) for n in MODELS}
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in models.items()}
    times = {n: dict(train_step=[], eval_b1=[], eval_b32=[], stem_b32=[]) for n in MODELS}
    for r in range(args.repeats):
        for n, m in models.items():
            m.train()
            times[n]['train_step'].append(_time(_train_step(m, xt, yt, opts[n])))
            m.eval()
            stem = _stem(m, n)
            with torch.no_grad():
                times[n]['eval_b1'].append(_time(lambda: m(x1), warmup=2))
                times[n]['eval_b32'].append(_time(lambda: m(x32)))
                times[n]['stem_b32'].append(_time(lambda: stem(x32)))
            print(f"repeat {r}: {n}: " + ', '.join(f"{k}={v[-1]:.3f}s" for k, v in times[n].items()), flush=True)

    res = {}
    for n, m in models.items():
        med = {k: statistics.median(v) for k, v in times[n].items()}
        mem = _measure_memory(n, args)
        res[n] = dict(params=sum(p.numel() for p in m.parameters()),
                      stem_params=sum(p.numel() for p in _stem(m, n).parameters()),
                      **{f'{k}_s': round(v, 4) for k, v in med.items()},
                      stem_share_eval_b32=round(med['stem_b32'] / med['eval_b32'], 3), **mem)
    a, b = res['gequiv_p4_resnet18'], res['resnet18']
    ratios = {k: round(a[f'{k}_s'] / b[f'{k}_s'], 2) for k in ('train_step', 'eval_b1', 'eval_b32', 'stem_b32')}
    ratios['params'] = round(a['params'] / b['params'], 3)
    ratios['peak_rss_growth'] = round(a['peak_rss_growth_mb'] / max(b['peak_rss_growth_mb'], 1e-9), 2)
    result = dict(models=res, ratios_ours_over_plain=ratios,
                  setup=dict(size=s, train_batch=args.train_batch, repeats=args.repeats, threads=args.threads,
                             seed=args.seed, torch=torch.__version__, timm=timm.__version__,
                             cpu=platform.processor() or platform.machine(), load_avg=os.getloadavg(),
                             command=' '.join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:]))))
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.with_suffix('.json').write_text(json.dumps(result, indent=2))
    rows = ['| | resnet18 | gequiv_p4_resnet18 | ratio |', '|---|---|---|---|']
    for k, label in (('train_step_s', f'train step, batch {args.train_batch} (s)'), ('eval_b1_s', 'eval batch 1 (s)'),
                     ('eval_b32_s', 'eval batch 32 (s)'), ('stem_b32_s', 'stem alone, batch 32 (s)')):
        rows.append(f"| {label} | {b[k]} | {a[k]} | {ratios[k[:-2]]} |")
    rows.append(f"| stem share of eval b32 | {b['stem_share_eval_b32']} | {a['stem_share_eval_b32']} | |")
    rows.append(f"| parameters | {b['params']:,} | {a['params']:,} | {ratios['params']} |")
    rows.append(f"| stem parameters | {b['stem_params']:,} | {a['stem_params']:,} | |")
    rows.append(f"| peak RSS growth (MB) | {b['peak_rss_growth_mb']} | {a['peak_rss_growth_mb']} | "
                f"{ratios['peak_rss_growth']} |")
    table = '\n'.join(rows)
    hdr = (f"{s}x{s}, {args.threads} thread(s), medians of {args.repeats} interleaved repeats, seed {args.seed}, "
           f"load average at the end {tuple(round(v, 1) for v in os.getloadavg())}\n\n")
    outp.with_suffix('.md').write_text(hdr + table + '\n')
    print(hdr + table)


if __name__ == '__main__':
    main()
