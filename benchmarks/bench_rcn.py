"""Keypoint heads on one backbone, one budget, one seed: RCN vs SumNet vs single-scale vs coordinate regression.

Data: MNIST landmarks (gequiv_timm.data.landmarks): 4,000 train / 1,000 test real digits placed at random (rotation
+-30 deg, scale 1.0-1.8, shift +-14 px) into 64x64 canvases, K = 5 keypoints; NME normalised by the digit's box
size ``scale * sqrt(w h)``. Every model: the same timm resnet18 (random init, in_chans=1), the same seed for
init and data order, AdamW, the same number of optimiser steps at the same batch size, cosine schedule.
Optionally (``--denoiser``) a denoising keypoint model is trained on the train keypoints and joined with the RCN.

Run (about 20-25 min on one busy CPU thread)::

    nice -n 10 .venv/bin/python benchmarks/bench_rcn.py --steps 240 --batch-size 32 --seed 0 --denoiser

Writes benchmarks/results/rcn.json and benchmarks/results/rcn.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import gequiv_timm  # noqa: F401  (registers the models)
from gequiv_timm.data.landmarks import mnist_landmarks
from gequiv_timm.data.mnist import MNIST_MEAN, MNIST_STD
from gequiv_timm.layers.rcn import (
    DenoisingKeypointModel,
    argmax_keypoints,
    corrupt_keypoints,
    decode_heatmaps,
    heatmap_cross_entropy,
    joint_log_probs,
    keypoints_to_onehot,
)
from gequiv_timm.measure import time_round_robin
from gequiv_timm.metrics import keypoint_metrics, per_sample_nme

RESULTS = Path(__file__).resolve().parent / 'results'

MODELS = [  # (label, timm name)
    ('RCN (recombinator)', 'gequiv_rcn_resnet18'),
    ('SumNet', 'gequiv_sumnet_resnet18'),
    ('single-scale (last level, upsampled)', 'gequiv_kpsingle_resnet18'),
    ('coordinate regression (linear on pooled)', 'gequiv_kpreg_resnet18'),
]


def _norm(x):
    return (x - MNIST_MEAN[0]) / MNIST_STD[0]


def _batches(n, batch_size, steps, gen):
    """``steps`` index batches from repeated seeded permutations of ``range(n)``."""
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < batch_size:
            perm = torch.cat([perm, torch.randperm(n, generator=gen)])
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


def _lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def train_model(name, data, args, log):
    torch.manual_seed(args.seed)
    model = timm.create_model(name, in_chans=1)  # grayscale landmark canvases (the models default to RGB)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    tr = data.train
    x_all = _norm(tr.images)
    batches = _batches(len(tr), args.batch_size, args.steps, torch.Generator().manual_seed(args.seed))
    times, losses = [], []
    model.train()
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g['lr'] = _lr_at(step, args.steps, args.lr, args.warmup)
        t0 = time.perf_counter()
        out = model(x_all[idx])
        loss = model.loss(out, tr.keypoints[idx], tr.visible[idx], image_size=(64, 64))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            log(f"  {name} step {step:4d}/{args.steps} loss {loss.item():.4f} ({times[-1]:.2f}s/step)")
    return model, times, losses


@torch.no_grad()
def predict(model, images, batch_size=100):
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(model(_norm(images[i:i + batch_size])))
    return torch.cat(outs)


def score(pred, split):
    m = keypoint_metrics(pred, split.keypoints, split.norm, split.visible, threshold=0.1)
    return m.as_dict()


def train_denoiser(data, args, log):
    """The paper's keypoint model on the train keypoints: a fraction moved at random, predict the true ones."""
    torch.manual_seed(args.seed)
    den = DenoisingKeypointModel(5, width=16, depth=4)
    opt = torch.optim.AdamW(den.parameters(), lr=2e-3, weight_decay=1e-4)
    tr = data.train
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = _batches(len(tr), 64, args.denoiser_steps, torch.Generator().manual_seed(args.seed))
    den.train()
    t_start = time.perf_counter()
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g['lr'] = _lr_at(step, args.denoiser_steps, 2e-3, 20)
        kp, vis = tr.keypoints[idx], tr.visible[idx]
        noisy, _ = corrupt_keypoints(kp, (64, 64), args.corrupt_fraction, visible=vis, generator=gen)
        out = den(keypoints_to_onehot(noisy, (64, 64), visible=vis))
        loss = heatmap_cross_entropy(out, kp, vis)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.denoiser_steps - 1:
            log(f"  denoiser step {step:4d}/{args.denoiser_steps} loss {loss.item():.4f}")
    return den.eval(), time.perf_counter() - t_start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=240)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--n-test', type=int, default=None, help='score only the first N test digits (smoke runs)')
    p.add_argument('--models', nargs='*', default=None, help='subset of timm names')
    p.add_argument('--denoiser', action='store_true', help='also train the denoising keypoint model, join it')
    p.add_argument('--denoiser-steps', type=int, default=300)
    p.add_argument('--corrupt-fraction', type=float, default=0.3)
    p.add_argument('--timing-rounds', type=int, default=7)
    p.add_argument('--out', default='rcn', help='results file stem in benchmarks/results/')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    data = mnist_landmarks(seed=args.seed)
    test = data.test
    if args.n_test:
        test = type(test)(*(getattr(test, f)[:args.n_test] for f in
                            ('images', 'keypoints', 'visible', 'norm', 'labels', 'angle', 'scale', 'shift')))
    log(f"data: {len(data.train)} train / {len(test)} test, built in {time.perf_counter() - t0:.1f}s; "
        f"{data.config}")
    rows = []
    rcn_logits = None
    per_sample = {}
    # reference: every keypoint at its mean training position (what a model that ignores the image can do)
    tr = data.train
    vis = tr.visible[..., None].float()
    mean_kp = (tr.keypoints * vis).sum(0) / vis.sum(0).clamp_min(1)
    trivial = score(mean_kp.expand_as(test.keypoints), test)
    log(f"== trivial (mean training keypoint): {json.dumps(trivial)}")
    models = [m for m in MODELS if args.models is None or m[1] in args.models]
    for label, name in models:
        log(f"== {label}: {name}")
        t1 = time.perf_counter()
        model, times, losses = train_model(name, data, args, log)
        train_s = time.perf_counter() - t1
        n_params = sum(q.numel() for q in model.parameters())
        n_head = sum(q.numel() for q in model.head.parameters())
        out = predict(model, test.images)
        row = dict(label=label, model=name, params=n_params, head_params=n_head,
                   step_s_median=statistics.median(times[1:] or times), train_s=train_s,
                   final_loss=statistics.mean(losses[-20:]))
        if model.head_type == 'regression':
            pred = out  # pixel coordinates
            row['metrics'] = {'direct': score(pred, test)}
            per_sample[name] = per_sample_nme(pred, test.keypoints, test.norm, test.visible)
        else:
            row['metrics'] = {}
            for method, window in (('argmax', None), ('soft_argmax', 5)):
                pred, _ = decode_heatmaps(out, method, 1, window)
                row['metrics'][method] = score(pred, test)
                if method == 'soft_argmax':
                    per_sample[name] = per_sample_nme(pred, test.keypoints, test.norm, test.visible)
            if model.head_type == 'rcn':
                rcn_logits = out
        log(f"  -> {json.dumps(row['metrics'])}  params {n_params:,} (head {n_head:,}), "
            f"{row['step_s_median']:.2f}s/step")
        rows.append(row)

    # paired bootstrap of the NME difference between heads (same test digits), 95% interval
    paired = []
    names = [n for _, n in models if n in per_sample]
    gen = torch.Generator().manual_seed(args.seed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = per_sample[a] - per_sample[b]
            d = d[~torch.isnan(d)]
            idx = torch.randint(0, len(d), (2000, len(d)), generator=gen)
            boots = d[idx].mean(1)
            lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype)).tolist()
            paired.append(dict(a=a, b=b, nme_diff=float(d.mean()), ci95=[lo, hi],
                               a_better_frac=float((d < 0).double().mean())))
    for pr in paired:
        log(f"  NME({pr['a']}) - NME({pr['b']}) = {100 * pr['nme_diff']:+.2f} pts, 95% CI "
            f"[{100 * pr['ci95'][0]:+.2f}, {100 * pr['ci95'][1]:+.2f}]")

    # step time, measured side by side: rounds of one training step per model on the same batch, interleaved so
    # that the load of a shared machine falls on every model alike
    log("== step time (interleaved)")
    timing_models = {}
    for _, name in models:
        torch.manual_seed(args.seed)
        mdl = timm.create_model(name, in_chans=1).train()
        timing_models[name] = (mdl, torch.optim.AdamW(mdl.parameters(), lr=1e-4))
    xb = _norm(data.train.images[:args.batch_size])
    kb, vb = data.train.keypoints[:args.batch_size], data.train.visible[:args.batch_size]
    def train_step(mdl, opt):
        def step():
            loss = mdl.loss(mdl(xb), kb, vb, image_size=(64, 64))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    # one warm-up round, then medians of timing_rounds rounds whose order rotates every round
    step_s = time_round_robin({name: train_step(mdl, opt) for name, (mdl, opt) in timing_models.items()},
                              reps=args.timing_rounds, warmup=1)
    for row in rows:
        row['step_s_interleaved'] = step_s[row['model']]
    base = next((r['step_s_interleaved'] for r in rows if r['model'] == 'gequiv_kpsingle_resnet18'), None)
    for row in rows:
        row['step_time_vs_single'] = row['step_s_interleaved'] / base if base else None
    del timing_models

    joint = None
    if args.denoiser and rcn_logits is not None:
        log("== denoising keypoint model")
        den, den_s = train_denoiser(data, args, log)
        with torch.no_grad():
            # denoiser alone on corrupted *test* keypoints (how well it repairs moved points)
            gen = torch.Generator().manual_seed(args.seed + 2)
            noisy, moved = corrupt_keypoints(test.keypoints, (64, 64), args.corrupt_fraction, visible=test.visible,
                                             generator=gen)
            den_out = den(keypoints_to_onehot(noisy, (64, 64), visible=test.visible))
            repaired, _ = argmax_keypoints(den_out)
            # joint: RCN argmax -> one-hot -> denoiser; combine log-probabilities
            rcn_xy, _ = argmax_keypoints(rcn_logits)
            den_on_rcn = den(keypoints_to_onehot(rcn_xy, (64, 64)))
            jl = joint_log_probs(rcn_logits, den_on_rcn)
        joint = dict(train_s=den_s, params=sum(q.numel() for q in den.parameters()), steps=args.denoiser_steps,
                     corrupt_fraction=args.corrupt_fraction,
                     noisy_input=score(noisy, test), denoised=score(repaired, test),
                     moved_points_fixed=float(((repaired - test.keypoints).norm(dim=-1)[moved] <= 2.0).float().mean())
                     if moved.any() else None,
                     joint={m: score(decode_heatmaps(jl, m, 1, w)[0], test)
                            for m, w in (('argmax', None), ('soft_argmax', 5))})
        log(f"  -> {json.dumps(joint)}")

    result = dict(
        command='nice -n 10 .venv/bin/python benchmarks/bench_rcn.py ' + ' '.join(argv if argv is not None
                                                                               else sys.argv[1:]),
        seed=args.seed, steps=args.steps, timing_rounds=args.timing_rounds, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup, threads=args.threads, data=dict(data.config, n_train=len(data.train), n_test=len(test)),
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
        machine=platform.machine(), rows=rows, trivial=trivial, paired=paired, denoiser=joint, wall_s=time.perf_counter() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f'{args.out}.json').write_text(json.dumps(result, indent=2))
    (RESULTS / f'{args.out}.md').write_text(render_md(result))
    log(render_md(result))
    return result


def render_md(r):
    lines = [
        '# Keypoint heads on MNIST landmarks (one run)',
        '',
        f"Command: `{r['command']}`  ",
        f"Seed {r['seed']}; {r['steps']} AdamW steps of batch {r['batch_size']} "
        f"(~{r['steps'] * r['batch_size'] / r['data']['n_train']:.1f} epochs of {r['data']['n_train']} train digits), "
        f"lr {r['lr']} (warm-up {r['warmup']}, cosine), weight decay {r['weight_decay']}; "
        f"torch.set_num_threads({r['threads']}) on a shared CPU; torch {r['torch']}, timm {r['timm']}.  ",
        f"Test: {r['data']['n_test']} real digits, 64x64 canvases, rotation +-{r['data']['rotation']} deg, "
        f"scale {r['data']['scale']}, shift +-{r['data']['translate']} px; K = 5 (top, bottom, left, right, "
        f"centroid).  ",
        "NME: mean over visible keypoints of the error / (digit box size `scale * sqrt(w h)`), averaged over "
        "digits; FR@0.1: fraction of digits with NME > 0.1; AUC@0.1: area under the CED curve on [0, 0.1] / 0.1. "
        "Backbone: timm resnet18, random init, in_chans=1, same init seed for every model.",
        '',
        '| head | decode | NME (%) | FR@0.1 (%) | AUC@0.1 | params (head) | step time (s) | vs single |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in r['rows']:
        for method, m in row['metrics'].items():
            ratio = row.get('step_time_vs_single')
            lines.append(f"| {row['label']} (`{row['model']}`) | {method} | {100 * m['nme']:.2f} | "
                         f"{100 * m['failure_rate']:.1f} | {m['auc']:.3f} | {row['params'] / 1e6:.2f}M "
                         f"({row['head_params'] / 1e6:.2f}M) | {row['step_s_interleaved']:.2f} | "
                         f"{'%.2fx' % ratio if ratio else '-'} |")
    t = r.get('trivial')
    if t:
        lines.append(f"| reference: every keypoint at its mean training position | - | {100 * t['nme']:.2f} | "
                     f"{100 * t['failure_rate']:.1f} | {t['auc']:.3f} | 0 | - | - |")
    lines += ['', "Step time: median of one training step (forward + backward + AdamW, batch "
              f"{r['batch_size']}) over {r['timing_rounds']} interleaved rounds, one thread, on a machine shared "
              "with other jobs; the ratio to the single-scale head is the number to trust."]
    if r.get('paired'):
        lines += ['', 'Paired differences on the same test digits (soft-argmax decoding; bootstrap over digits, 2,000 '
                  'resamples):', '', '| A | B | NME(A) - NME(B) (pts) | 95% CI | digits where A is closer |',
                  '|---|---|---:|---:|---:|']
        for pr in r['paired']:
            lines.append(f"| `{pr['a']}` | `{pr['b']}` | {100 * pr['nme_diff']:+.2f} | "
                         f"[{100 * pr['ci95'][0]:+.2f}, {100 * pr['ci95'][1]:+.2f}] | {100 * pr['a_better_frac']:.0f}% |")
    d = r.get('denoiser')
    if d:
        lines += [
            '',
            f"Denoising keypoint model ({d['params']:,} params, {d['steps']} steps of batch 64, "
            f"{int(100 * d['corrupt_fraction'])}% of points moved at random):",
            '',
            '| input | decode | NME (%) | FR@0.1 (%) | AUC@0.1 |',
            '|---|---|---:|---:|---:|',
            f"| corrupted test keypoints (denoiser input) | - | {100 * d['noisy_input']['nme']:.2f} | "
            f"{100 * d['noisy_input']['failure_rate']:.1f} | {d['noisy_input']['auc']:.3f} |",
            f"| denoiser output on them | argmax | {100 * d['denoised']['nme']:.2f} | "
            f"{100 * d['denoised']['failure_rate']:.1f} | {d['denoised']['auc']:.3f} |",
        ]
        for method, m in d['joint'].items():
            lines.append(f"| joint RCN x denoiser (test images) | {method} | {100 * m['nme']:.2f} | "
                         f"{100 * m['failure_rate']:.1f} | {m['auc']:.3f} |")
        if d.get('moved_points_fixed') is not None:
            lines.append('')
            lines.append(f"Moved points put back within 2 px by the denoiser: {100 * d['moved_points_fixed']:.1f}%.")
    lines += ['', f"Wall time of the whole run: {r['wall_s'] / 60:.1f} min.", '']
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
