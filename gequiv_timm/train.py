"""Training and evaluation loops.

:func:`fit` / :func:`evaluate` are small, deterministic (for a seed, on the CPU) loops over tensor datasets,
used by ``gequiv-timm train``, ``gequiv-timm compare`` and the benchmarks. They use timm's optimizer factory.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ['fit', 'evaluate', 'FitResult', 'seed_everything']


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (and python's) and return a fresh generator for data order."""
    import random
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class FitResult:
    epochs: int
    steps: int
    seconds: float
    history: List[Dict[str, float]] = field(default_factory=list)


def _progress(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def fit(model: nn.Module, train: Dataset, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3,
        weight_decay: float = 1e-4, opt: str = 'adamw', seed: int = 0, progress: bool = False,
        time_budget: Optional[float] = None, loss_fn: Optional[Callable] = None,
        augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
        device: Optional[torch.device] = None, log: Optional[Callable[[Dict[str, float]], None]] = None,
        desc: str = 'train') -> FitResult:
    """Train ``model`` on ``train`` (a dataset of ``(x, y)``) with AdamW and a cosine schedule.

    Args:
        epochs: passes over the data. With ``time_budget`` (seconds), training stops at the first epoch
            boundary after the budget is spent (the cosine schedule still assumes ``epochs``).
        seed: seeds initial data order and any augmentation; model init is the caller's business.
        augment: optional ``fn(x, generator) -> x`` applied to every batch.
        loss_fn: defaults to cross-entropy.
    Returns:
        a :class:`FitResult` with the per-epoch history (loss, train error, seconds).
    """
    from timm.optim import create_optimizer_v2
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay)
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    loss_fn = loss_fn or F.cross_entropy
    aug_gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    result = FitResult(0, 0, 0.0)
    for epoch in range(epochs):
        model.train()
        tot_loss, tot_err, n = 0.0, 0, 0
        for x, y in _progress(loader, progress, f'{desc} {epoch + 1}/{epochs}'):
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x, aug_gen)
            out = model(x)
            loss = loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.steps += 1
            tot_loss += loss.item() * len(y)
            if out.dim() == 2 and y.dim() == 1:
                tot_err += (out.argmax(1) != y).sum().item()
            n += len(y)
        rec = dict(epoch=epoch + 1, loss=tot_loss / n, train_error=tot_err / n,
                   seconds=time.perf_counter() - t0)
        result.history.append(rec)
        result.epochs = epoch + 1
        if log is not None:
            log(rec)
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 500, device: Optional[torch.device] = None
             ) -> Dict[str, float]:
    """Top-1 error and mean cross-entropy of a classifier on ``data`` (eval mode)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    err, loss, n = 0, 0.0, 0
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction='sum').item()
        err += (out.argmax(1) != y).sum().item()
        n += len(y)
    model.train(was_training)
    return dict(error=err / n, loss=loss / n, n=n)


# ----- `gequiv-timm train` --------------------------------------------------------------------------------
DATASETS = ('rotmnist', 'rotmnist-upright')


def add_arguments(p) -> None:
    p.add_argument('model', help='registered model name, e.g. gequiv_p4cnn')
    p.add_argument('--data', default='rotmnist', choices=DATASETS, help='built-in data set (default rotmnist)')
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--seed', type=int, default=0, help='seeds the data split, the init and the data order')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--out', help='write the trained weights here (.safetensors)')
    p.add_argument('--tag', default='', help='pretrained tag recorded in the file and the manifest')
    p.add_argument('--manifest', help='add/replace NAME.TAG in this weights manifest (JSON)')
    p.add_argument('--no-progress', action='store_true')


def run(args) -> int:
    import json
    import shlex
    import sys

    import timm
    from .data import rotated_mnist
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in timm.list_models('gequiv_*'):
        print(f"gequiv-timm train: unknown model {args.model!r}; see `gequiv-timm list`", file=sys.stderr)
        return 2
    protocol = 'upright' if args.data == 'rotmnist-upright' else 'rotated'
    data = rotated_mnist(args.seed, protocol=protocol)
    seed_everything(args.seed)
    model = timm.create_model(args.model)
    res = fit(model, data.train.dataset(), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
              weight_decay=args.weight_decay, seed=args.seed, progress=not args.no_progress, desc=args.model)
    ev = evaluate(model, data.test.dataset())
    metrics = {'test_error': round(ev['error'], 4), 'test_split': f'{args.data} seed {args.seed} (1,000 digits)',
               'seed': args.seed, 'epochs': res.epochs, 'train_seconds': round(res.seconds, 1)}
    print(json.dumps({'model': args.model, **metrics}))
    if args.out:
        from .hub import save_weights, update_manifest
        command = 'gequiv-timm train ' + ' '.join(shlex.quote(a) for a in sys.argv[2:])
        recipe = f'{args.data}/adamw-cosine/lr{args.lr}/bs{args.batch_size}/ep{args.epochs}/seed{args.seed}'
        info = save_weights(model, args.out, args.model, args.tag, recipe, extra={'metrics': metrics})
        print(f"wrote {args.out} sha256={info['sha256']}")
        if args.manifest and args.tag:
            update_manifest(args.manifest, f'{args.model}.{args.tag}', {
                'file': info['file'], 'sha256': info['sha256'], 'size': info['size'], 'metrics': metrics,
                'recipe': recipe, 'command': command, 'budget': f'{res.epochs} epochs, {res.seconds:.0f} s',
                'hf_hub_id': f'gequiv-timm/{args.model}.{args.tag}'})
    return 0
