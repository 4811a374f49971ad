"""Distorted MNIST from the 5,000 real digits, after the protocols of Jaderberg et al., "Spatial Transformer Networks"
(NeurIPS 2015), section 4.1:

=========  ===========  ==================================================================================
protocol   image size   distortion (per digit, sampled from a seeded generator)
=========  ===========  ==================================================================================
``R``      28 x 28      rotation by a uniform angle in [-90, 90] degrees
``RTS``    42 x 42      rotation in [-45, 45] degrees, isotropic scale in [0.7, 1.2], and a uniform translation
                        of the digit inside a 42 x 42 canvas (its scaled 28 x 28 box stays on the canvas)
``P``      28 x 28      projective: the four image corners moved by N(0, 0.1 * side) noise (truncated at 2
                        std, so the quadrilateral stays convex), then a scale in
                        [0.75, 1.0] (so that the digit stays in the frame)
``E``      28 x 28      elastic: a thin-plate spline whose 16 control points (a 4 x 4 grid) move by a uniform
                        offset of up to 0.075 * side each way, then a scale in [0.75, 1.0]
=========  ===========  ==================================================================================

The paper gives the distortion families; the exact noise levels for P and E above are this module's choices (the
paper's text does not pin every constant down), and are recorded in :data:`PROTOCOLS`. Every set is deterministic
for a seed: the split is ``split_indices(seed)`` (4,000 train / 1,000 test, stratified) and the distortions are drawn
from a generator seeded by ``(seed, protocol, split)``. Warps go through :mod:`gequiv_timm.layers.stn` with
``align_corners=False``, bilinear sampling and zero padding.

Each split keeps, per digit, the sampling transform ``theta`` that made it (output pixel -> location in the upright
digit, in the output image's normalised coordinates): ``[N, 3, 3]`` for R / RTS / P (affine ones have last row
``(0, 0, 1)``; for RTS the source frame is the digit padded to 42 x 42), ``[N, 16, 2]`` TPS source points for E.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from ..layers.stn import homography_from_points, projective_grid, similarity_theta, tps_control_points, tps_grid, warp
from .mnist import ImageSplit, _load_raw, split_indices

__all__ = ['PROTOCOLS', 'DistortedSplit', 'DistortedMNIST', 'distort_images', 'distorted_mnist']

PROTOCOLS = {
    'R': dict(size=28, max_angle_deg=90.0),
    'RTS': dict(size=42, max_angle_deg=45.0, scale_range=(0.7, 1.2)),
    'P': dict(size=28, corner_std=0.1, scale_range=(0.75, 1.0)),
    'E': dict(size=28, grid_size=4, max_offset=0.075, scale_range=(0.75, 1.0)),
}
_ALIGN = False


@dataclass
class DistortedSplit(ImageSplit):
    """A split of distorted MNIST: :class:`~gequiv_timm.data.mnist.ImageSplit` plus per-digit ``theta`` (see the
    module doc)."""

    theta: torch.Tensor


@dataclass
class DistortedMNIST:
    """Distorted MNIST (``protocol`` one of ``R``, ``RTS``, ``P``, ``E``): 4,000 train / 1,000 test digits."""

    train: DistortedSplit
    test: DistortedSplit
    seed: int
    protocol: str

    @property
    def image_size(self) -> int:
        return PROTOCOLS[self.protocol]['size']


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _to3x3(theta: torch.Tensor) -> torch.Tensor:
    bottom = theta.new_tensor([0., 0., 1.]).expand(theta.shape[0], 1, 3)
    return torch.cat((theta, bottom), 1)


def distort_images(images: torch.Tensor, protocol: str, generator: torch.Generator
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distort ``images [N, 1, 28, 28]`` with ``protocol``; returns ``(distorted [N, 1, S, S], theta)``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown distorted-MNIST protocol {protocol!r}: expected one of {tuple(PROTOCOLS)}")
    if images.dim() != 4 or images.shape[-2:] != (28, 28):
        raise ValueError(f"distort_images expects [N, C, 28, 28] digits, got {tuple(images.shape)}")
    cfg = PROTOCOLS[protocol]
    n, g = images.shape[0], generator
    x = images.double()
    if protocol in ('R', 'RTS'):
        a = torch.deg2rad(_uniform(n, -cfg['max_angle_deg'], cfg['max_angle_deg'], g))
        if protocol == 'R':
            scale, t = torch.ones(n, dtype=torch.float64), torch.zeros(n, 2, dtype=torch.float64)
        else:
            scale = _uniform(n, *cfg['scale_range'], g)
            pad = (cfg['size'] - 28) // 2
            x = F.pad(x, (pad, pad, pad, pad))
            # the scaled 28x28 box has half-size 14 s pixels = 14 s / 21 normalised units on the 42 canvas
            room = (1.0 - 28.0 * scale / cfg['size']).clamp_min(0)
            t = (2 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 1) * room[:, None]
        # forward map digit -> canvas: p_out = s R(-a) p_in + t (R(a) as sampling turns the displayed digit
        # counter-clockwise, like data.rotate_images); the sampling map is its inverse p_in = R(a) (p_out - t) / s
        inv = similarity_theta(a, 1.0 / scale, torch.zeros_like(a), torch.zeros_like(a))  # [N, 2, 3]
        shift = -(inv[:, :, :2] @ t[:, :, None])
        theta = torch.cat((inv[:, :, :2], shift), 2)
        grid = F.affine_grid(theta, [n, 1, cfg['size'], cfg['size']], align_corners=_ALIGN)
        out = warp(x, grid, _ALIGN)
        theta = _to3x3(theta)
    elif protocol == 'P':
        corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]], dtype=torch.float64)
        # noise of std 0.1 * side = 0.2 normalised units, truncated at 2 std so the quadrilateral stays convex
        # (no fold through the horizon); then shrink by s (digit stays inside)
        sd = 2 * cfg['corner_std']
        noise = (torch.randn(n, 4, 2, generator=g, dtype=torch.float64) * sd).clamp(-2 * sd, 2 * sd)
        scale = _uniform(n, *cfg['scale_range'], g)
        dst = (corners + noise) * scale[:, None, None]
        theta = homography_from_points(corners.expand(n, 4, 2), dst)
        out = warp(x, projective_grid(theta, 28, _ALIGN), _ALIGN)
    else:  # 'E'
        ctrl = tps_control_points(cfg['grid_size'], torch.float64)
        off = (2 * torch.rand(n, *ctrl.shape, generator=g, dtype=torch.float64) - 1) * (2 * cfg['max_offset'])
        scale = _uniform(n, *cfg['scale_range'], g)
        # the TPS grid is linear in the source points, so dividing them by s zooms out by s after the spline
        theta = (ctrl + off) / scale[:, None, None]
        out = warp(x, tps_grid(theta, ctrl, 28, _ALIGN), _ALIGN)
    return out.clamp(0, 1).float(), theta.float()


def distorted_mnist(protocol: str = 'RTS', seed: int = 0, n_test: int = 1000) -> DistortedMNIST:
    """Build distorted MNIST deterministically for ``(protocol, seed)`` from the 5,000 real digits (see module doc).

    Example:
        >>> ds = distorted_mnist('RTS', seed=0)
        >>> ds.train.images.shape, ds.test.images.shape
        (torch.Size([4000, 1, 42, 42]), torch.Size([1000, 1, 42, 42]))
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown distorted-MNIST protocol {protocol!r}: expected one of {tuple(PROTOCOLS)}")
    images, labels = _load_raw()
    tr, te = split_indices(seed, n_test=n_test)
    salt = {'R': 1, 'RTS': 2, 'P': 3, 'E': 4}[protocol]
    splits = []
    for part, idx in enumerate((tr, te)):
        g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * salt + 101 * part + 11)
        x, theta = distort_images(images[idx], protocol, g)
        splits.append(DistortedSplit(x, labels[idx].clone(), theta))
    return DistortedMNIST(splits[0], splits[1], seed, protocol)
