"""Training, by concern.

* :mod:`.loop`: one optimizer step (:class:`Stepper`), one epoch (:func:`run_epoch`), one :func:`evaluate`, and
  :func:`fit` (the small deterministic loop of ``gequiv-timm compare`` and the benchmarks).
* :mod:`.trainer`: :func:`train`, the engine of ``gequiv-timm train`` (timm factories, DDP, AMP, checkpoints).
* :mod:`.checkpoint`: :class:`CheckpointManager`, verified resume and its errors (:class:`CheckpointError`:
  :class:`CheckpointCorruptError`, :class:`NoIntactCheckpointError`, :class:`ResumeMismatchError`, all
  ``ValueError``); :mod:`.state`: pickle-free state files and RNG state.
* :class:`TrainingDiverged` (a ``RuntimeError``): the loss (or the gradient norm) became NaN / inf; one line naming the
  step, the value and the fix.
* :mod:`.distributed`: :class:`DistInfo`, :func:`init_distributed`, :func:`all_sum`.
* :mod:`.losses`: the task losses and per-batch statistics; :mod:`.metrics_log`: :class:`MetricsLog`.
* :mod:`.recipe`: a run from plain values (:class:`TrainJob`, :func:`run_job`) and :func:`measure_checkpoint`.

Data sets come from :mod:`gequiv_timm.data.catalog`; the NME is :mod:`gequiv_timm.metrics`'.
"""
from ..data.catalog import DataBundle, SeededTransformDataset, load_data
from .checkpoint import (CheckpointCorruptError, CheckpointError, CheckpointManager, NoIntactCheckpointError,
                         ResumeMismatchError, verify_checkpoint)
from .distributed import DistInfo, all_sum, init_distributed
from .loop import FitResult, Stepper, TrainingDiverged, evaluate, fit, run_epoch, seed_everything, to_channels_last
from .metrics_log import LOG_FIELDS, MetricsLog
from .recipe import TrainJob, measure_checkpoint, run_job
from .state import CHECKPOINT_FORMAT, load_state, save_state
from .trainer import RESUMABLE_FIELDS, Session, TrainConfig, TrainResult, config_fingerprint, train

evaluate_task = evaluate  # the engine's former name for the same function

__all__ = ['fit', 'evaluate', 'evaluate_task', 'FitResult', 'seed_everything', 'train', 'TrainConfig',
           'TrainResult', 'Session', 'Stepper', 'run_epoch', 'DataBundle', 'load_data', 'init_distributed',
           'DistInfo', 'all_sum', 'CheckpointManager', 'save_state', 'load_state', 'CHECKPOINT_FORMAT',
           'SeededTransformDataset', 'MetricsLog', 'LOG_FIELDS', 'to_channels_last', 'TrainJob', 'run_job',
           'measure_checkpoint', 'TrainingDiverged', 'CheckpointError', 'CheckpointCorruptError',
           'NoIntactCheckpointError', 'ResumeMismatchError', 'verify_checkpoint', 'RESUMABLE_FIELDS',
           'config_fingerprint']
