"""A training run as ``gequiv-timm train`` describes it, from plain values: data from the catalog, the model from
timm, :func:`~.trainer.train`, the metrics report and the outputs (weights file, manifest entry). Also the
re-measurement of a shipped checkpoint's metric (:func:`measure_checkpoint`), chosen by the data-set catalog.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import torch.nn as nn

from ..data.catalog import IMAGE_FOLDER, DATASETS, DataBundle, dataset_of_recipe, load_data
from ..outputs import OutputError, OutputWriteError, atomic_path, check_output_dir, check_output_file, describe_os_error
from ..weights import load_weights, read_manifest, save_weights, sha256_file, update_manifest
from .checkpoint import fingerprint_value
from .distributed import DistInfo
from .loop import evaluate, seed_everything
from .trainer import TrainConfig, TrainResult, train

__all__ = ['TrainJob', 'run_job', 'check_outputs', 'measure_checkpoint', 'RESUMABLE_JOB_FIELDS']

#: :class:`TrainJob` fields that may change when a run resumes: where the final weights and the manifest entry go
#: (``out``, ``tag``, ``manifest``) and the command line recorded with them; ``config`` is compared field by field
#: (:func:`~.trainer.config_fingerprint`). Every other field, including any field added later, is compared.
RESUMABLE_JOB_FIELDS = frozenset({'config', 'out', 'tag', 'manifest', 'command'})


@dataclass
class TrainJob:
    """What ``gequiv-timm train`` asks for: model and data by name, the :class:`TrainConfig` and the outputs."""

    model: str
    config: TrainConfig
    data: str = 'rotmnist'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    initial_checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    augment: bool = True
    hflip: float = 0.5
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    out: Optional[str] = None
    tag: str = ''
    manifest: Optional[str] = None
    command: str = ''

    @property
    def recipe(self) -> str:
        c = self.config
        data = self.data.lower() if self.data.lower() in DATASETS else IMAGE_FOLDER
        return f'{data}/{c.opt}-{c.sched}/lr{c.lr}/bs{{gbatch}}/ep{c.epochs}/seed{c.seed}'

    def fingerprint(self, num_classes: int) -> Dict[str, Any]:
        """The job's settings a checkpoint records (the trainer adds the :class:`TrainConfig` ones): every field
        but :data:`RESUMABLE_JOB_FIELDS`, with ``num_classes`` as resolved and ``initial_checkpoint`` as the sha256
        of its bytes (the file may move, its content may not change)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            if f.name in RESUMABLE_JOB_FIELDS:
                continue
            v = getattr(self, f.name)
            if f.name == 'num_classes':
                v = num_classes
            elif f.name == 'initial_checkpoint' and v:
                v = f'sha256:{sha256_file(v)}'
            out[f.name] = fingerprint_value(v)
        return out


def _data(job: TrainJob):
    """``(data bundle, the model's pretrained cfg)``; the data config is the model's (``resolve_data_config``)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg
    pcfg = get_pretrained_cfg(job.model)
    data_config = resolve_data_config(args={}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else None)
    if 'in_chans' in job.model_kwargs:
        data_config['input_size'] = (int(job.model_kwargs['in_chans']),) + tuple(data_config['input_size'][1:])
    data = load_data(job.data, seed=job.config.seed, data_config=data_config, augment=job.augment, hflip=job.hflip,
                     limit_train=job.limit_train, limit_eval=job.limit_eval)
    return data, pcfg


def _num_classes(job: TrainJob, data: DataBundle, pcfg) -> int:
    if data.task == 'keypoints' and not job.num_classes and pcfg is not None and \
            getattr(pcfg, 'num_classes', None) == data.num_keypoints:
        return data.num_keypoints  # a keypoint model: one heatmap (or point) per keypoint
    return job.num_classes or data.num_classes


def _model(job: TrainJob, num_classes: int, data: DataBundle) -> nn.Module:
    import timm
    kw = dict(job.model_kwargs)
    kw.setdefault('in_chans', data.in_chans)
    seed_everything(job.config.seed)
    model = timm.create_model(job.model, pretrained=job.pretrained, num_classes=num_classes, **kw)
    if job.initial_checkpoint:
        load_weights(model, job.initial_checkpoint)
    return model


def _metrics(job: TrainJob, data: DataBundle, res: TrainResult, dist: DistInfo) -> Dict[str, Any]:
    c = job.config
    metrics: Dict[str, Any] = {}
    if res.eval:
        metrics.update({f'test_{k}': round(v, 4) for k, v in _task_metrics(data.task, res.eval).items()})
    epochs_done = int(res.epochs_done) if float(res.epochs_done).is_integer() else round(res.epochs_done, 3)
    metrics.update({'test_split': f'{job.data} seed {c.seed} ({res.eval.get("n", 0):,} held-out samples)',
                    'seed': c.seed, 'epochs': epochs_done, 'steps': res.steps,
                    'train_seconds': round(res.seconds, 1)})
    if dist.world_size > 1:
        metrics['processes'] = dist.world_size
    return metrics


def _task_metrics(task: str, ev: Dict[str, float]) -> Dict[str, float]:
    """The measurements of an :func:`~.loop.evaluate` result a checkpoint reports (without the ``test_`` prefix):
    ``error`` (classify), ``nme`` (keypoints), ``dice``, ``auc``, ``accuracy`` (segment; the catalog's metric,
    ``test_dice``, first)."""
    keys = {'classify': ('error',), 'keypoints': ('nme',), 'segment': ('dice', 'auc', 'accuracy')}[task]
    return {k: ev[k] for k in keys}


def check_outputs(job: TrainJob) -> None:
    """Refuse, before any work, an output location the job could not write (:class:`~gequiv_timm.outputs.OutputError`
    naming the option): ``--out`` (a ``.safetensors`` file), ``--manifest`` (a JSON file; an existing one must be a
    readable manifest), ``--checkpoint-dir`` (a folder) and ``--metrics-log`` (a file)."""
    c = job.config
    if job.out:
        check_output_file(job.out, '--out', suffix='.safetensors')
    if job.manifest:
        check_output_file(job.manifest, '--manifest', suffix='.json')
        if os.path.exists(job.manifest):
            read_manifest(job.manifest)  # a broken manifest is refused now, not after training
    if c.checkpoint_dir:
        check_output_dir(c.checkpoint_dir, '--checkpoint-dir')
    if c.log_path:
        check_output_file(c.log_path, '--metrics-log')


def _check_num_classes(job: TrainJob, data: DataBundle, num_classes: int) -> None:
    if data.task == 'classify' and num_classes < data.num_classes:
        raise ValueError(f"--num-classes {num_classes} is fewer than the {data.num_classes} classes of {job.data}: "
                         f"labels up to {data.num_classes - 1} would not fit; leave --num-classes out (it is taken "
                         f"from the data) or give at least {data.num_classes}")


def _save(model: nn.Module, path, what: str, job: TrainJob, recipe: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Save the weights atomically to ``path`` (``what``: the option, for the error message)."""
    with atomic_path(path, what) as tmp:
        info = save_weights(model, tmp, job.model, job.tag, recipe, extra={'metrics': metrics})
    info['file'] = Path(path).name
    return info


def _rescue(model: nn.Module, job: TrainJob, recipe: str, metrics: Dict[str, Any], err: Exception
            ) -> OutputWriteError:
    """``--out`` could not be written after training: save the weights where they can be (a temporary folder,
    else the checkpoint folder); returns the error to raise, which says where they are."""
    name = f"{job.model}{'.' + job.tag if job.tag else ''}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.safetensors"
    places = [Path(tempfile.gettempdir()) / 'gequiv-timm-rescue']
    if job.config.checkpoint_dir:
        places.append(Path(job.config.checkpoint_dir))
    tried = []
    for folder in places:
        try:
            info = _save(model, folder / name, 'fallback', job, recipe, metrics)
        except (OutputError, OSError) as e2:
            tried.append(f"{folder} ({e2})")
            continue
        return OutputWriteError(f"{err}. The trained weights were saved to {folder / name} instead "
                                f"(sha256={info['sha256']}): move them where you want them")
    return OutputWriteError(f"{err}. The trained weights could not be saved anywhere: also failed in "
                            f"{'; '.join(tried)}")


def _write(job: TrainJob, model: nn.Module, metrics: Dict[str, Any], res: TrainResult, dist: DistInfo) -> None:
    recipe = job.recipe.format(gbatch=job.config.batch_size * dist.world_size)
    try:
        info = _save(model, job.out, '--out', job, recipe, metrics)
    except (OutputError, OSError) as e:
        raise _rescue(model, job, recipe, metrics, e) from e
    print(f"wrote {job.out} sha256={info['sha256']}")
    if not (job.manifest and job.tag):
        return
    entry = {'file': info['file'], 'sha256': info['sha256'], 'size': info['size'], 'metrics': metrics,
             'recipe': recipe, 'command': job.command, 'budget': f'{res.epochs_done:g} epochs, {res.seconds:.0f} s'}
    try:
        update_manifest(job.manifest, f'{job.model}.{job.tag}', entry)
    except OSError as e:
        raise OutputWriteError(f"--manifest {job.manifest}: cannot write ({describe_os_error(e)}). The weights "
                               f"are saved in {job.out}; only the manifest entry {job.model}.{job.tag} is missing"
                               ) from e


def run_job(job: TrainJob, dist: DistInfo, verbose: bool = True) -> Dict[str, Any]:
    """Run ``job`` in this process (one rank of ``dist``): build data and model, train, print the metrics as one
    JSON line and write the outputs (rank 0). Returns the metrics (empty on the other ranks).

    Output locations are checked before anything else (:func:`check_outputs`); when ``--out`` cannot be written
    after training all the same (a disk filled meanwhile), the weights are saved to a fallback folder and the
    :class:`~gequiv_timm.outputs.OutputError` says where."""
    check_outputs(job)
    seed_everything(job.config.seed)
    data, pcfg = _data(job)
    num_classes = _num_classes(job, data, pcfg)
    _check_num_classes(job, data, num_classes)
    model = _model(job, num_classes, data)
    job.config.fingerprint = job.fingerprint(num_classes)
    job.config.architecture = job.model
    if dist.is_main and verbose:
        print(f"{job.model} on {data.description}; {dist.world_size} process(es) x batch {job.config.batch_size} "
              f"on {dist.device}", file=sys.stderr)
    res = train(model, data, job.config, dist)
    if not dist.is_main:
        return {}
    metrics = _metrics(job, data, res, dist)
    print(json.dumps({'model': job.model, **metrics}))
    if job.out:
        _write(job, model, metrics, res, dist)
    return metrics


def measure_checkpoint(model: nn.Module, entry: Dict[str, Any]) -> Dict[str, float]:
    """Re-measure the metric of a checkpoint written by ``gequiv-timm train`` on a built-in set.

    The set is the one the recipe id names (:func:`gequiv_timm.data.catalog.dataset_of_recipe`); its catalog entry
    fixes the task and the metric. The held-out split is rebuilt with the recorded seed and standardised from the
    model's ``pretrained_cfg`` as the training run did. Returns ``{'test_error', 'n'}``, ``{'test_nme', 'n'}`` or
    ``{'test_dice', 'test_auc', 'test_accuracy', 'n'}`` (segmentation, ``n`` test images).
    """
    from timm.data import resolve_data_config
    ds = dataset_of_recipe(entry.get('recipe', ''))
    if ds is None:
        raise ValueError(f"measure_checkpoint: recipe {entry.get('recipe')!r} does not start with a built-in set "
                         f"({', '.join(DATASETS)})")
    seed = int(entry.get('metrics', {}).get('seed', 0))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    data = load_data(ds.name, seed=seed, data_config=resolve_data_config(args={}, pretrained_cfg=dict(cfg)),
                     augment=False)
    ev = evaluate(model, data.eval, ds.task, batch_size=256, num_keypoints=data.num_keypoints)
    return {**{f'test_{k}': v for k, v in _task_metrics(ds.task, ev).items()}, 'n': ev['n']}
