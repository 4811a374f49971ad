"""Segmentation benchmark: CDE-PDE networks against a CNN and a p4 G-CNN on MNIST strokes, the same budget for all.

Tests the claim of Smets, Portegies, Bekkers & Duits (PDE-G-CNNs, JMIV 2022, the DRIVE experiment): the CDE-PDE
network reaches the Dice of the CNN and of the G-CNN within 1 point with at most a quarter of their parameters.
Reports, per model, the mean and spread over seeds of Dice, AUC and pixel accuracy on the test split
(:func:`gequiv_timm.training.loop.evaluate`, task ``'segment'``), the parameter count, and the train-step time
ratio of each model to the G-CNN (``gequiv_p4_seg6``; goal for the PDE nets: at most 3x), timed round-robin in this
one process (:func:`gequiv_timm.measure.time_round_robin`).

Protocol (every budget is a command-line option and is recorded in the results):

* data: ``mnist_strokes(seed)`` (``gequiv_timm.data.strokes``; train canvases from the 4,000 train digits, test
  canvases from the 1,000 held-out digits), standardised with the MNIST mean / std; ``--n-test`` test canvases
  (the first ones) are evaluated at full 64x64 resolution;
* training: for every model the same ``--steps`` AdamW steps (lr ``--lr``, weight decay 1e-4, per-step cosine to 0;
  the PDE coefficients at the models' own ``coef_lr_mult`` through ``param_groups``, as ``gequiv-timm train``
  does), batch ``--batch-size`` random ``--crop`` x ``--crop`` crops of random training canvases (the same
  crops for every model: drawn from a generator seeded with the seed), soft Dice loss
  (:func:`gequiv_timm.training.losses.dice_loss`); the model is initialised after ``torch.manual_seed(seed)``;
* one torch thread; run niced in the background on a shared machine.

Run (the recorded runs: ``benchmarks/results/seg_400steps.md``, 8.1 CPU-minutes; with ``--steps 200
--timing-reps 4``: ``benchmarks/results/seg.md``, 5.4 CPU-minutes)::

    nice -n 5 .venv/bin/python benchmarks/bench_seg.py --seeds 0 1 2 --steps 400 --n-test 100 --timing-reps 6 \\
        --out benchmarks/results/seg_400steps.md > /tmp/bench_seg.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, verdict  # noqa: E402

MODELS = ('gequiv_pde_seg6', 'gequiv_pde_seg12', 'gequiv_cnn_seg6', 'gequiv_p4_seg6')
PDE = ('gequiv_pde_seg6', 'gequiv_pde_seg12')
BASELINES = ('gequiv_cnn_seg6', 'gequiv_p4_seg6')
GCNN = 'gequiv_p4_seg6'
STEP_TARGET = 3.0  # a PDE train step at most this many times the G-CNN's
DICE_MARGIN = 0.01  # "within 1 point"
PARAM_RATIO = 0.25  # "at most a quarter of the parameters"


def crop_batches(images: torch.Tensor, masks: torch.Tensor, steps: int, batch: int, crop: int, seed: int):
    """``steps`` batches of ``batch`` random ``crop x crop`` crops of random canvases, from a generator seeded with
    ``seed`` (the same batches for every model). ``crop = 0``: whole canvases."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 7)
    n, size = images.shape[0], images.shape[-1]
    c = crop or size
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=g)
        off = torch.randint(size - c + 1, (batch, 2), generator=g)
        xs = torch.stack([images[i, :, r:r + c, q:q + c] for i, (r, q) in zip(idx.tolist(), off.tolist())])
        ys = torch.stack([masks[i, r:r + c, q:q + c] for i, (r, q) in zip(idx.tolist(), off.tolist())])
        yield xs, ys


def train_one(name: str, train_x, train_y, args, seed: int) -> dict:
    import timm

    from gequiv_timm.training.losses import dice_loss
    torch.manual_seed(seed)
    model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.param_groups(lr=args.lr, weight_decay=1e-4), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps)
                                                                                   / args.steps)))
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    losses = []
    for step, (x, y) in enumerate(crop_batches(train_x, train_y, args.steps, args.batch_size, args.crop, seed), 1):
        loss = dice_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if step % max(1, args.steps // 5) == 0:
            print(json.dumps(dict(model=name, seed=seed, step=step, loss=round(statistics.mean(losses[-20:]), 4),
                                  seconds=round(time.perf_counter() - t0, 1))), flush=True)
    return dict(model=model, params=params, train_seconds=time.perf_counter() - t0,
                train_cpu_seconds=time.process_time() - c0, final_loss=statistics.mean(losses[-20:]))


def step_ratios(models, args) -> dict:
    """Median train-step seconds of each model (batch / crop of the protocol), round-robin in this process."""
    import timm

    from gequiv_timm.measure import time_round_robin
    from gequiv_timm.training.losses import dice_loss
    g = torch.Generator().manual_seed(0)
    c = args.crop or 64
    x = torch.randn(args.batch_size, 1, c, c, generator=g)
    y = (torch.rand(args.batch_size, c, c, generator=g) < 0.1).long()
    fns = {}
    for name in models:
        torch.manual_seed(0)
        m = timm.create_model(name).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt):
            loss = dice_loss(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        fns[name] = step
    return time_round_robin(fns, reps=args.timing_reps, warmup=2)


def _ms(v):
    return f'{100 * v:.2f}'


def summarise(runs: list, times: dict, args, models) -> tuple:
    by = {m: [r for r in runs if r['model'] == m] for m in models}
    rows = []
    for m in models:
        rs = by[m]
        d = [r['dice'] for r in rs]
        rows.append(dict(model=m, params=rs[0]['params'], dice=statistics.mean(d),
                         dice_sd=statistics.stdev(d) if len(d) > 1 else 0.0,
                         auc=statistics.mean(r['auc'] for r in rs), accuracy=statistics.mean(r['accuracy'] for r in rs),
                         per_seed_dice=d, step_s=times.get(m),
                         step_ratio=(times[m] / times[GCNN]) if m in times and GCNN in times else None))
    lines = [f"# Segmentation benchmark (MNIST strokes, {len(args.seeds)} seeds: {', '.join(map(str, args.seeds))})",
             '',
             f"Budget, the same for every model: {args.steps} AdamW steps, lr {args.lr} (cosine), batch "
             f"{args.batch_size} random {args.crop or 64}x{args.crop or 64} crops of the 2,000 training canvases, soft "
             f"Dice loss; test: the first {args.n_test} of the 500 test canvases (64x64, digits never seen in "
             f"training), Dice / AUC of the stroke class and pixel accuracy pooled over their pixels. One torch "
             f"thread; train-step time: median of {args.timing_reps} round-robin rounds (batch {args.batch_size}, "
             f"{args.crop or 64}x{args.crop or 64}), ratio to the G-CNN (gequiv_p4_seg6), goal for the PDE nets "
             f"<= {STEP_TARGET:g}x.",
             '',
             '| model | params | Dice (%) mean +- sd | per seed | AUC (%) | accuracy (%) | train step (ms) | vs G-CNN |',
             '|---|---:|---:|---|---:|---:|---:|---:|']
    for r in rows:
        ratio = '' if r['step_ratio'] is None else f"{r['step_ratio']:.2f}x" + (
            f" {verdict(r['step_ratio'], STEP_TARGET)}" if r['model'] in PDE else '')
        step = '' if r['step_s'] is None else f"{1000 * r['step_s']:.0f}"
        lines.append(f"| {r['model']} | {r['params']:,} | {_ms(r['dice'])} +- {_ms(r['dice_sd'])} | "
                     f"{', '.join(_ms(v) for v in r['per_seed_dice'])} | {_ms(r['auc'])} | {_ms(r['accuracy'])} | "
                     f"{step} | {ratio} |")
    lines += ['', "## The claim: CDE-PDE within 1 Dice point of the baseline with at most a quarter of its parameters",
              '', '| PDE net | baseline | Dice difference (points, mean) | seeds within 1 point | param ratio | '
              'holds |', '|---|---|---:|---:|---:|---|']
    verdicts = []
    rmap = {r['model']: r for r in rows}
    for p in PDE:
        for b in BASELINES:
            if p not in rmap or b not in rmap:
                continue
            diff = rmap[p]['dice'] - rmap[b]['dice']
            seeds_ok = sum(1 for a, c in zip(rmap[p]['per_seed_dice'], rmap[b]['per_seed_dice'])
                           if a >= c - DICE_MARGIN)
            ratio = rmap[p]['params'] / rmap[b]['params']
            holds = diff >= -DICE_MARGIN and ratio <= PARAM_RATIO
            verdicts.append(dict(pde=p, baseline=b, dice_diff=diff, seeds_within=seeds_ok, param_ratio=ratio,
                                 holds=holds))
            lines.append(f"| {p} | {b} | {100 * diff:+.2f} | {seeds_ok} / {len(rmap[p]['per_seed_dice'])} | "
                         f"{ratio:.3f} | {'yes' if holds else 'no'} |")
    return '\n'.join(lines), dict(rows=rows, verdicts=verdicts)


def _command(rec) -> str:
    """The command line of a recorded run, from its arguments (runs recorded before the command was stored)."""
    return (f"benchmarks/bench_seg.py --seeds {' '.join(map(str, rec.seeds))} --steps {rec.steps} --n-test "
            f"{rec.n_test} --timing-reps {rec.recorded_timing_reps} --out {rec.out}")


def timing_only(args, argv) -> None:
    """``--timing-only``: the train-step ratios measured again (round-robin, this process) and the recorded run at
    ``--out`` re-rendered with them; its budget and accuracy numbers are kept and the timing's provenance noted."""
    import os
    import platform
    if not args.out or not Path(args.out).with_suffix('.json').exists():
        raise SystemExit(f"--timing-only needs --out pointing at a recorded run (its .json), got {args.out!r}")
    path = Path(args.out)
    old = json.loads(path.with_suffix('.json').read_text())
    rec = argparse.Namespace(**old['args'])
    models = [m for m in rec.models if m in args.models]
    rec.recorded_timing_reps = rec.timing_reps
    rec.timing_reps, rec.threads = args.timing_reps, args.threads
    c0 = time.process_time()
    load = ' '.join(f'{v:.1f}' for v in os.getloadavg())
    times = step_ratios(models, argparse.Namespace(batch_size=rec.batch_size, crop=rec.crop,
                                                   timing_reps=args.timing_reps))
    print(json.dumps({'step_seconds': times}), flush=True)
    text, summary = summarise(old['runs'], times, rec, models)
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    history = old.get('timing_history', []) + [dict(date=old.get('timing_date', 'the recorded run'),
                                                      step_seconds=old['step_seconds'])]
    text += (f"\n\nTrain-step timing rerun alone on {when} ({platform.machine()}, torch {torch.__version__}, "
             f"{args.threads} thread; load average at start {load}; "
             f"{(time.process_time() - c0) / 60:.1f} CPU-minutes): "
             f"`{' '.join(['benchmarks/bench_seg.py'] + argv)}`. "
             f"The Dice / AUC / accuracy columns are from the recorded run (command below): the kernels changed, "
             f"not the models' math (same values up to float rounding), so they were not retrained. Earlier "
             f"timings of this table (vs G-CNN): "
             + '; '.join(f"{h['date']}: " + ', '.join(f"{m} {h['step_seconds'][m] / h['step_seconds'][GCNN]:.2f}x"
                                                      for m in PDE if m in h['step_seconds'])
                         for h in history)
             + f".\n\nRecorded run: {old.get('cpu_seconds', 0) / 60:.1f} CPU-minutes "
             f"({old.get('wall_seconds', 0) / 60:.1f} min wall). Command: "
             f"`{old.get('command') or _command(rec)}`")
    result = dict(old, step_seconds=times, **summary, timing_date=when, timing_history=history,
                  timing_command=' '.join(['benchmarks/bench_seg.py'] + argv))
    report(text, result, args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--models', nargs='+', default=list(MODELS))
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    ap.add_argument('--steps', type=int, default=400, help='optimizer steps per model and seed')
    ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--crop', type=int, default=32, help='training crop side (0: whole 64x64 canvases)')
    ap.add_argument('--lr', type=float, default=5e-3)
    ap.add_argument('--n-test', type=int, default=200, help='test canvases evaluated (the first N of 500)')
    ap.add_argument('--timing-reps', type=int, default=8, help='round-robin rounds of the train-step timing')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=None, help='write the markdown table here (and .json beside it)')
    ap.add_argument('--timing-only', action='store_true',
                    help="rerun only the train-step timing and rewrite --out from its .json: the accuracy columns "
                         "(Dice / AUC / accuracy per seed) are kept from the recorded run, for changes that leave "
                         "the models' math unchanged (faster kernels, same values up to float rounding)")
    args = ap.parse_args(argv)
    for name, v, lo in (('--steps', args.steps, 1), ('--batch-size', args.batch_size, 1), ('--n-test', args.n_test, 1),
                        ('--timing-reps', args.timing_reps, 1), ('--threads', args.threads, 1)):
        if v < lo:
            ap.error(f"{name} must be >= {lo}, got {v}")
    if not 0 <= args.crop <= 64 or not args.lr > 0:
        ap.error(f"--crop must be in [0, 64] and --lr > 0, got {args.crop}, {args.lr}")
    if args.n_test > 500:
        ap.error(f"--n-test {args.n_test}: MNIST strokes has 500 test canvases")
    torch.set_num_threads(args.threads)

    import timm

    import gequiv_timm  # noqa: F401
    from gequiv_timm.data import mnist_strokes, standardize
    from gequiv_timm.training.loop import evaluate
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        ap.error(f"--models: not registered: {unknown}")
    if args.timing_only:
        return timing_only(args, list(sys.argv[1:] if argv is None else argv))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    times = step_ratios(args.models, args)
    print(json.dumps({'step_seconds': times}), flush=True)
    runs = []
    for seed in args.seeds:
        data = mnist_strokes(seed)
        tx, ty = standardize(data.train.images), data.train.masks
        test = torch.utils.data.TensorDataset(standardize(data.test.images[:args.n_test]), data.test.masks[:args.n_test])
        for name in args.models:
            res = train_one(name, tx, ty, args, seed)
            c0 = time.process_time()
            ev = evaluate(res.pop('model'), test, 'segment', batch_size=50)
            rec = dict(model=name, seed=seed, **res, dice=ev['dice'], auc=ev['auc'], accuracy=ev['accuracy'],
                       test_loss=ev['loss'], n_test=ev['n'], eval_cpu_seconds=time.process_time() - c0)
            runs.append(rec)
            print(json.dumps(rec), flush=True)
    text, summary = summarise(runs, times, args, args.models)
    total = dict(wall_seconds=time.perf_counter() - wall0, cpu_seconds=time.process_time() - cpu0)
    text += (f"\n\nTotal: {total['cpu_seconds'] / 60:.1f} CPU-minutes ({total['wall_seconds'] / 60:.1f} min wall) "
             f"for the whole run. Command: `{' '.join(['benchmarks/bench_seg.py'] + (argv or sys.argv[1:]))}`")
    report(text, dict(args=vars(args), step_seconds=times, runs=runs, **summary, **total,
                      command=' '.join(['benchmarks/bench_seg.py'] + (argv or sys.argv[1:]))), args.out)


if __name__ == '__main__':
    main()
