"""The fine-tuning engine behind ``gequiv-timm train``: :func:`train` and the :class:`Session` it runs.

timm's factories (``create_optimizer_v2`` with layer decay, ``create_scheduler_v2`` per update), mixed precision
where the device allows it, torch ``DistributedDataParallel`` under ``torchrun`` (gloo on the CPU, nccl on GPUs), a
CSV / JSON-lines metrics log and checkpoints that resume exactly. The step itself is :class:`~.loop.Stepper`, the
same one :func:`~.loop.fit` uses.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .checkpoint import CheckpointManager, find_checkpoint, fingerprint_value, read_checkpoint, restore_rng
from .distributed import DistInfo, all_sum
from .loop import Stepper, amp_dtype, evaluate, progress_bar, run_epoch, to_channels_last
from .metrics_log import MetricsLog
from .state import CHECKPOINT_FORMAT

__all__ = ['TrainConfig', 'TrainResult', 'Session', 'train', 'RESUMABLE_FIELDS', 'config_fingerprint']


@dataclass
class TrainConfig:
    """Settings of :func:`train`. ``batch_size`` is per process (the global batch is ``batch_size * world``).

    Every field changes the result of a run and is recorded in its checkpoints, except those in
    :data:`RESUMABLE_FIELDS`; resuming with any other field changed is refused (see :func:`config_fingerprint`).
    ``fingerprint`` holds the caller's own settings (model, data...: :meth:`~.recipe.TrainJob.fingerprint`),
    recorded and checked the same way.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    opt: str = 'adamw'
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    sched: str = 'cosine'
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    smoothing: float = 0.0
    clip_grad: Optional[float] = None
    seed: int = 0
    amp: str = 'auto'
    workers: int = 0
    max_steps: Optional[int] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    log_path: Optional[str] = None
    log_every: int = 10
    eval_every_epoch: bool = False
    progress: bool = True
    freeze_bn: bool = False
    sync_bn: bool = False
    channels_last: bool = False
    deterministic: bool = False
    architecture: str = ''
    fingerprint: Dict[str, Any] = field(default_factory=dict)


#: :class:`TrainConfig` fields that may change when a run resumes, because they cannot change its weights: where
#: checkpoints go and how often / how many are kept (``checkpoint_dir``, ``checkpoint_every``, ``keep_checkpoints``,
#: ``resume``), what is printed or logged (``progress``, ``log_path``, ``log_every``, ``eval_every_epoch``: the
#: evaluation runs under a forked RNG), how many loader processes fetch the data (``workers``: samples are augmented
#: with RNGs seeded per sample) and where the run stops (``max_steps``: the schedule is fixed by ``epochs``, so a
#: run stopped at ``max_steps`` continues on the same trajectory with a larger one). ``epochs`` may NOT change: it
#: sets the length of the learning-rate schedule. Every field not listed here, including any field added to
#: :class:`TrainConfig` later, is compared on resume.
RESUMABLE_FIELDS = frozenset({'checkpoint_dir', 'checkpoint_every', 'keep_checkpoints', 'resume', 'progress',
                              'log_path', 'log_every', 'eval_every_epoch', 'workers', 'max_steps'})


def config_fingerprint(cfg: TrainConfig) -> Dict[str, Any]:
    """The settings of ``cfg`` that a checkpoint records and a resume must match: every dataclass field except
    :data:`RESUMABLE_FIELDS`, plus the items of ``cfg.fingerprint`` (the job's model / data settings)."""
    out = {f.name: fingerprint_value(getattr(cfg, f.name)) for f in fields(cfg)
           if f.name not in RESUMABLE_FIELDS and f.name != 'fingerprint'}
    clash = sorted(set(out) & set(cfg.fingerprint))
    if clash:
        raise ValueError(f"TrainConfig.fingerprint repeats config fields {clash}; give them other names")
    out.update({k: fingerprint_value(v) for k, v in cfg.fingerprint.items()})
    return out


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    seconds: float
    resumed_from: Optional[int]
    eval: Dict[str, float] = field(default_factory=dict)
    last_loss: float = float('nan')


class _SkipSampler(Sampler):
    """The indices of ``sampler`` after the first ``skip`` (to resume inside an epoch)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return iter(list(iter(self.sampler))[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _prepare_model(model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    """Determinism, device, memory format and SyncBatchNorm; returns the model to train."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=dist.device.type == 'cuda')
        torch.backends.cudnn.benchmark = False
    model.to(dist.device)
    if cfg.channels_last:
        to_channels_last(model)
    if cfg.sync_bn and dist.distributed:
        if dist.device.type != 'cuda':
            raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on the CPU); on the CPU use "
                             "--freeze-bn for batch-size independent results, or accept per-process statistics")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _optimizer(model: nn.Module, cfg: TrainConfig):
    from timm.optim import create_optimizer_v2
    # a model with its own param groups (an STN's transformer at a learning-rate multiplier, as `lr_scale` that
    # timm's schedulers apply) gets them, unless layer decay asks for timm's own grouping
    params = model.param_groups(weight_decay=cfg.weight_decay) \
        if hasattr(model, 'param_groups') and not cfg.layer_decay else model
    return create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, layer_decay=cfg.layer_decay)


def _scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


@dataclass
class Session:
    """One run of :func:`train`: the model, its optimizer / scheduler / scaler, the data order and the progress
    (``epoch``, batch ``pos`` inside it, optimizer ``step``). Built by :meth:`start`, then :meth:`resume`,
    :meth:`run`, :meth:`finish`."""

    cfg: TrainConfig
    data: Any
    dist: DistInfo
    raw: nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp: Optional[torch.dtype]
    sampler: DistributedSampler
    steps_per_epoch: int
    total: int
    ckpt: Optional[CheckpointManager]
    log: MetricsLog
    model: Optional[nn.Module] = None  # the forward: DDP-wrapped under torchrun
    epoch: int = 0
    pos: int = 0
    step: int = 0
    resumed: Optional[int] = None
    last_loss: float = float('nan')
    t0: float = 0.0
    bar: Any = None
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None

    @classmethod
    def start(cls, model: nn.Module, data, cfg: TrainConfig, dist: DistInfo) -> 'Session':
        amp = amp_dtype(cfg.amp, dist.device)
        raw = _prepare_model(model, cfg, dist)
        optimizer = _optimizer(raw, cfg)
        sampler = DistributedSampler(data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
        steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
        if steps_per_epoch == 0:
            raise ValueError("the training set is empty")
        total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
        return cls(cfg, data, dist, raw, optimizer, _scheduler(optimizer, cfg, steps_per_epoch),
                   torch.amp.GradScaler(dist.device.type, enabled=amp == torch.float16), amp, sampler,
                   steps_per_epoch, total,
                   CheckpointManager(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None,
                   MetricsLog(cfg.log_path, enabled=dist.is_main))

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def _fingerprint(self) -> Dict[str, Any]:
        """:func:`config_fingerprint` plus the number of processes and the autocast dtype actually used."""
        return dict(config_fingerprint(self.cfg), world_size=self.dist.world_size, amp_dtype=str(self.amp))

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, file=sys.stderr)

    def resume(self) -> None:
        """Continue from the checkpoint ``cfg.resume`` names (nothing when there is none yet): the newest intact
        one (damaged ones skipped, one line each), a root's newest intact one, or the named folder (verified)."""
        if self.ckpt is not None and self.dist.is_main:
            gone = self.ckpt.clean_leftovers()
            if gone:
                self._say(f"checkpoints: removed leftovers of an interrupted write or prune in {self.ckpt.root}: "
                          f"{', '.join(gone)}")
        self.dist.barrier()
        where = find_checkpoint(self.cfg.resume, self.ckpt, self._say, self.dist)
        if where is not None:
            st = read_checkpoint(where, self._fingerprint(), self.raw)
            self.optimizer.load_state_dict(st['optimizer'])
            self.scheduler.load_state_dict(st['scheduler'])
            if st.get('scaler'):
                self.scaler.load_state_dict(st['scaler'])
            self.epoch, self.pos, self.step = st['epoch'], st['pos'], st['step']
            restore_rng(where, self.dist)
            self.scheduler.step_update(self.step)
            self.resumed = self.step
            self.log.truncate_after(self.step)
            if self.dist.is_main:
                print(f"resumed from {where} (step {self.step}, epoch {self.epoch}, batch {self.pos})",
                      file=sys.stderr)
        self.model = self.raw
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            cuda = self.dist.device.type == 'cuda'
            self.model = DDP(self.raw, device_ids=[self.dist.device.index] if cuda else None)

    def save(self) -> None:
        if self.ckpt is None:
            return
        state = {'format': CHECKPOINT_FORMAT, 'step': self.step, 'epoch': self.epoch, 'pos': self.pos,
                 'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                 'scaler': self.scaler.state_dict() if self.scaler.is_enabled() else {},
                 'fingerprint': self._fingerprint()}
        self.ckpt.save(self.step, self.raw, state, self.dist, self.cfg.architecture)

    # ----- the loop ------------------------------------------------------------------------------------------
    def _stepper(self) -> Stepper:
        c = self.cfg
        return Stepper(self.model, self.raw, self.optimizer, self.scaler, self.dist.device, self.data.task,
                       self.data.num_keypoints, self.amp, c.smoothing, c.clip_grad, c.channels_last)

    def _batches(self):
        """The loader of the current epoch from batch ``pos`` on, under a progress bar on rank 0."""
        c = self.cfg
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.data.train, 'set_epoch'):
            self.data.train.set_epoch(self.epoch)
        loader = DataLoader(self.data.train, batch_size=c.batch_size,
                            sampler=_SkipSampler(self.sampler, self.pos * c.batch_size), num_workers=c.workers,
                            generator=torch.Generator().manual_seed(c.seed * 7919 + self.epoch),
                            pin_memory=self.dist.device.type == 'cuda', drop_last=False)
        self.model.train()
        if c.freeze_bn:
            _bn_eval(self.model)
        self.bar = progress_bar(loader, c.progress and self.dist.is_main, f'epoch {self.epoch + 1}/{c.epochs}',
                                total=self.steps_per_epoch - self.pos)
        return self.bar

    def _after_step(self, step: int, loss: float, stats: List[float]) -> bool:
        """Bookkeeping after update ``step``: schedule, progress, log, checkpoint, hook. True: stop."""
        c = self.cfg
        self.step, self.pos, self.last_loss = step, self.pos + 1, loss
        self.scheduler.step_update(step)
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        lr = self.optimizer.param_groups[0]['lr']
        rec = {'kind': 'step', 'step': step, 'epoch': round(step / self.steps_per_epoch, 4), 'loss': loss,
               'lr': lr, 'seconds': round(time.perf_counter() - self.t0, 3)}
        if c.log_every and (step % c.log_every == 0 or self.pos == 0):
            # the same steps on every rank, so the all-reduce is collective: log the global mean loss
            rec['loss'] = all_sum([loss], self.dist)[0] / self.dist.world_size
            self.log.write(rec)
        if hasattr(self.bar, 'set_postfix'):
            self.bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.2e}', refresh=False)
        if (c.checkpoint_every and step % c.checkpoint_every == 0) or self.pos == 0 or step >= self.total:
            self.save()
        if self.on_step is not None:
            self.on_step(step, rec)
        return step >= self.total

    def _end_epoch(self, tot: List[float]) -> None:
        s = all_sum(tot[2:4], self.dist)
        key = {'classify': 'train_error', 'segment': 'train_dice'}.get(self.data.task, 'train_nme')
        rec = {'kind': 'epoch', 'step': self.step, 'epoch': self.epoch,
               'seconds': round(time.perf_counter() - self.t0, 3), key: s[0] / max(s[1], 1)}
        if self.cfg.eval_every_epoch and self.data.eval is not None:
            rec.update({f'eval_{k}': v for k, v in self._evaluate().items() if k != 'n'})
        self.log.write(rec)

    def _evaluate(self) -> Dict[str, float]:
        # under a forked RNG: the data loader of the evaluation draws a seed from the global generator, which would
        # shift the random numbers of the following training steps (dropout) and make resumed runs differ
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == 'cuda' else []):
            return evaluate(self.raw, self.data.eval, self.data.task, batch_size=256, dist=self.dist,
                            num_keypoints=self.data.num_keypoints, amp=self.amp)

    def run(self, on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> None:
        """Epochs until ``cfg.epochs`` or ``cfg.max_steps``; an epoch record at each epoch end."""
        self.on_step, self.t0 = on_step, time.perf_counter()
        stepper = self._stepper()
        while self.step < self.total and self.epoch < self.cfg.epochs:
            tot = run_epoch(stepper, self._batches(), self.step, self._after_step)
            if self.pos == 0 and self.epoch > 0:
                self._end_epoch(tot)

    def finish(self) -> TrainResult:
        """The result, with the held-out evaluation (logged as the 'final' record) when there is a held-out set."""
        seconds = time.perf_counter() - self.t0
        spe = self.steps_per_epoch
        result = TrainResult(self.step, self.step / spe, seconds, self.resumed, {}, self.last_loss)
        if self.data.eval is not None:
            result.eval = self._evaluate()
            self.log.write({'kind': 'final', 'step': self.step, 'epoch': round(self.step / spe, 4),
                            'seconds': round(seconds, 3),
                            **{f'eval_{k}': v for k, v in result.eval.items() if k != 'n'}})
        return result


def train(model: nn.Module, data, config: TrainConfig, dist: Optional[DistInfo] = None,
          on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
    """Train ``model`` on ``data`` (a :class:`gequiv_timm.data.catalog.DataBundle`) with timm's optimizer and
    scheduler factories, torch DDP under ``torchrun``, optional mixed precision, a metrics log and resumable
    checkpoints.

    * Optimizer: ``timm.optim.create_optimizer_v2`` (``layer_decay`` uses the model's ``group_matcher``).
      Scheduler: ``timm.scheduler.create_scheduler_v2`` stepped per update (``step_on_epochs=False``).
    * Data order: torch's ``DistributedSampler(seed=seed)`` with ``set_epoch`` (also for one process), so rank
      ``r`` of ``W`` sees ``perm[r::W]`` and global batch ``k`` is ``perm[k*B*W:(k+1)*B*W]`` for every ``W``:
      ``W`` processes with batch ``B`` see the same global batches as one process with batch ``B*W``.
    * Checkpoints (rank 0 writes, every rank saves its RNG): every ``checkpoint_every`` steps and at each epoch
      end; ``resume='auto'`` continues from the newest intact one in ``checkpoint_dir`` (damaged ones are skipped
      with one line each), ``resume=FOLDER`` from that folder (verified; a damaged one is an error). Leftovers of
      an interrupted write or prune are removed first. A checkpoint made with other settings is refused
      (:func:`config_fingerprint`). With the same seed and settings a resumed run ends with the same weights as an
      uninterrupted one (bit-exact on the CPU with ``deterministic=True``).
    * A NaN / infinite loss raises :class:`~.loop.TrainingDiverged` before the update.
    * ``on_step(step, record)`` is called after every optimizer step (``record`` holds loss and lr).
    """
    session = Session.start(model, data, config, dist or DistInfo(device=next(model.parameters()).device))
    session.resume()
    session.run(on_step)
    return session.finish()
