"""Training and evaluation loops.

* :func:`fit` / :func:`evaluate`: small, deterministic (for a seed, on the CPU) loops over tensor datasets, used by
  ``gequiv-timm compare`` and the benchmarks. They use timm's optimizer factory.
* :func:`train`: the fine-tuning engine behind ``gequiv-timm train``: timm's factories (``resolve_data_config`` /
  ``create_transform``, ``create_optimizer_v2`` with layer decay, ``create_scheduler_v2``), mixed precision where
  the device allows it, torch ``DistributedDataParallel`` under ``torchrun`` (gloo on the CPU, nccl on GPUs),
  a CSV / JSON-lines metrics log, and checkpoints that resume exactly: weights as safetensors, optimizer /
  scheduler / RNG state in safetensors + JSON (:func:`save_state` / :func:`load_state`, never pickle).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ['fit', 'evaluate', 'FitResult', 'seed_everything', 'train', 'TrainConfig', 'TrainResult', 'DataBundle',
           'load_data', 'evaluate_task', 'init_distributed', 'DistInfo', 'CheckpointManager', 'save_state',
           'load_state', 'SeededTransformDataset', 'MetricsLog', 'to_channels_last']


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
    # models with their own param groups (an STN's slower transformer) get them, at explicit rates
    params = model.param_groups(lr=lr, weight_decay=weight_decay) if hasattr(model, 'param_groups') else model
    optimizer = create_optimizer_v2(params, opt=opt, lr=lr, weight_decay=weight_decay)
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
            if hasattr(model, 'transform_loss'):  # an STN's regulariser toward the identity (0 when disabled)
                loss = loss + model.transform_loss()
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


# =========================================================================================================
# The fine-tuning engine behind `gequiv-timm train`: timm factories, torch DDP, resumable pickle-free checkpoints
# =========================================================================================================
CHECKPOINT_FORMAT = 'gequiv_timm.train/1'


# ----- distributed ----------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """Where this process sits in a ``torchrun`` job (``world_size == 1`` outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    backend: str = ''

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a plain process gets ``world_size == 1``.

    The backend is ``nccl`` when training on CUDA and ``gloo`` on the CPU. ``device`` is ``'cpu'``, ``'cuda'`` or
    ``None`` (CUDA when available); under torchrun each process takes GPU ``LOCAL_RANK``.
    """
    import os
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
        dev = torch.device('cuda', local if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    info = DistInfo(rank, world, local, dev, '')
    if world > 1:
        import torch.distributed as dist
        info.backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        if not dist.is_initialized():
            dist.init_process_group(backend=info.backend)
    return info


def _all_sum(values: List[float], dist: DistInfo) -> List[float]:
    if not dist.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ----- pickle-free state files ----------------------------------------------------------------------------
def _encode(obj, prefix: str, tensors: Dict[str, torch.Tensor]):
    """Turn nested python/torch/numpy state into JSON plus a flat dict of tensors (no pickle anywhere)."""
    import numpy as np
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {'__tensor__': prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in 'ui' else obj.copy())
        return {'__ndarray__': prefix, 'dtype': str(obj.dtype)}
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"checkpoint state: key {k!r} at {prefix!r} is not a str or int")
            out.append([k, _encode(v, f'{prefix}.{k}', tensors)])
        return {'__dict__': out}
    if isinstance(obj, tuple):
        return {'__tuple__': [_encode(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {'__float__': repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} at {prefix!r} without pickle")


def _decode(obj, tensors: Dict[str, torch.Tensor]):
    import numpy as np
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if '__tensor__' in obj:
            return tensors[obj['__tensor__']]
        if '__ndarray__' in obj:
            return tensors[obj['__ndarray__']].numpy().astype(np.dtype(obj['dtype']))
        if '__dict__' in obj:
            return {k: _decode(v, tensors) for k, v in obj['__dict__']}
        if '__tuple__' in obj:
            return tuple(_decode(v, tensors) for v in obj['__tuple__'])
        if '__float__' in obj:
            return float(obj['__float__'])
        raise ValueError(f"checkpoint state: unknown record {sorted(obj)}")
    return obj


def save_state(path, state: Dict[str, Any]) -> None:
    """Write nested training state (tensors, numbers, strings, lists, dicts, tuples, numpy arrays) to one
    safetensors file: tensors as tensors, the structure as JSON in the header. Read back with :func:`load_state`.
    """
    import json

    from safetensors.torch import save_file
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(state, 's', tensors)
    save_file(tensors, str(path), metadata={'format': 'pt', 'gequiv_timm_state': json.dumps(tree),
                                            'checkpoint_format': CHECKPOINT_FORMAT})


def load_state(path) -> Dict[str, Any]:
    """Read a file written by :func:`save_state` (safetensors + JSON; nothing is unpickled)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework='pt') as f:
        meta = dict(f.metadata() or {})
    if 'gequiv_timm_state' not in meta:
        raise ValueError(f"{path}: not a gequiv_timm training-state file (no 'gequiv_timm_state' header)")
    return _decode(json.loads(meta['gequiv_timm_state']), load_file(str(path)))


def _rng_state(device: torch.device) -> Dict[str, Any]:
    import random

    import numpy as np
    st = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        st['cuda'] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    import random

    import numpy as np
    py = st['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(st['numpy']))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and device.type == 'cuda':
        torch.cuda.set_rng_state(st['cuda'], device)


# ----- checkpoints ----------------------------------------------------------------------------------------
class CheckpointManager:
    """Checkpoints in ``root/step_00000100/`` with ``model.safetensors`` (the weights, loadable on their own by
    :func:`gequiv_timm.hub.load_weights` or ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``),
    ``state.safetensors`` (optimizer, scheduler, AMP scaler, progress, config) and ``rng-rank{r}.safetensors``
    (python / numpy / torch RNG of every rank).

    A checkpoint is written into a temporary folder and renamed into place, then ``root/latest`` is replaced
    atomically, so a process killed at any moment (``kill -9``) leaves the previous checkpoint intact.
    """

    def __init__(self, root, keep: int = 2):
        from pathlib import Path
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def _dir(self, step: int):
        return self.root / f'step_{step:08d}'

    def complete(self) -> List[Any]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        out = [p for p in self.root.glob('step_*') if p.is_dir() and '.tmp' not in p.name and
               (p / 'model.safetensors').exists() and (p / 'state.safetensors').exists()]
        return sorted(out, key=lambda p: p.name)

    def latest(self):
        """The newest complete checkpoint folder, or None."""
        ptr = self.root / 'latest'
        if ptr.exists():
            p = self.root / ptr.read_text().strip()
            if p in self.complete():
                return p
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, model: nn.Module, state: Dict[str, Any], dist: DistInfo, architecture: str = '',
             rng: Optional[Dict[str, Any]] = None) -> None:
        import os
        import shutil
        final = self._dir(step)
        tmp = self.root / f'{final.name}.tmp'
        if dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob('step_*.tmp'):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        save_state(tmp / f'rng-rank{dist.rank}.safetensors', {'rng': rng or _rng_state(dist.device)})
        dist.barrier()
        if dist.is_main:
            from .hub import save_weights
            save_weights(model, tmp / 'model.safetensors', architecture, recipe='checkpoint',
                         extra={'step': str(step)})
            save_state(tmp / 'state.safetensors', state)
            for f in tmp.iterdir():
                with open(f, 'rb') as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ptr_tmp = self.root / 'latest.tmp'
            ptr_tmp.write_text(final.name + '\n')
            os.replace(ptr_tmp, self.root / 'latest')
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()


# ----- data -----------------------------------------------------------------------------------------------
class SeededTransformDataset(Dataset):
    """Wraps a dataset with random transforms so that sample ``i`` of epoch ``e`` is augmented with RNGs seeded
    from ``(seed, e, i)``: augmentation no longer depends on worker count, world size or where a run resumed.
    The global RNG state of the calling process is left untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        import random

        import numpy as np
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + int(i)) % (2 ** 31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class _SkipSampler(torch.utils.data.Sampler):
    """The indices of ``sampler`` after the first ``skip`` (to resume inside an epoch)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return iter(list(iter(self.sampler))[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


@dataclass
class DataBundle:
    """What the engine trains on: datasets, the task (``'classify'`` or ``'keypoints'``) and descriptions."""

    train: Dataset
    eval: Optional[Dataset]
    task: str = 'classify'
    num_classes: int = 10
    in_chans: int = 1
    description: str = ''
    num_keypoints: int = 0
    image_size: int = 28


def _builtin_sets() -> Dict[str, Tuple[str, Optional[str]]]:
    """``name -> (description, reason it is unavailable or None)``."""
    import importlib.util
    out = {'rotmnist': ('rotated MNIST: train and test digits rotated uniformly in [0, 360)', None),
           'rotmnist-upright': ('rotated MNIST, trained upright and tested rotated', None)}
    have_dist = importlib.util.find_spec('gequiv_timm.data.distorted') is not None
    for p in ('R', 'RTS', 'P', 'E'):
        out[f'distorted-{p.lower()}'] = (f'distorted MNIST, protocol {p} (Jaderberg et al. 2015)',
                                         None if have_dist else 'gequiv_timm.data.distorted is not installed')
    have_lm = importlib.util.find_spec('gequiv_timm.data.landmarks') is not None
    out['landmarks'] = ('MNIST landmarks: 5 keypoints per digit on a 64x64 canvas (keypoint task)',
                        None if have_lm else 'gequiv_timm.data.landmarks is not installed')
    return out


def _limit(ds: Dataset, n: Optional[int], seed: int = 0) -> Dataset:
    """A fixed random subset of ``n`` samples (seeded; the built-in splits are sorted by class, so the first
    ``n`` would be one or two classes only)."""
    if n is None or n <= 0 or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(104_729 + seed)
    return torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:n].sort().values.tolist())


def _norm_tensors(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def load_data(name: str, seed: int = 0, data_config: Optional[Dict[str, Any]] = None, augment: bool = True,
              hflip: float = 0.5, limit_train: Optional[int] = None, limit_eval: Optional[int] = None) -> DataBundle:
    """A built-in set by name (see ``gequiv-timm train --help``) or an image folder.

    Built-in sets are tensors standardised with the ``mean``/``std`` of ``data_config`` (from
    ``timm.data.resolve_data_config(model=...)``, i.e. the model's ``pretrained_cfg``) when it has one value per
    image channel, else with the MNIST statistics. An image folder is read with ``timm.data.create_dataset``
    (``root/train`` and ``root/val`` or ``root/validation`` when present, else ``root`` is the training set and
    there is no evaluation set) and transformed with ``timm.data.create_transform(**data_config)``; training
    augmentation is timm's (random resized crop, flip, colour jitter) unless ``augment=False``.
    """
    from pathlib import Path

    from .data import MNIST_MEAN, MNIST_STD
    cfg = dict(data_config or {})
    sets = _builtin_sets()
    key = name.lower()
    if key in sets:
        desc, missing = sets[key]
        if missing:
            raise ValueError(f"data set {name!r} is not available: {missing}")
        mean, std = cfg.get('mean', MNIST_MEAN), cfg.get('std', MNIST_STD)
        if len(mean) != 1 or len(std) != 1:
            mean, std = MNIST_MEAN, MNIST_STD
        if key.startswith('rotmnist'):
            from .data import rotated_mnist
            d = rotated_mnist(seed, protocol='upright' if key == 'rotmnist-upright' else 'rotated')
            tr = torch.utils.data.TensorDataset(_norm_tensors(d.train.images, mean, std), d.train.labels)
            te = torch.utils.data.TensorDataset(_norm_tensors(d.test.images, mean, std), d.test.labels)
            bundle = DataBundle(tr, te, 'classify', 10, 1, f'{desc}; seed {seed}', image_size=28)
        elif key.startswith('distorted-'):
            from .data.distorted import distorted_mnist
            d = distorted_mnist(key.split('-', 1)[1].upper(), seed=seed)
            tr = torch.utils.data.TensorDataset(_norm_tensors(d.train.images, mean, std), d.train.labels)
            te = torch.utils.data.TensorDataset(_norm_tensors(d.test.images, mean, std), d.test.labels)
            bundle = DataBundle(tr, te, 'classify', 10, 1, f'{desc}; seed {seed}', image_size=d.image_size)
        else:
            from .data.landmarks import mnist_landmarks
            d = mnist_landmarks(seed=seed)

            def _kp(s):
                return torch.utils.data.TensorDataset(_norm_tensors(s.images, mean, std), s.keypoints.float(),
                                                      s.visible, s.norm.float())
            k = d.train.keypoints.shape[1]
            bundle = DataBundle(_kp(d.train), _kp(d.test), 'keypoints', 2 * k, 1, f'{desc}; seed {seed}',
                                num_keypoints=k, image_size=d.train.images.shape[-1])
        bundle.train = _limit(bundle.train, limit_train, seed)
        bundle.eval = _limit(bundle.eval, limit_eval, seed)
        return bundle
    root = Path(name)
    if not root.is_dir():
        avail = ', '.join(k for k, (_, miss) in sets.items() if not miss)
        raise ValueError(f"--data {name!r} is neither a built-in set ({avail}) nor an existing folder of images "
                         f"(class sub-folders, optionally inside train/ and val/)")
    from timm.data import create_dataset, create_transform
    chans = int(cfg.get('input_size', (3,))[0])
    mode = {1: 'L', 3: 'RGB'}.get(chans)
    if mode is None:
        raise ValueError(f"image folder {root}: the model takes {chans} input channels; image files can feed 1 "
                         f"(grayscale) or 3 (RGB) channel models")
    train_root = root / 'train' if (root / 'train').is_dir() else root
    eval_root = next((root / n for n in ('val', 'validation') if (root / n).is_dir()), None)
    tcfg = {k: v for k, v in cfg.items() if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct',
                                                    'crop_mode')}
    train_tf = create_transform(**tcfg, is_training=True, no_aug=not augment, hflip=hflip)
    eval_tf = create_transform(**tcfg, is_training=False)
    tr = create_dataset('', root=str(train_root), split='', search_split=False, is_training=True,
                        input_img_mode=mode, transform=train_tf)
    classes = getattr(tr.reader, 'class_to_idx', None) or {}
    if len(tr) == 0 or not classes:
        raise ValueError(f"image folder {train_root}: no images found in class sub-folders")
    te = None
    if eval_root is not None:
        te = create_dataset('', root=str(eval_root), split='', search_split=False, input_img_mode=mode,
                            class_map=dict(classes), transform=eval_tf)
    desc = f'image folder {root} ({len(tr)} train images, {len(classes)} classes' + (
        f', {len(te)} eval images)' if te is not None else ', no val/ folder: no evaluation)')
    train_ds = SeededTransformDataset(_limit(tr, limit_train, seed), seed)
    return DataBundle(train_ds, _limit(te, limit_eval, seed) if te is not None else None, 'classify', len(classes),
                      chans, desc, image_size=int(cfg.get('input_size', (0, 0, 0))[-1]))


# ----- losses and metrics ---------------------------------------------------------------------------------
def _keypoint_outputs(out: torch.Tensor, x: torch.Tensor, k: int):
    """``(kind, pred_pixels)`` from a model output: heatmaps ``[B, K, h, w]``, pixels ``[B, K, 2]`` or normalised
    coordinates ``[B, 2K]`` in ``[-1, 1]`` (a classifier created with ``num_classes = 2K``)."""
    size = x.shape[-1]
    if out.dim() == 4 and out.shape[1] == k:
        from .layers.rcn import decode_heatmaps
        stride = max(1, size // out.shape[-1])
        return 'heatmap', decode_heatmaps(out.float(), 'soft_argmax', stride)[0], stride
    if out.dim() == 3 and out.shape[1:] == (k, 2):
        return 'pixels', out.float(), 1
    if out.dim() == 2 and out.shape[1] == 2 * k:
        return 'normalised', (out.float().view(-1, k, 2) + 1) * (size / 2) - 0.5, 1
    raise ValueError(f"keypoint task: the model output has shape {tuple(out.shape)}; expected heatmaps "
                     f"[B, {k}, h, w], pixel coordinates [B, {k}, 2] or normalised coordinates [B, {2 * k}] "
                     f"(create the model with num_classes={2 * k})")


def _batch_loss(task: str, model_out: torch.Tensor, batch, k: int, smoothing: float = 0.0):
    """``(loss, stats)`` with stats ``[sum of errors, count]`` (top-1 errors or summed NME)."""
    if task == 'classify':
        y = batch[1]
        loss = F.cross_entropy(model_out.float(), y, label_smoothing=smoothing)
        return loss, [float((model_out.argmax(1) != y).sum()), float(len(y))]
    x, kp, vis, norm = batch
    kind, pred, stride = _keypoint_outputs(model_out, x, k)
    size = x.shape[-1]
    if kind == 'heatmap':
        from .layers.rcn import heatmap_cross_entropy
        loss = heatmap_cross_entropy(model_out.float(), kp, vis, stride)
    else:
        w = vis.float().unsqueeze(-1)
        loss = (F.smooth_l1_loss(pred / size, kp / size, reduction='none', beta=0.02) * w).sum() / \
            w.sum().clamp_min(1) / 2
    d = (pred.detach() - kp).norm(dim=-1) / norm.view(-1, 1)
    v = vis.bool()
    return loss, [float(d[v].sum()), float(v.sum())]


@torch.no_grad()
def evaluate_task(model: nn.Module, data: Dataset, task: str = 'classify', batch_size: int = 256,
                  dist: Optional[DistInfo] = None, num_keypoints: int = 0, amp: Optional[torch.dtype] = None
                  ) -> Dict[str, float]:
    """Evaluate on ``data`` (each rank takes every ``world_size``-th sample; sums are all-reduced).

    Returns ``{'error', 'loss', 'n'}`` for classification, ``{'nme', 'loss', 'n'}`` for keypoints (``nme``: mean
    point-to-point distance over visible keypoints divided by the sample's normalising distance).
    """
    dist = dist or DistInfo(device=next(model.parameters()).device)
    idx = list(range(dist.rank, len(data), dist.world_size))
    loader = DataLoader(torch.utils.data.Subset(data, idx), batch_size=batch_size, shuffle=False)
    was = model.training
    model.eval()
    tot = [0.0, 0.0, 0.0, 0.0]  # loss*n, n, metric sum, metric count
    for batch in loader:
        batch = [b.to(dist.device) for b in batch]
        with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
            out = model(batch[0])
        loss, st = _batch_loss(task, out, batch, num_keypoints)
        n = len(batch[0])
        tot[0] += float(loss) * n
        tot[1] += n
        tot[2] += st[0]
        tot[3] += st[1]
    model.train(was)
    tot = _all_sum(tot, dist)
    key = 'error' if task == 'classify' else 'nme'
    return {key: tot[2] / max(tot[3], 1), 'loss': tot[0] / max(tot[1], 1), 'n': int(tot[1])}


# ----- metrics log ----------------------------------------------------------------------------------------
LOG_FIELDS = ('kind', 'step', 'epoch', 'loss', 'lr', 'train_error', 'train_nme', 'eval_error', 'eval_nme',
              'eval_loss', 'seconds')


class MetricsLog:
    """Append-only metrics log, CSV (``.csv``) or JSON lines (anything else). On resume, rows written after the
    checkpoint step are dropped first, so the log reads like one uninterrupted run."""

    def __init__(self, path, enabled: bool = True):
        from pathlib import Path
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        self.csv = self.path is not None and self.path.suffix.lower() == '.csv'

    def _read(self) -> List[Dict[str, Any]]:
        import csv
        import json
        if not self.path.exists():
            return []
        if self.csv:
            with open(self.path, newline='') as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in self._read() if int(float(r.get('step') or 0)) <= step]
        self.path.unlink()
        for r in rows:
            self.write({k: v for k, v in r.items() if v not in ('', None)})

    def write(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        import csv
        import json
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv:
            new = not self.path.exists()
            with open(self.path, 'a', newline='') as f:
                w = csv.DictWriter(f, fieldnames=LOG_FIELDS, restval='', extrasaction='ignore')
                if new:
                    w.writeheader()
                w.writerow(rec)
        else:
            with open(self.path, 'a') as f:
                f.write(json.dumps(rec) + '\n')


# ----- the loop -------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of :func:`train`. ``batch_size`` is per process (the global batch is ``batch_size * world``)."""

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


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    seconds: float
    resumed_from: Optional[int]
    eval: Dict[str, float] = field(default_factory=dict)
    last_loss: float = float('nan')


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
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


def _bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


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


def train(model: nn.Module, data: DataBundle, config: TrainConfig, dist: Optional[DistInfo] = None,
          on_step: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
    """Train ``model`` on ``data`` with timm's optimizer and scheduler factories, torch DDP under ``torchrun``,
    optional mixed precision, a metrics log and resumable checkpoints.

    * Optimizer: ``timm.optim.create_optimizer_v2`` (``layer_decay`` uses the model's ``group_matcher``).
      Scheduler: ``timm.scheduler.create_scheduler_v2`` stepped per update (``step_on_epochs=False``).
    * Data order: torch's ``DistributedSampler(seed=seed)`` with ``set_epoch`` (also for one process), so rank
      ``r`` of ``W`` sees ``perm[r::W]`` and global batch ``k`` is ``perm[k*B*W:(k+1)*B*W]`` for every ``W``:
      ``W`` processes with batch ``B`` see the same global batches as one process with batch ``B*W``.
    * Checkpoints (rank 0 writes, every rank saves its RNG): every ``checkpoint_every`` steps and at each epoch
      end; ``resume='auto'`` continues from the newest one in ``checkpoint_dir`` (or a given folder). With the
      same seed and settings a resumed run ends with the same weights as an uninterrupted one (bit-exact on the
      CPU with ``deterministic=True``).
    * ``on_step(step, record)`` is called after every optimizer step (``record`` holds loss and lr).
    """
    import time as _time

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torch.utils.data import DistributedSampler
    dist = dist or DistInfo(device=next(model.parameters()).device)
    cfg = config
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=dist.device.type == 'cuda')
        torch.backends.cudnn.benchmark = False
    amp_dtype = _amp_dtype(cfg.amp, dist.device)
    model.to(dist.device)
    if cfg.channels_last:
        to_channels_last(model)
    if cfg.sync_bn and dist.distributed:
        if dist.device.type != 'cuda':
            raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on the CPU); on the CPU use "
                             "--freeze-bn for batch-size independent results, or accept per-process statistics")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    # a model with its own param groups (an STN's transformer at a learning-rate multiplier, as `lr_scale` that
    # timm's schedulers apply) gets them, unless layer decay asks for timm's own grouping
    params = raw_model.param_groups(weight_decay=cfg.weight_decay) \
        if hasattr(raw_model, 'param_groups') and not cfg.layer_decay else raw_model
    optimizer = create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, layer_decay=cfg.layer_decay)
    sampler = DistributedSampler(data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError("the training set is empty")
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.keep_checkpoints) if cfg.checkpoint_dir else None
    log = MetricsLog(cfg.log_path, enabled=dist.is_main)

    epoch, pos, step, resumed = 0, 0, 0, None
    if cfg.resume:
        from pathlib import Path
        where = ckpt.latest() if cfg.resume == 'auto' and ckpt is not None else (
            Path(cfg.resume) if cfg.resume != 'auto' else None)
        if where is not None and cfg.resume != 'auto' and (Path(where) / 'latest').exists():
            where = CheckpointManager(where).latest() or where  # a checkpoint folder's root: its newest one
        if cfg.resume == 'auto' and ckpt is None:
            raise ValueError("resume='auto' needs a checkpoint_dir to look in")
        if where is not None and cfg.resume != 'auto' and not (Path(where) / 'state.safetensors').exists():
            raise FileNotFoundError(f"resume: {where} is not a checkpoint folder (no state.safetensors in it)")
        if where is not None:
            from .hub import load_weights
            st = load_state(Path(where) / 'state.safetensors')
            if st.get('format') != CHECKPOINT_FORMAT:
                raise ValueError(f"resume: {where} has checkpoint format {st.get('format')!r}, expected "
                                 f"{CHECKPOINT_FORMAT!r}")
            fp_old, fp_new = st.get('fingerprint', {}), dict(cfg.fingerprint, world_size=dist.world_size,
                                                                batch_size=cfg.batch_size)
            diff = sorted(k for k in set(fp_old) | set(fp_new) if fp_old.get(k) != fp_new.get(k))
            if diff:
                raise ValueError(f"resume: checkpoint {where} was made with different settings: " + '; '.join(
                    f"{k}: checkpoint {fp_old.get(k)!r} vs now {fp_new.get(k)!r}" for k in diff) +
                    ". Resume with the same settings, or start a new --checkpoint-dir.")
            load_weights(raw_model, Path(where) / 'model.safetensors')
            optimizer.load_state_dict(st['optimizer'])
            scheduler.load_state_dict(st['scheduler'])
            if st.get('scaler'):
                scaler.load_state_dict(st['scaler'])
            epoch, pos, step = st['epoch'], st['pos'], st['step']
            rng_file = Path(where) / f'rng-rank{dist.rank}.safetensors'
            if rng_file.exists():
                _set_rng_state(load_state(rng_file)['rng'], dist.device)
            scheduler.step_update(step)
            resumed = step
            log.truncate_after(step)
            if dist.is_main:
                import sys
                print(f"resumed from {where} (step {step}, epoch {epoch}, batch {pos})", file=sys.stderr)
    ddp_model = model
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[dist.device.index] if dist.device.type == 'cuda' else None)

    def _save(step_: int, epoch_: int, pos_: int) -> None:
        if ckpt is None:
            return
        state = {'format': CHECKPOINT_FORMAT, 'step': step_, 'epoch': epoch_, 'pos': pos_,
                 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                 'scaler': scaler.state_dict() if scaler.is_enabled() else {},
                 'fingerprint': dict(cfg.fingerprint, world_size=dist.world_size, batch_size=cfg.batch_size)}
        ckpt.save(step_, raw_model, state, dist, cfg.architecture)

    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    t0 = _time.perf_counter()
    last_loss = float('nan')
    done = step >= total
    while not done and epoch < cfg.epochs:
        sampler.set_epoch(epoch)
        if hasattr(data.train, 'set_epoch'):
            data.train.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=_SkipSampler(sampler, pos * cfg.batch_size),
                            num_workers=cfg.workers, generator=gen, pin_memory=dist.device.type == 'cuda',
                            drop_last=False)
        ddp_model.train()
        if cfg.freeze_bn:
            _bn_eval(ddp_model)
        it = _progress(loader, cfg.progress and dist.is_main, f'epoch {epoch + 1}/{cfg.epochs}',
                       total=steps_per_epoch - pos)
        stats = [0.0, 0.0]
        for batch in it:
            batch = [b.to(dist.device, non_blocking=True) for b in batch]
            x = batch[0]
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = ddp_model(x)
            loss, st = _batch_loss(data.task, out, batch, data.num_keypoints, cfg.smoothing)
            if hasattr(raw_model, 'transform_loss'):  # an STN's regulariser toward the identity
                loss = loss + raw_model.transform_loss()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); "
                                         f"lower --lr, check the data, or resume from the last checkpoint")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            pos += 1
            scheduler.step_update(step)
            last_loss = float(loss.detach())
            stats[0] += st[0]
            stats[1] += st[1]
            lr = optimizer.param_groups[0]['lr']
            if pos == steps_per_epoch:
                epoch, pos = epoch + 1, 0
            rec = {'kind': 'step', 'step': step, 'epoch': round(step / steps_per_epoch, 4), 'loss': last_loss,
                   'lr': lr, 'seconds': round(_time.perf_counter() - t0, 3)}
            if cfg.log_every and (step % cfg.log_every == 0 or pos == 0):
                # the same steps on every rank, so the all-reduce is collective: log the global mean loss
                rec['loss'] = _all_sum([last_loss], dist)[0] / dist.world_size
                log.write(rec)
            if hasattr(it, 'set_postfix'):
                it.set_postfix(loss=f'{last_loss:.4f}', lr=f'{lr:.2e}', refresh=False)
            if ckpt is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or pos == 0
                                     or step >= total):
                _save(step, epoch, pos)
            if on_step is not None:
                on_step(step, rec)
            if step >= total:
                done = True
                break
        if pos == 0 and epoch > 0:
            s = _all_sum(stats, dist)
            rec = {'kind': 'epoch', 'step': step, 'epoch': epoch, 'seconds': round(_time.perf_counter() - t0, 3),
                   ('train_error' if data.task == 'classify' else 'train_nme'): s[0] / max(s[1], 1)}
            if cfg.eval_every_epoch and data.eval is not None:
                ev = evaluate_task(raw_model, data.eval, data.task, dist=dist, num_keypoints=data.num_keypoints,
                                   amp=amp_dtype)
                rec.update({f'eval_{k}': v for k, v in ev.items() if k != 'n'})
            log.write(rec)
    seconds = _time.perf_counter() - t0
    result = TrainResult(step, step / steps_per_epoch, seconds, resumed, {}, last_loss)
    if data.eval is not None:
        result.eval = evaluate_task(raw_model, data.eval, data.task, dist=dist, num_keypoints=data.num_keypoints,
                                    amp=amp_dtype)
        log.write({'kind': 'final', 'step': step, 'epoch': round(step / steps_per_epoch, 4),
                   'seconds': round(seconds, 3), **{f'eval_{k}': v for k, v in result.eval.items() if k != 'n'}})
    return result


# ----- `gequiv-timm train` --------------------------------------------------------------------------------
def _parse_kwargs(items: List[str]) -> Dict[str, Any]:
    import ast
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


def add_arguments(p) -> None:
    sets = _builtin_sets()
    avail = [f"{k} ({d})" for k, (d, miss) in sets.items() if not miss]
    unavailable = [f"{k} ({miss})" for k, (_, miss) in sets.items() if miss]
    p.description = ((p.description or 'Train or fine-tune a model').rstrip('.') + '. Built-in data sets: ' +
                     '; '.join(avail) +
                     ('. Not available here: ' + '; '.join(unavailable) if unavailable else '') +
                     '. Or give a folder of images: class sub-folders, optionally inside train/ and val/.')
    g = p.add_argument_group('model and data')
    g.add_argument('model', help='registered model name, e.g. gequiv_p4cnn (see `gequiv-timm list`)')
    g.add_argument('--data', default='rotmnist', metavar='SET_OR_FOLDER',
                   help=f"built-in set ({', '.join(k for k, (_, m) in sets.items() if not m)}) or an image folder "
                        f"(default rotmnist)")
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


def _check_args(args) -> Optional[str]:
    def bad(name, v, cond, what):
        return None if v is None or cond(v) else f"{name} must be {what}, got {v!r}"
    checks = [
        bad('--epochs', args.epochs, lambda v: v >= 1, 'at least 1'),
        bad('--batch-size', args.batch_size, lambda v: v >= 1, 'at least 1'),
        bad('--lr', args.lr, lambda v: math.isfinite(v) and v > 0, 'a positive number'),
        bad('--weight-decay', args.weight_decay, lambda v: math.isfinite(v) and v >= 0, 'a number >= 0'),
        bad('--momentum', args.momentum, lambda v: math.isfinite(v) and 0 <= v < 1, 'in [0, 1)'),
        bad('--layer-decay', args.layer_decay, lambda v: math.isfinite(v) and 0 < v <= 1, 'in (0, 1]'),
        bad('--warmup-epochs', args.warmup_epochs, lambda v: 0 <= v < args.epochs, 'in [0, --epochs)'),
        bad('--min-lr', args.min_lr, lambda v: math.isfinite(v) and 0 <= v, 'a number >= 0'),
        bad('--smoothing', args.smoothing, lambda v: 0 <= v < 1, 'in [0, 1)'),
        bad('--clip-grad', args.clip_grad, lambda v: math.isfinite(v) and v > 0, 'a positive number'),
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
    errs = [c for c in checks if c]
    if args.resume == 'auto' and not args.checkpoint_dir:
        errs.append('--resume without a folder needs --checkpoint-dir (where to look for the newest checkpoint)')
    if args.manifest and not (args.out and args.tag):
        errs.append('--manifest needs --out and --tag (the manifest entry is NAME.TAG -> the written file)')
    if args.out and not str(args.out).endswith('.safetensors'):
        errs.append(f"--out must name a .safetensors file, got {args.out!r}")
    if args.tag and not all(ch.isalnum() or ch in '_-' for ch in args.tag):
        errs.append(f"--tag must be letters, digits, '_' or '-', got {args.tag!r}")
    return '; '.join(errs) if errs else None


def run(args) -> int:
    import json
    import shlex
    import sys

    import timm
    err = _check_args(args)
    if err:
        print(f"gequiv-timm train: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in timm.list_models('gequiv_*') and args.model not in timm.list_models():
        print(f"gequiv-timm train: unknown model {args.model!r}; see `gequiv-timm list`", file=sys.stderr)
        return 2
    try:
        model_kwargs = _parse_kwargs(args.model_kwargs)
        dist = init_distributed(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"gequiv-timm train: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, model_kwargs, dist, json, shlex, sys, timm)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"gequiv-timm train: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def evaluate_pretrained(model: nn.Module, entry: Dict[str, Any]) -> Dict[str, float]:
    """Manifest evaluator of checkpoints written by ``gequiv-timm train`` on a built-in set.

    Rebuilds the held-out split the entry was measured on (the set named by the recipe id's first part, with the
    recorded seed, standardised from the model's ``pretrained_cfg`` as the training run did) and returns the
    manifest's metric: ``{'test_error', 'n'}`` for classifiers, ``{'test_nme', 'n'}`` for keypoint models.
    """
    from timm.data import resolve_data_config
    name = str(entry.get('recipe', '')).split('/', 1)[0]
    if name not in _builtin_sets():
        raise ValueError(f"evaluate_pretrained: recipe {entry.get('recipe')!r} does not start with a built-in set "
                         f"({', '.join(_builtin_sets())})")
    seed = int(entry.get('metrics', {}).get('seed', 0))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    data_config = resolve_data_config(args={}, pretrained_cfg=dict(cfg))
    data = load_data(name, seed=seed, data_config=data_config, augment=False)
    ev = evaluate_task(model, data.eval, data.task, num_keypoints=data.num_keypoints)
    if data.task == 'classify':
        return {'test_error': ev['error'], 'n': ev['n']}
    return {'test_nme': ev['nme'], 'n': ev['n']}


def _run(args, model_kwargs, dist, json, shlex, sys, timm) -> int:
    from timm.data import resolve_data_config
    seed_everything(args.seed)
    # the data config comes from the model's pretrained_cfg (timm.data.resolve_data_config)
    from timm.models import get_pretrained_cfg
    pcfg = get_pretrained_cfg(args.model)
    data_config = resolve_data_config(args={}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else None)
    if 'in_chans' in model_kwargs:
        data_config['input_size'] = (int(model_kwargs['in_chans']),) + tuple(data_config['input_size'][1:])
    data = load_data(args.data, seed=args.seed, data_config=data_config, augment=not args.no_aug,
                     hflip=args.hflip, limit_train=args.limit_train, limit_eval=args.limit_eval)
    num_classes = args.num_classes or data.num_classes
    if data.task == 'keypoints' and not args.num_classes and pcfg is not None and \
            getattr(pcfg, 'num_classes', None) == data.num_keypoints:
        num_classes = data.num_keypoints  # a keypoint model: one heatmap (or point) per keypoint
    in_chans = data.in_chans
    kw = dict(model_kwargs)
    kw.setdefault('in_chans', in_chans)
    seed_everything(args.seed)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **kw)
    if args.initial_checkpoint:
        from .hub import load_weights
        load_weights(model, args.initial_checkpoint)
    fingerprint = {'model': args.model, 'model_kwargs': json.dumps(model_kwargs, sort_keys=True),
                   'data': args.data, 'seed': args.seed, 'epochs': args.epochs, 'opt': args.opt, 'lr': args.lr,
                   'sched': args.sched, 'limit_train': args.limit_train, 'num_classes': num_classes}
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      opt=args.opt, momentum=args.momentum, layer_decay=args.layer_decay, sched=args.sched,
                      warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, smoothing=args.smoothing,
                      clip_grad=args.clip_grad, seed=args.seed, amp=args.amp, workers=args.workers,
                      max_steps=args.max_steps, checkpoint_dir=args.checkpoint_dir,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                      resume=args.resume, log_path=args.log, log_every=args.log_every,
                      eval_every_epoch=args.eval_every_epoch, progress=not args.no_progress,
                      freeze_bn=args.freeze_bn, sync_bn=args.sync_bn, channels_last=args.channels_last,
                      deterministic=args.deterministic, architecture=args.model, fingerprint=fingerprint)
    if dist.is_main and not args.no_progress:
        print(f"{args.model} on {data.description}; {dist.world_size} process(es) x batch {args.batch_size} "
              f"on {dist.device}", file=sys.stderr)
    res = train(model, data, cfg, dist)
    if not dist.is_main:
        return 0
    split = f'{args.data} seed {args.seed} ({res.eval.get("n", 0):,} held-out samples)'
    metrics: Dict[str, Any] = {}
    if data.task == 'classify' and res.eval:
        metrics['test_error'] = round(res.eval['error'], 4)
    elif res.eval:
        metrics['test_nme'] = round(res.eval['nme'], 4)
    epochs_done = int(res.epochs_done) if float(res.epochs_done).is_integer() else round(res.epochs_done, 3)
    metrics.update({'test_split': split, 'seed': args.seed, 'epochs': epochs_done,
                    'steps': res.steps, 'train_seconds': round(res.seconds, 1)})
    if dist.world_size > 1:
        metrics['processes'] = dist.world_size
    print(json.dumps({'model': args.model, **metrics}))
    if args.out:
        from .hub import save_weights, update_manifest
        command = 'gequiv-timm train ' + ' '.join(shlex.quote(a) for a in sys.argv[2:])
        gbatch = args.batch_size * dist.world_size
        recipe = (f'{args.data}/{args.opt}-{args.sched}/lr{args.lr}/bs{gbatch}/ep{args.epochs}/seed{args.seed}'
                  if not args.data or '/' not in args.data else
                  f'imagefolder/{args.opt}-{args.sched}/lr{args.lr}/bs{gbatch}/ep{args.epochs}/seed{args.seed}')
        info = save_weights(model, args.out, args.model, args.tag, recipe, extra={'metrics': metrics})
        print(f"wrote {args.out} sha256={info['sha256']}")
        if args.manifest and args.tag:
            update_manifest(args.manifest, f'{args.model}.{args.tag}', {
                'file': info['file'], 'sha256': info['sha256'], 'size': info['size'], 'metrics': metrics,
                'recipe': recipe, 'command': command, 'budget': f'{res.epochs_done:g} epochs, {res.seconds:.0f} s',
                'hf_hub_id': f'gequiv-timm/{args.model}.{args.tag}',
                **({'evaluator': 'gequiv_timm.train:evaluate_pretrained'} if args.data in _builtin_sets() else {})})
    return 0
