"""Train or fine-tune a registered model.

``gequiv-timm train MODEL --data SET_OR_FOLDER [...]``: parses and checks the options, then runs
:func:`gequiv_timm.training.recipe.run_job` with plain values (a :class:`~gequiv_timm.training.TrainJob`).
"""
from __future__ import annotations

import argparse
import ast
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..data.catalog import describe
from ..training import recipe
from ..training.distributed import init_distributed
from ..training.loop import amp_dtype
from ..training.trainer import TrainConfig
from ._common import check_input_file, check_model_args
from ._errors import reports_errors

__all__ = ['add_arguments', 'run']


def _parse_kwargs(items: List[str]) -> Dict[str, Any]:
    out = {}
    for it in items or []:
        if '=' not in it:
            raise ValueError(f"--model-kwargs expects key=value items, got {it!r}")
        k, v = it.split('=', 1)
        if not k.isidentifier():
            raise ValueError(f"--model-kwargs: {k!r} is not a valid argument name")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _model_and_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('model and data')
    g.add_argument('model', help='registered model name, e.g. gequiv_p4cnn (see `gequiv-timm list`)')
    g.add_argument('--data', default='rotmnist', metavar='SET_OR_FOLDER',
                   help="built-in set (see above) or an image folder (default rotmnist)")
    g.add_argument('--pretrained', action='store_true', help="start from the model's pretrained weights")
    g.add_argument('--initial-checkpoint', metavar='FILE', help='start from these weights (.safetensors)')
    g.add_argument('--num-classes', type=int, help='classifier size (default: from the data)')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra model arguments, e.g. widths=[8,8,8] drop_rate=0.1')
    g.add_argument('--limit-train', type=int, metavar='N',
                   help='use a fixed (seeded) random subset of N training samples')
    g.add_argument('--limit-eval', type=int, metavar='N',
                   help='evaluate on a fixed (seeded) random subset of N held-out samples')
    g.add_argument('--no-aug', action='store_true', help='image folders: no training augmentation')
    g.add_argument('--hflip', type=float, default=0.5, help='image folders: horizontal flip probability')
    g.add_argument('--workers', type=int, default=0, help='data loader worker processes (default 0)')


def _optimisation(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group('optimisation (timm factories)')
    o.add_argument('--epochs', type=int, default=20)
    o.add_argument('--batch-size', type=int, default=64, help='per process; global batch = this x processes')
    o.add_argument('--lr', type=float, default=3e-3)
    o.add_argument('--weight-decay', type=float, default=1e-4)
    o.add_argument('--opt', default='adamw', help="timm optimizer name (create_optimizer_v2), default adamw")
    o.add_argument('--momentum', type=float, default=0.9)
    o.add_argument('--layer-decay', type=float, help="layer-wise lr decay through the model's group_matcher")
    o.add_argument('--sched', default='cosine', help='timm scheduler name (create_scheduler_v2), default cosine')
    o.add_argument('--warmup-epochs', type=int, default=0)
    o.add_argument('--min-lr', type=float, default=0.0)
    o.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    o.add_argument('--clip-grad', type=float, help='clip the gradient norm to this value')
    o.add_argument('--max-steps', type=int, help='stop after this many optimizer steps')
    o.add_argument('--seed', type=int, default=0, help='seeds the data split, the init and the data order')


def _devices(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group('devices, precision, distributed')
    r.add_argument('--device', choices=('cpu', 'cuda'), help='default: cuda when available')
    r.add_argument('--amp', default='auto', choices=('auto', 'off', 'bf16', 'fp16'),
                   help='mixed precision (auto: bf16/fp16 on CUDA, off on the CPU)')
    r.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    r.add_argument('--deterministic', action='store_true', help='torch deterministic algorithms')
    r.add_argument('--freeze-bn', action='store_true',
                   help='batch norm in eval mode (running statistics fixed): common when fine-tuning small batches')
    r.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across processes (CUDA only)')
    r.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')


def _outputs(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group('outputs, checkpoints, resume')
    c.add_argument('--out', help='write the trained weights here (.safetensors)')
    c.add_argument('--tag', default='', help='pretrained tag recorded in the file and the manifest')
    c.add_argument('--manifest', help='add/replace NAME.TAG in this weights manifest (JSON)')
    c.add_argument('--checkpoint-dir', metavar='DIR', help='write resumable checkpoints here')
    c.add_argument('--checkpoint-every', type=int, default=100, metavar='N',
                   help='checkpoint every N steps (and at every epoch end); default 100')
    c.add_argument('--keep-checkpoints', type=int, default=2, metavar='K', help='keep the newest K (default 2)')
    c.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                   help='continue from the newest checkpoint in --checkpoint-dir (or from folder CKPT)')
    c.add_argument('--metrics-log', dest='log', metavar='FILE', help='metrics log: .csv or .jsonl')
    c.add_argument('--log-every', type=int, default=10, metavar='N', help='log every N steps (default 10)')
    c.add_argument('--eval-every-epoch', action='store_true', help='evaluate after every epoch (logged)')
    c.add_argument('--no-progress', action='store_true')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ((p.description or 'Train or fine-tune a model').rstrip('.') + '. Built-in data sets: ' +
                     '; '.join(describe()) +
                     '. Or give a folder of images: class sub-folders, optionally inside train/ and val/.')
    _model_and_data(p)
    _optimisation(p)
    _devices(p)
    _outputs(p)


def _range_errors(args) -> List[str]:
    def bad(name, v, cond, what):
        return None if v is None or cond(v) else f"{name} must be {what}, got {v!r}"
    fin = math.isfinite
    checks = [
        bad('--epochs', args.epochs, lambda v: v >= 1, 'at least 1'),
        bad('--batch-size', args.batch_size, lambda v: v >= 1, 'at least 1'),
        bad('--lr', args.lr, lambda v: fin(v) and v > 0, 'a positive number'),
        bad('--weight-decay', args.weight_decay, lambda v: fin(v) and v >= 0, 'a number >= 0'),
        bad('--momentum', args.momentum, lambda v: fin(v) and 0 <= v < 1, 'in [0, 1)'),
        bad('--layer-decay', args.layer_decay, lambda v: fin(v) and 0 < v <= 1, 'in (0, 1]'),
        bad('--warmup-epochs', args.warmup_epochs, lambda v: 0 <= v < args.epochs, 'in [0, --epochs)'),
        bad('--min-lr', args.min_lr, lambda v: fin(v) and 0 <= v, 'a number >= 0'),
        bad('--smoothing', args.smoothing, lambda v: 0 <= v < 1, 'in [0, 1)'),
        bad('--clip-grad', args.clip_grad, lambda v: fin(v) and v > 0, 'a positive number'),
        bad('--max-steps', args.max_steps, lambda v: v >= 1, 'at least 1'),
        bad('--num-classes', args.num_classes, lambda v: v >= 1, 'at least 1'),
        bad('--limit-train', args.limit_train, lambda v: v >= 1, 'at least 1'),
        bad('--limit-eval', args.limit_eval, lambda v: v >= 1, 'at least 1'),
        bad('--hflip', args.hflip, lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
        bad('--workers', args.workers, lambda v: v >= 0, '>= 0'),
        bad('--threads', args.threads, lambda v: v >= 0, '>= 0'),
        bad('--checkpoint-every', args.checkpoint_every, lambda v: v >= 0, '>= 0 (0: only at epoch ends)'),
        bad('--keep-checkpoints', args.keep_checkpoints, lambda v: v >= 1, 'at least 1'),
        bad('--log-every', args.log_every, lambda v: v >= 0, '>= 0'),
        bad('--seed', args.seed, lambda v: 0 <= v < 2 ** 31, 'in [0, 2**31)'),
    ]
    return [c for c in checks if c]


def _check_args(args) -> Optional[str]:
    errs = _range_errors(args)
    if args.resume == 'auto' and not args.checkpoint_dir:
        errs.append('--resume without a folder needs --checkpoint-dir (where to look for the newest checkpoint)')
    if args.manifest and not (args.out and args.tag):
        errs.append('--manifest needs --out and --tag (the manifest entry is NAME.TAG -> the written file)')
    if args.out and not str(args.out).endswith('.safetensors'):
        errs.append(f"--out must name a .safetensors file, got {args.out!r}")
    if args.tag and not all(ch.isalnum() or ch in '_-' for ch in args.tag):
        errs.append(f"--tag must be letters, digits, '_' or '-', got {args.tag!r}")
    return '; '.join(errs) if errs else None


def _config(args) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       opt=args.opt, momentum=args.momentum, layer_decay=args.layer_decay, sched=args.sched,
                       warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, smoothing=args.smoothing,
                       clip_grad=args.clip_grad, seed=args.seed, amp=args.amp, workers=args.workers,
                       max_steps=args.max_steps, checkpoint_dir=args.checkpoint_dir,
                       checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                       resume=args.resume, log_path=args.log, log_every=args.log_every,
                       eval_every_epoch=args.eval_every_epoch, progress=not args.no_progress,
                       freeze_bn=args.freeze_bn, sync_bn=args.sync_bn, channels_last=args.channels_last,
                       deterministic=args.deterministic)


def _job(args, model_kwargs: Dict[str, Any]) -> recipe.TrainJob:
    command = 'gequiv-timm train ' + ' '.join(shlex.quote(a) for a in sys.argv[2:])
    return recipe.TrainJob(args.model, _config(args), data=args.data, model_kwargs=model_kwargs,
                           pretrained=args.pretrained, initial_checkpoint=args.initial_checkpoint,
                           num_classes=args.num_classes, augment=not args.no_aug, hflip=args.hflip,
                           limit_train=args.limit_train, limit_eval=args.limit_eval, out=args.out, tag=args.tag,
                           manifest=args.manifest, command=command)


def _check_optim(args) -> None:
    """Build the optimizer and the scheduler the run would build, on a one-parameter stand-in: an unknown --opt /
    --sched or a value they refuse is an error now, not after the data is loaded."""
    from ..training.trainer import _optimizer, _scheduler
    cfg = _config(args)
    try:
        opt = _optimizer(torch.nn.Linear(1, 1), cfg)
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise ValueError(f"--opt {args.opt}: {e}; see timm.optim.list_optimizers()") from None
    try:
        _scheduler(opt, cfg, 1)
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise ValueError(f"--sched {args.sched}: {e or 'not supported with per-step updates'}; use e.g. cosine, "
                         f"step, multistep, poly, tanh, constant") from None


def _check_before_work(args, model_kwargs: Dict[str, Any]) -> None:
    """Everything that can be checked without the data: values, model arguments, inputs, optimizer, outputs."""
    err = _check_args(args)
    if err:
        raise ValueError(err)
    for key, option in (('num_classes', '--num-classes'), ('pretrained', '--pretrained'),
                        ('checkpoint_path', '--initial-checkpoint')):
        if key in model_kwargs:
            raise ValueError(f"--model-kwargs {key}=...: use {option} instead")
    if args.initial_checkpoint:
        check_input_file(args.initial_checkpoint, '--initial-checkpoint', 'weights file')
    if args.resume not in (None, 'auto') and not Path(args.resume).is_dir():
        raise ValueError(f"--resume {args.resume}: no such folder; give a checkpoint folder (or its parent "
                         f"--checkpoint-dir), or --resume alone with --checkpoint-dir")
    kw = dict(model_kwargs)
    if args.num_classes:
        kw['num_classes'] = args.num_classes
    check_model_args(args.model, kw, '--model-kwargs')
    _check_optim(args)


@reports_errors('train')
def run(args) -> int:
    model_kwargs = _parse_kwargs(args.model_kwargs)
    _check_before_work(args, model_kwargs)
    job = _job(args, model_kwargs)
    recipe.check_outputs(job)  # run_job checks them again first thing; here they come before init_distributed
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dist = init_distributed(args.device)
    except RuntimeError as e:  # no CUDA device although --device cuda, a process group that cannot start
        raise ValueError(str(e)) from None
    try:
        amp_dtype(args.amp, dist.device)
        recipe.run_job(job, dist, verbose=not args.no_progress)
        return 0
    finally:
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
