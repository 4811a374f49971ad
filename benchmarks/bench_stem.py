"""The equivariant-stem models against their plain timm backbones, side by side in one process, on CPU.

Issue 18's goals: a stem model's train step (forward + backward + SGD step, batch ``--train-batch``, 224x224) at
most 1.15x the plain backbone's, its eval forward at batch 1 at most 1.10x. For every pair (``gequiv_p4_resnet18``
/ ``resnet18``, ``gequiv_p4m_resnet50`` / ``resnet50``, ...) the two models are timed in rounds, one train step and
``--inner`` batch-1 forwards each per round, in an order rotated every round; the ratio ours / plain is taken within
each round and its median over the rounds (and the lowest and highest round) is printed beside the goal, for wall
time and for the process's CPU time (the machine is shared: absolute times move with the load, ratios measured back
to back much less, and with one thread CPU-time ratios least: they leave out the time other jobs held the core).
``resnet18`` is also measured against the stem the models had before issue 18 (``mode='invariant', stem_depth=1,
stem_proj=True``: a 3x3 group convolution after the lift, pooled over the group, 1x1 conv, BN, ReLU).

Where the time goes (``--profile``, resnet18's stems alone, batch ``--train-batch``, train mode, forward +
backward): each stem is timed up to the end of each of its stages (lift; + batch norm and ReLU; + group convs; +
pooling over the group; + head), round-robin, and the differences are the stages' costs, beside their
multiply-accumulates (``gequiv_timm.measure.count_macs``, one image). Peak memory (``--memory``): the peak RSS
growth of a fresh subprocess running one train step and one batch-32 eval, for resnet18 and its two stems.

Usage::

    python benchmarks/bench_stem.py --threads 1 --repeats 7 --profile --memory --out benchmarks/results/stem
    python benchmarks/bench_stem.py --threads 1 --repeats 9 --pairs gequiv_p4_resnet18 \
        --out benchmarks/results/stem_resnet18
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
sys.path.insert(0, str(ROOT / 'benchmarks'))

import timm  # noqa: E402

import gequiv_timm  # noqa: E402,F401
from gequiv_timm.measure import count_macs  # noqa: E402
from gequiv_timm.models.stems import get_stem  # noqa: E402

from common import report, verdict  # noqa: E402

PAIRS = (('gequiv_p4_resnet18', 'resnet18'), ('gequiv_p4m_resnet50', 'resnet50'),
         ('gequiv_p4_convnext_tiny', 'convnext_tiny'), ('gequiv_p4m_efficientnet_b0', 'efficientnet_b0'),
         ('gequiv_p4_regnety_016', 'regnety_016'))
OLD_STEM = dict(mode='invariant', stem_depth=1, stem_proj=True)  # the registered models' stem before issue 18
OLD = 'gequiv_p4_resnet18 (old stem)'
GOALS = {'train_step': 1.15, 'eval_b1': 1.10}


def _create(label: str) -> nn.Module:
    torch.manual_seed(0)
    if label == OLD:
        return timm.create_model('gequiv_p4_resnet18', **OLD_STEM)
    return timm.create_model(label)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _eval(model: nn.Module, x: torch.Tensor, inner: int):
    def run():
        model.eval()
        with torch.no_grad():
            for _ in range(inner):
                model(x)
    return run


def _rounds(fns: dict, repeats: int) -> tuple:
    """Wall and CPU seconds (this process, all threads) of each callable in each round (one call per round, the
    order rotated every round, one warm-up). With one thread, CPU time leaves out the time other jobs held the core:
    on a shared machine it is the steadier of the two."""
    keys = list(fns)
    for k in keys:
        fns[k]()
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t, c = time.perf_counter(), time.process_time()
            fns[k]()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


def _ratios(ours: list, plain: list) -> dict:
    r = [a / b for a, b in zip(ours, plain)]
    return dict(median=round(statistics.median(r), 3), min=round(min(r), 3), max=round(max(r), 3),
                rounds=[round(v, 3) for v in r])


def measure_pair(ours: str, plain: str, args, extra: tuple = ()) -> dict:
    """Per-round ratios ours / plain (train step, eval batch 1) and the median times of one pair (and ``extra``
    models, each against ``plain``)."""
    s = args.size
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.train_batch, 3, s, s, generator=g)
    y = torch.randint(0, 1000, (args.train_batch,), generator=g)
    x1 = torch.randn(1, 3, s, s, generator=g)
    labels = (plain, ours) + tuple(extra)
    models = {n: _create(n) for n in labels}
    train, train_cpu = _rounds({n: _train_step(m, x, y) for n, m in models.items()}, args.repeats)
    ev, ev_cpu = _rounds({n: _eval(m, x1, args.inner) for n, m in models.items()}, args.repeats)
    res = {}
    for n in labels:
        m = models[n]
        res[n] = dict(params=sum(p.numel() for p in m.parameters()),
                      train_step_s=round(statistics.median(train[n]), 4),
                      eval_b1_s=round(statistics.median(ev[n]) / args.inner, 5),
                      train_step_cpu_s=round(statistics.median(train_cpu[n]), 4),
                      eval_b1_cpu_s=round(statistics.median(ev_cpu[n]) / args.inner, 5))
        if n != plain:
            res[n]['train_step'] = _ratios(train[n], train[plain])
            res[n]['eval_b1'] = _ratios(ev[n], ev[plain])
            res[n]['train_step_cpu'] = _ratios(train_cpu[n], train_cpu[plain])
            res[n]['eval_b1_cpu'] = _ratios(ev_cpu[n], ev_cpu[plain])
            res[n]['ratio_train_step'] = res[n]['train_step']['median']
            res[n]['ratio_eval_b1'] = res[n]['eval_b1']['median']
    print(f"{ours} vs {plain}: " + ', '.join(f"{n}: train {res[n].get('ratio_train_step', 1.0)}x, eval b1 "
                                             f"{res[n].get('ratio_eval_b1', 1.0)}x" for n in labels), flush=True)
    return res


# ----------------------------------------------------------------------------------------------------------------
# where the stem's time goes (resnet18)
# ----------------------------------------------------------------------------------------------------------------
class _Upto(nn.Module):
    """The first ``n`` stages of a stem (a list of lists of modules)."""

    def __init__(self, stages, n: int, fold: bool = False):
        super().__init__()
        self.mods = nn.ModuleList([m for st in stages[:n] for m in st])
        self.fold = fold

    def forward(self, x):
        for m in self.mods:
            x = m(x)
        return x.flatten(1, 2) if self.fold and x.dim() == 5 else x


def _stages(model: nn.Module, label: str):
    if label == 'resnet18':
        return [('7x7 stride-2 conv', [model.conv1]), ('BN + ReLU', [model.bn1, model.act1])]
    st = get_stem(model)
    out = [(f'lift ({st.lift.kernel_size}x{st.lift.kernel_size} fused with the {st.stride}x{st.stride} pool: '
            f'{st.lift.kernel_size + st.stride - 1}x{st.lift.kernel_size + st.stride - 1} stride {st.stride})',
            [st.lift]), ('group BN + ReLU', [st.bn1, st.act1])]
    if len(st.convs):
        out.append((f'{len(st.convs) // 3} x (3x3 group conv {st.width} -> {st.width} fields + group BN + ReLU)',
                    [st.convs]))
    if st.mode == 'invariant':
        out.append((f'{st.gpool.mode} over the group', [st.gpool]))
    if st.proj_head:
        out.append(('1x1 conv + BN + ReLU', [st.proj, st.bn2, st.act2]))
    return out


def profile_stems(args) -> dict:
    s, b = args.size, args.train_batch
    x = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(args.seed))
    labels = ('resnet18', 'gequiv_p4_resnet18', OLD)
    fns, info = {}, {}
    for label in labels:
        m = _create(label)
        st = _stages(m, label)
        fold = label != 'resnet18' and get_stem(m).mode == 'equivariant'
        info[label] = []
        for i in range(1, len(st) + 1):
            up = _Upto([mods for _, mods in st], i, fold=fold).train()

            def step(up=up):
                up.zero_grad(set_to_none=True)
                up(x).mean().backward()
            fns[(label, i)] = step
            info[label].append(dict(stage=st[i - 1][0], macs_per_image=count_macs(up, (1, 3, s, s))))
    t, _ = _rounds(fns, args.repeats)
    out = {}
    for label in labels:
        prev_t, prev_m = 0.0, 0
        rows = []
        for i, row in enumerate(info[label], 1):
            cum = statistics.median(t[(label, i)])
            rows.append(dict(row, cumulative_s=round(cum, 4), stage_s=round(cum - prev_t, 4),
                             stage_macs_per_image=row['macs_per_image'] - prev_m))
            prev_t, prev_m = cum, row['macs_per_image']
        out[label] = rows
    return out


# ----------------------------------------------------------------------------------------------------------------
# memory (a fresh subprocess per model)
# ----------------------------------------------------------------------------------------------------------------
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


def _memory_child(label: str, size: int, train_batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = _create(label)
    x = torch.randn(train_batch, 3, size, size)
    y = torch.randint(0, 1000, (train_batch,))
    xe = torch.randn(32, 3, size, size)
    base = _rss_kb()
    _train_step(model, x, y)()
    _eval(model, xe, 1)()
    peak = _hwm_kb()
    print(json.dumps(dict(peak_rss_growth_mb=round((peak - base) / 1024, 1))))


def _measure_memory(label: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, '--memory-child', label, '--size', str(args.size),
                          '--train-batch', str(args.train_batch), '--threads', str(args.threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
def _markdown(result: dict, args) -> str:
    su = result['setup']
    lines = [f"# Equivariant-stem models against their plain backbones\n",
             f"{args.size}x{args.size}, train step at batch {args.train_batch} (forward + backward + SGD step), eval "
             f"at batch 1 ({args.inner} forwards per round); {su['threads']} torch thread(s), {su['cpu']}; medians "
             f"over {args.repeats} rounds of the ratio ours / plain taken within each round (order rotated every "
             f"round); seed {args.seed}; torch {su['torch']}, timm {su['timm']}; load average at the end "
             f"{su['load_avg_end']}.\nCommand: `{su['command']}`\n",
             'Ratios ours / plain: median over the rounds [lowest, highest round]; wall time, then CPU time of '
             'this process (with one thread, the steadier on a shared machine: it leaves out the time other jobs '
             'held the core). Goals: train step <= 1.15, eval batch 1 <= 1.10.\n',
             '| model | plain backbone | train step, wall | CPU | eval batch 1, wall | CPU | params (ratio) |',
             '|---|---|---|---|---|---|---|']

    def cell(a, key):
        r, goal = a[key], GOALS[key.replace('_cpu', '')]
        return f"{r['median']} {verdict(r['median'], goal)} [{r['min']}, {r['max']}]"
    for ours, plain in result['pairs']:
        r = result['models'][plain]
        for n in [ours] + ([OLD] if plain == 'resnet18' and OLD in r else []):
            a = r[n]
            lines.append(f"| {n} | {plain} | {cell(a, 'train_step')} | {cell(a, 'train_step_cpu')} | "
                         f"{cell(a, 'eval_b1')} | {cell(a, 'eval_b1_cpu')} | "
                         f"{a['params']:,} ({a['params'] / r[plain]['params']:.3f}) |")
    lines += ['', 'Median times (seconds; they move with the machine\'s load, the ratios above are what counts):', '',
              '| model | train step (wall) | (CPU) | eval batch 1 (wall) | (CPU) |', '|---|---|---|---|---|']
    for ours, plain in result['pairs']:
        for n, a in result['models'][plain].items():
            lines.append(f"| {n} | {a['train_step_s']} | {a['train_step_cpu_s']} | {a['eval_b1_s']} | "
                         f"{a['eval_b1_cpu_s']} |")
    if 'profile' in result:
        lines += ['', f"## Where resnet18's stem time goes (stems alone, batch {args.train_batch}, train mode, "
                      f"forward + backward; each stem timed up to the end of each stage, round-robin, "
                      f"{args.repeats} rounds; a stage's time is the difference of medians, so small ones are "
                      f"noisy)", '', '| stem | stage | MACs / image (M) | time (s) | cumulative (s) |',
                  '|---|---|---|---|---|']
        for label, rows in result['profile'].items():
            for row in rows:
                lines.append(f"| {label} | {row['stage']} | {row['stage_macs_per_image'] / 1e6:.1f} | "
                             f"{row['stage_s']} | {row['cumulative_s']} |")
    if 'memory' in result:
        lines += ['', f"Peak RSS growth of one train step (batch {args.train_batch}) and one batch-32 eval, each "
                      f"model in a fresh process:", '', '| model | MB | ratio to resnet18 |', '|---|---|---|']
        base = result['memory']['resnet18']['peak_rss_growth_mb']
        for n, m in result['memory'].items():
            lines.append(f"| {n} | {m['peak_rss_growth_mb']} | {m['peak_rss_growth_mb'] / base:.2f} |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, default=1, help='torch threads (the house default is 1)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--repeats', type=int, default=7, help='rounds (each: one train step and --inner b1 evals)')
    p.add_argument('--inner', type=int, default=5, help='batch-1 forwards per round')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--pairs', default='all', help="comma-separated stem models (default all: "
                                                  f"{', '.join(o for o, _ in PAIRS)})")
    p.add_argument('--profile', action='store_true', help="time resnet18's stems stage by stage")
    p.add_argument('--memory', action='store_true', help='peak RSS of resnet18 and its two stems (subprocesses)')
    p.add_argument('--out', default=None, help='write OUT.md and OUT.json (e.g. benchmarks/results/stem)')
    p.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return _memory_child(args.memory_child, args.size, args.train_batch, args.threads)
    known = dict(PAIRS)
    chosen = [o for o, _ in PAIRS] if args.pairs == 'all' else args.pairs.split(',')
    bad = [c for c in chosen if c not in known]
    if bad:
        raise SystemExit(f"--pairs: unknown stem model(s) {bad}; choose from {sorted(known)}")
    if args.size % 4:
        raise SystemExit(f"--size {args.size}: use a multiple of 4 (the stems are exact for multiples of their "
                         f"stride, and the backbones reduce by 32)")
    torch.set_num_threads(args.threads)
    pairs = [(o, known[o]) for o in chosen]
    result = dict(pairs=pairs, goals=GOALS, models={})
    for ours, plain in pairs:
        extra = (OLD,) if plain == 'resnet18' else ()
        result['models'][plain] = measure_pair(ours, plain, args, extra)
    if args.profile:
        result['profile'] = profile_stems(args)
    if args.memory:
        result['memory'] = {n: _measure_memory(n, args) for n in ('resnet18', 'gequiv_p4_resnet18', OLD)}
    result['setup'] = dict(size=args.size, train_batch=args.train_batch, repeats=args.repeats, inner=args.inner,
                           threads=args.threads, seed=args.seed, torch=torch.__version__, timm=timm.__version__,
                           cpu=f"CPU ({platform.machine()})",
                           load_avg_end=tuple(round(v, 1) for v in os.getloadavg()),
                           command=' '.join(['python', os.path.relpath(__file__, ROOT)] +
                                            (argv if argv is not None else sys.argv[1:])))
    report(_markdown(result, args), result, str(Path(args.out).with_suffix('.md')) if args.out else None)


if __name__ == '__main__':
    main()
