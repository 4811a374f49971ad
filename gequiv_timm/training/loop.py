"""The training loop and the evaluation, shared by every trainer in the package.

* :class:`Stepper`: one optimizer step (forward under autocast, the task's loss, an STN's regulariser, backward
  through the AMP scaler, clipping, update). :func:`run_epoch` drives it over a loader.
* :func:`gequiv_timm.training.trainer.train` (the engine behind ``gequiv-timm train``) runs them too.
* :func:`fit`: the small deterministic loop of ``gequiv-timm compare`` and the benchmarks (AdamW, per-step cosine,
  a seeded shuffling loader), the same :class:`Stepper` and :func:`run_epoch`.
* :func:`evaluate`: one evaluation for every task (top-1 error, the NME, or Dice / AUC / accuracy of
  :mod:`gequiv_timm.metrics`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import DistInfo, all_sum
from .losses import batch_loss, dice_loss

__all__ = ['seed_everything', 'to_channels_last', 'amp_dtype', 'Stepper', 'run_epoch', 'evaluate', 'FitResult',
           'fit', 'progress_bar', 'TrainingDiverged']


class TrainingDiverged(RuntimeError):
    """Training diverged: the loss (or, without loss scaling, the gradient norm) became NaN or infinite.

    Attributes: ``step`` (the 1-based optimizer step), ``loss`` (its loss), ``grad_norm`` (the gradient norm when
    that is what became non-finite, else None). Raised by :class:`Stepper` before the update, so the weights (and
    every checkpoint) hold only finite values. The message is one line naming the step, the value and the fix.
    """

    def __init__(self, step: int, loss: float, grad_norm: Optional[float] = None):
        self.step, self.loss = int(step), float(loss)
        self.grad_norm = None if grad_norm is None else float(grad_norm)
        what = f"the loss is {self.loss}" if grad_norm is None else \
            f"the gradient norm is {self.grad_norm} (loss {self.loss:.4g})"
        super().__init__(f"training diverged: {what} at step {self.step}. Lower the learning rate (--lr), clip "
                         f"gradients (--clip-grad 1.0) or train in float32 (--amp off), then start again or resume "
                         f"from the last checkpoint (--resume)")


def _grad_norm(model: nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (and python's) and return a fresh generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress_bar(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of an ``--amp`` setting (``None``: float32)."""
    if amp == 'off':
        return None
    if amp == 'auto':
        if device.type != 'cuda':
            return None  # CPU autocast is slower than float32 for these small convolutions
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ('bf16', 'bfloat16'):
        return torch.bfloat16
    if amp in ('fp16', 'float16'):
        if device.type != 'cuda':
            raise ValueError("--amp fp16 needs a CUDA device (float16 autocast with loss scaling); on the CPU use "
                             "--amp bf16 or --amp off")
        return torch.float16
    raise ValueError(f"--amp must be auto, off, bf16 or fp16, got {amp!r}")


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)`` for every 4-D parameter and buffer.

    torch's own ``Module.to(memory_format=...)`` also tries to convert 5-D tensors (the group convolutions'
    ``[C_out, C_in, |G_in|, k, k]`` weights) and fails; they are left as they are here (their expanded 4-D filter
    bank is built on the fly at every forward anyway).
    """
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p is not None and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        for name, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.dim() == 4:
                setattr(mod, name, b.contiguous(memory_format=torch.channels_last))
    return model


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----- one step, one epoch ---------------------------------------------------------------------------------------
@dataclass
class Stepper:
    """One optimizer step on a batch ``(x, target...)``. ``model`` runs the forward (a DDP wrapper or the model
    itself), ``raw`` is the model underneath (its ``transform_loss``, its parameters for clipping).
    ``loss_fn(out, y)`` replaces the task's loss (:func:`~gequiv_timm.training.losses.batch_loss`);
    ``augment(x, generator)`` changes every input batch."""

    model: nn.Module
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    task: str = 'classify'
    num_keypoints: int = 0
    amp: Optional[torch.dtype] = None
    smoothing: float = 0.0
    clip_grad: Optional[float] = None
    channels_last: bool = False
    loss_fn: Optional[Callable] = None
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    aug_gen: Optional[torch.Generator] = None

    def _loss(self, out: torch.Tensor, batch: List[torch.Tensor]) -> Tuple[torch.Tensor, List[float]]:
        if self.loss_fn is None:
            return batch_loss(self.task, out, batch, self.num_keypoints, self.smoothing)
        y = batch[1]
        err = float((out.argmax(1) != y).sum()) if out.dim() == 2 and y.dim() == 1 else 0.0
        return self.loss_fn(out, y), [err, float(len(y))]

    def __call__(self, batch, step: int) -> Tuple[torch.Tensor, List[float]]:
        """``(loss, [statistic sum, count])`` of step ``step`` (1-based, for the error message) after the update.
        A NaN / infinite loss or gradient norm raises :class:`TrainingDiverged` before the update."""
        batch = [b.to(self.device, non_blocking=True) for b in batch]
        if self.augment is not None:
            batch[0] = self.augment(batch[0], self.aug_gen)
        if self.channels_last:
            batch[0] = batch[0].contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(batch[0])
        loss, stats = self._loss(out, batch)
        if hasattr(self.raw, 'transform_loss'):  # an STN's regulariser toward the identity (0 when disabled)
            loss = loss + self.raw.transform_loss()
        if not torch.isfinite(loss):
            raise TrainingDiverged(step, loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = None
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.clip_grad)
        if not self.scaler.is_enabled():  # (with float16 loss scaling, the scaler skips non-finite steps itself)
            norm = _grad_norm(self.raw) if norm is None else norm
            if not torch.isfinite(norm):
                raise TrainingDiverged(step, loss.item(), norm.item())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), stats


def run_epoch(stepper: Stepper, batches, first_step: int,
              after_step: Callable[[int, float, List[float]], bool]) -> List[float]:
    """Step through ``batches``; ``after_step(step, loss, stats)`` runs after every update and returns True to
    stop. Returns ``[loss * samples, samples, statistic sum, statistic count, steps]`` of the steps taken."""
    tot = [0.0, 0.0, 0.0, 0.0, 0]
    step = first_step
    for batch in batches:
        step += 1
        loss, stats = stepper(batch, step)
        value, n = float(loss), len(batch[0])
        tot[0] += value * n
        tot[1] += n
        tot[2] += stats[0]
        tot[3] += stats[1]
        tot[4] += 1
        if after_step(step, value, stats):
            break
    return tot


# ----- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, task: str = 'classify', batch_size: int = 500,
             dist: Optional[DistInfo] = None, num_keypoints: int = 0, amp: Optional[torch.dtype] = None,
             device: Optional[torch.device] = None) -> Dict[str, float]:
    """Evaluate ``model`` (eval mode, restored afterwards) on ``data``.

    Returns ``{'error', 'loss', 'n'}`` for ``task='classify'`` (top-1 error, mean cross-entropy) and ``{'nme',
    'loss', 'n'}`` for ``'keypoints'`` (``nme`` as :mod:`gequiv_timm.metrics` defines it: per sample, the mean
    over visible keypoints of the distance divided by the sample's normalising distance, then the mean over samples
    with a visible keypoint). ``'segment'`` returns ``{'dice', 'auc', 'accuracy', 'loss', 'n'}`` (``n`` images;
    :mod:`gequiv_timm.metrics`: Dice of the arg-max and AUC of the softmax probability, each pooled over every pixel
    of the set and averaged over the foreground classes, the AUC on probabilities binned to ``1 / AUC_BINS``, and
    pixel accuracy; ``loss`` the mean :func:`~gequiv_timm.training.losses.dice_loss` per batch, weighted by its
    images). Under ``torchrun`` each rank takes every ``world_size``-th sample and the sums are all-reduced.
    """
    dist = dist or DistInfo(device=device or _device_of(model))
    idx = list(range(dist.rank, len(data), dist.world_size))
    loader = DataLoader(Subset(data, idx) if dist.distributed else data, batch_size=batch_size, shuffle=False)
    was = model.training
    model.eval()
    if task == 'segment':
        try:
            return _evaluate_segment(model, loader, dist, amp)
        finally:
            model.train(was)
    tot = [0.0, 0.0, 0.0, 0.0]  # loss*n, n, metric sum, metric count
    for batch in loader:
        batch = [b.to(dist.device) for b in batch]
        with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
            out = model(batch[0])
        loss, st = batch_loss(task, out, batch, num_keypoints)
        n = len(batch[0])
        tot = [tot[0] + float(loss) * n, tot[1] + n, tot[2] + st[0], tot[3] + st[1]]
    model.train(was)
    tot = all_sum(tot, dist)
    key = 'error' if task == 'classify' else 'nme'
    return {key: tot[2] / max(tot[3], 1), 'loss': tot[0] / max(tot[1], 1), 'n': int(tot[1])}


def _evaluate_segment(model: nn.Module, loader: DataLoader, dist: DistInfo, amp: Optional[torch.dtype]
                      ) -> Dict[str, float]:
    """The segmentation branch of :func:`evaluate`: additive sums per batch (Dice numerators / denominators, correct
    pixels, AUC histograms per foreground class), all-reduced, then divided."""
    from ..metrics import AUC_BINS, roc_auc_from_histograms, score_histograms
    loss_sum, n, correct, pixels = 0.0, 0, 0.0, 0.0
    num = den = hist = None
    for batch in loader:
        x, y = (b.to(dist.device) for b in batch[:2])
        with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        out = out.float()
        loss_sum += float(dice_loss(out, y)) * len(x)
        n += len(x)
        c = out.shape[1]
        if num is None:
            num, den = torch.zeros(c - 1, dtype=torch.float64), torch.zeros(c - 1, dtype=torch.float64)
            hist = torch.zeros(c - 1, 2, AUC_BINS, dtype=torch.float64)
        pred, prob = out.argmax(1), out.softmax(1)
        correct += float((pred == y).sum())
        pixels += y.numel()
        for k in range(1, c):
            p, t = pred == k, y == k
            num[k - 1] += 2.0 * float((p & t).sum())
            den[k - 1] += float(p.sum()) + float(t.sum())
            hist[k - 1] += score_histograms(prob[:, k].cpu(), t.cpu())
    if num is None:
        raise ValueError("evaluate: the segmentation set is empty")
    flat = all_sum([loss_sum, float(n), correct, pixels, *num.tolist(), *den.tolist(), *hist.flatten().tolist()],
                   dist)
    k = len(num)
    loss_sum, n_all, correct, pixels = flat[:4]
    num = torch.tensor(flat[4:4 + k], dtype=torch.float64)
    den = torch.tensor(flat[4 + k:4 + 2 * k], dtype=torch.float64)
    hist = torch.tensor(flat[4 + 2 * k:], dtype=torch.float64).view(k, 2, -1)
    dice = float(torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(den)).mean())
    auc = sum(roc_auc_from_histograms(h) for h in hist) / k
    return {'dice': dice, 'auc': auc, 'accuracy': correct / max(pixels, 1), 'loss': loss_sum / max(n_all, 1),
            'n': int(n_all)}


# ----- fit: the small loop of compare and the benchmarks --------------------------------------------------------
@dataclass
class FitResult:
    epochs: int
    steps: int
    seconds: float
    history: List[Dict[str, float]] = field(default_factory=list)


def _fit_setup(model: nn.Module, train: Dataset, epochs: int, batch_size: int, lr: float, weight_decay: float,
               opt: str, seed: int):
    from timm.optim import create_optimizer_v2
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        drop_last=False)
    # models with their own param groups (an STN's slower transformer) get them, at explicit rates
    params = model.param_groups(lr=lr, weight_decay=weight_decay) if hasattr(model, 'param_groups') else model
    optimizer = create_optimizer_v2(params, opt=opt, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return loader, optimizer, scheduler


def fit(model: nn.Module, train: Dataset, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3,
        weight_decay: float = 1e-4, opt: str = 'adamw', seed: int = 0, progress: bool = False,
        time_budget: Optional[float] = None, loss_fn: Optional[Callable] = None,
        augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
        device: Optional[torch.device] = None, log: Optional[Callable[[Dict[str, float]], None]] = None,
        desc: str = 'train') -> FitResult:
    """Train ``model`` on ``train`` (a dataset of ``(x, y)``) with AdamW and a per-step cosine schedule.

    Args:
        epochs: passes over the data. With ``time_budget`` (seconds), training stops at the first epoch
            boundary after the budget is spent (the cosine schedule still assumes ``epochs``).
        seed: seeds initial data order and any augmentation; model init is the caller's business.
        augment: optional ``fn(x, generator) -> x`` applied to every batch.
        loss_fn: defaults to cross-entropy.
    Returns:
        a :class:`FitResult` with the per-epoch history (loss, train error, seconds).
    """
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
    device = device or _device_of(model)
    loader, optimizer, scheduler = _fit_setup(model, train, epochs, batch_size, lr, weight_decay, opt, seed)
    stepper = Stepper(model, model, optimizer, torch.amp.GradScaler(device.type, enabled=False), device,
                      loss_fn=loss_fn, augment=augment, aug_gen=torch.Generator().manual_seed(seed + 1))
    t0 = time.perf_counter()
    result = FitResult(0, 0, 0.0)
    for epoch in range(epochs):
        model.train()
        tot = run_epoch(stepper, progress_bar(loader, progress, f'{desc} {epoch + 1}/{epochs}'), result.steps,
                        lambda step, loss, stats: scheduler.step())
        result.steps += tot[4]
        rec = dict(epoch=epoch + 1, loss=tot[0] / tot[1], train_error=tot[2] / tot[1],
                   seconds=time.perf_counter() - t0)
        result.history.append(rec)
        result.epochs = epoch + 1
        if log is not None:
            log(rec)
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            break
    result.seconds = time.perf_counter() - t0
    return result
