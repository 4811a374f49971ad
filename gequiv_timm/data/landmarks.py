"""MNIST landmarks: five well-defined points per real digit, placed at random into a 64x64 canvas.

The keypoints are computed on the *upright* 28x28 digit (ink = pixels with intensity >= ``INK_THRESHOLD``):

====  ============  ==========================================================================================
 k    name          definition
====  ============  ==========================================================================================
 0    ``top``       the ink pixel in the topmost ink row whose column is nearest the centroid column
 1    ``bottom``    the ink pixel in the bottommost ink row whose column is nearest the centroid column
 2    ``left``      the ink pixel in the leftmost ink column whose row is nearest the centroid row
 3    ``right``     the ink pixel in the rightmost ink column whose row is nearest the centroid row
 4    ``centroid``  the intensity-weighted centre of mass of the digit (sub-pixel)
====  ============  ==========================================================================================

Ties (two ink pixels equally near) go to the smaller index. Each digit is then placed into an ``S x S`` canvas
(``S = 64``) by a random similarity transform applied to image and points alike: rotation by ``angle`` uniform in
``[-rotation, rotation]`` degrees (counter-clockwise as displayed), isotropic scale uniform in ``scale``, and a
translation of the digit centre from the canvas centre uniform in ``[-translate, translate]`` pixels per axis.
Points that leave the canvas are marked absent (``visible = False``). Everything is deterministic by seed.

Coordinates follow :mod:`gequiv_timm.layers.rcn`: ``(x, y)`` in pixels, ``x`` right, ``y`` down, pixel
``(row i, col j)`` centred at ``(j, i)``; the canvas covers ``[-0.5, S - 0.5)`` on each axis.

Normalising distance for NME (stored per sample as ``norm``): the digit's box size in the canvas,
``scale * sqrt(w * h)`` with ``w, h`` the width and height of the upright ink bounding box in pixels (counting
whole pixels, so a one-pixel dot has ``w = h = 1``). This is the box-size normalisation HRNet uses for AFLW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .mnist import _load_raw, split_indices, standardize

__all__ = ['KEYPOINT_NAMES', 'INK_THRESHOLD', 'digit_keypoints', 'ink_box_size', 'placement_matrices',
           'place_digits', 'LandmarkSplit', 'MNISTLandmarks', 'mnist_landmarks']

KEYPOINT_NAMES = ('top', 'bottom', 'left', 'right', 'centroid')
INK_THRESHOLD = 0.5


def _nearest(candidates: torch.Tensor, target: float) -> int:
    d = (candidates.double() - target).abs()
    return int(candidates[int(torch.argmin(d))])  # argmin returns the first (smallest index) on ties


def digit_keypoints(image: torch.Tensor, threshold: float = INK_THRESHOLD) -> torch.Tensor:
    """The five keypoints ``[5, 2]`` (x, y) of one upright digit ``[H, W]`` or ``[1, H, W]`` (see the module table).

    Raises ValueError when no pixel reaches ``threshold`` (there is no ink to locate).
    """
    img = image.squeeze(0) if image.dim() == 3 else image
    if img.dim() != 2:
        raise ValueError(f"digit_keypoints: expected one image [H, W] or [1, H, W], got {tuple(image.shape)}")
    ink = img >= threshold
    if not ink.any():
        raise ValueError(f"digit_keypoints: no pixel reaches the ink threshold {threshold}; cannot place keypoints")
    h, w = img.shape
    rows = torch.arange(h, dtype=torch.float64)
    cols = torch.arange(w, dtype=torch.float64)
    m = img.double()
    total = m.sum()
    cy = float((m.sum(1) * rows).sum() / total)
    cx = float((m.sum(0) * cols).sum() / total)
    rr, cc = ink.nonzero(as_tuple=True)
    top_r, bot_r = int(rr.min()), int(rr.max())
    left_c, right_c = int(cc.min()), int(cc.max())
    top = (_nearest(cc[rr == top_r], cx), top_r)
    bottom = (_nearest(cc[rr == bot_r], cx), bot_r)
    left = (left_c, _nearest(rr[cc == left_c], cy))
    right = (right_c, _nearest(rr[cc == right_c], cy))
    pts = [top, bottom, left, right, (cx, cy)]
    return torch.tensor(pts, dtype=torch.float32)


def ink_box_size(image: torch.Tensor, threshold: float = INK_THRESHOLD) -> float:
    """``sqrt(w * h)`` of the ink bounding box of one upright digit, in whole pixels."""
    img = image.squeeze(0) if image.dim() == 3 else image
    rr, cc = (img >= threshold).nonzero(as_tuple=True)
    if len(rr) == 0:
        raise ValueError(f"ink_box_size: no pixel reaches the ink threshold {threshold}")
    return math.sqrt(float(rr.max() - rr.min() + 1) * float(cc.max() - cc.min() + 1))


def placement_matrices(angle_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                       in_size: int = 28, out_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-sample maps of the placement, ``(forward [N, 2, 3], theta [N, 2, 3])``.

    ``forward`` maps input pixel (x, y, 1) to canvas pixels: ``p' = c_out + shift + s R(angle) (p - c_in)`` with
    ``c = (size - 1) / 2`` the image centres and ``R`` counter-clockwise as displayed (y down).
    ``theta`` is its inverse in normalised coordinates (``align_corners=False``), ready for ``F.affine_grid``.
    """
    a = torch.deg2rad(angle_deg.double())
    c, s = torch.cos(a), torch.sin(a)
    n = len(a)
    # with y pointing down, a counter-clockwise turn on screen is [[c, s], [-s, c]]
    R = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2) * scale.double()[:, None, None]
    cin = torch.full((2,), (in_size - 1) / 2.0, dtype=torch.float64)
    cout = torch.full((2,), (out_size - 1) / 2.0, dtype=torch.float64)
    t = cout + shift.double() - (R @ cin)
    fwd = torch.cat([R, t[..., None]], -1)  # [N, 2, 3]
    M = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    M[:, :2] = fwd
    Minv = torch.linalg.inv(M)

    def pix_to_norm(size):  # u = (2x + 1) / size - 1
        A = torch.eye(3, dtype=torch.float64)
        A[0, 0] = A[1, 1] = 2.0 / size
        A[0, 2] = A[1, 2] = 1.0 / size - 1
        return A

    theta = pix_to_norm(in_size) @ Minv @ torch.linalg.inv(pix_to_norm(out_size))
    return fwd.float(), theta[:, :2].float()


def place_digits(images: torch.Tensor, keypoints: torch.Tensor, angle_deg: torch.Tensor, scale: torch.Tensor,
                 shift: torch.Tensor, out_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp ``images [N, 1, h, w]`` (square) and their ``keypoints [N, K, 2]`` into ``out_size`` canvases.

    Returns ``(canvas [N, 1, S, S], keypoints [N, K, 2], visible [N, K] bool)``; bilinear sampling, zeros outside.
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"place_digits: expected square images [N, C, h, h], got {tuple(images.shape)}")
    fwd, theta = placement_matrices(angle_deg, scale, shift, images.shape[-1], out_size)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], out_size, out_size], align_corners=False)
    canvas = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    kp = keypoints @ fwd[:, :, :2].transpose(1, 2) + fwd[:, None, :, 2]
    visible = ((kp >= -0.5) & (kp < out_size - 0.5)).all(-1)
    return canvas, kp, visible


@dataclass
class LandmarkSplit:
    """One split: ``images [N, 1, S, S]`` in [0, 1], ``keypoints [N, K, 2]`` (x, y) canvas pixels, ``visible
    [N, K]`` bool, ``norm [N]`` the NME normalising distance (pixels), ``labels [N]`` digit classes, and the
    placement ``angle`` (deg), ``scale``, ``shift [N, 2]`` (pixels)."""

    images: torch.Tensor
    keypoints: torch.Tensor
    visible: torch.Tensor
    norm: torch.Tensor
    labels: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self, normalize: bool = True) -> torch.utils.data.TensorDataset:
        """``TensorDataset(image, keypoints, visible, norm)``, images standardised with the MNIST mean/std."""
        x = standardize(self.images) if normalize else self.images
        return torch.utils.data.TensorDataset(x, self.keypoints, self.visible, self.norm)


@dataclass
class MNISTLandmarks:
    """MNIST landmarks, train 4,000 / test 1,000 real digits (stratified split of :func:`split_indices`)."""

    train: LandmarkSplit
    test: LandmarkSplit
    seed: int
    keypoint_names: Tuple[str, ...] = KEYPOINT_NAMES
    config: Dict = field(default_factory=dict)


def _split(images, labels, seed_gen, rotation, scale, translate, canvas) -> LandmarkSplit:
    n = len(images)
    kps = torch.stack([digit_keypoints(im) for im in images])
    box = torch.tensor([ink_box_size(im) for im in images], dtype=torch.float32)
    angle = (torch.rand(n, generator=seed_gen, dtype=torch.float64) * 2 - 1) * rotation
    s = scale[0] + torch.rand(n, generator=seed_gen, dtype=torch.float64) * (scale[1] - scale[0])
    shift = (torch.rand(n, 2, generator=seed_gen, dtype=torch.float64) * 2 - 1) * translate
    out, kp, vis = place_digits(images, kps, angle, s, shift, canvas)
    return LandmarkSplit(out.clamp(0, 1), kp, vis, box * s.float(), labels.clone(), angle.float(), s.float(),
                         shift.float())


def mnist_landmarks(seed: int = 0, canvas: int = 64, rotation: float = 30.0, scale: Tuple[float, float] = (1.0, 1.8),
                    translate: float = 14.0, n_test: int = 1000) -> MNISTLandmarks:
    """Build MNIST landmarks deterministically for ``seed`` (see the module docstring).

    Args:
        seed: controls the split and every placement; the same seed gives identical tensors.
        canvas: output size ``S`` (square).
        rotation: max absolute rotation in degrees (uniform in ``[-rotation, rotation]``).
        scale: ``(min, max)`` isotropic scale of the 28x28 digit.
        translate: max shift of the digit centre from the canvas centre, pixels per axis.

    Example:
        >>> ds = mnist_landmarks(seed=0)
        >>> ds.train.images.shape, ds.train.keypoints.shape
        (torch.Size([4000, 1, 64, 64]), torch.Size([4000, 5, 2]))
    """
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"mnist_landmarks: scale must be (min, max) with 0 < min <= max, got {scale!r}")
    if rotation < 0 or translate < 0:
        raise ValueError(f"mnist_landmarks: rotation and translate must be >= 0, got {rotation!r}, {translate!r}")
    images, labels = _load_raw()
    tr, te = split_indices(seed, n_test=n_test)
    g = torch.Generator().manual_seed(4_099 * seed + 11)
    train = _split(images[tr], labels[tr], g, rotation, scale, translate, canvas)
    test = _split(images[te], labels[te], g, rotation, scale, translate, canvas)
    cfg = dict(seed=seed, canvas=canvas, rotation=rotation, scale=tuple(scale), translate=translate, n_test=n_test,
               ink_threshold=INK_THRESHOLD, norm='scale * sqrt(w*h) of the upright ink box')
    return MNISTLandmarks(train, test, seed, KEYPOINT_NAMES, cfg)
