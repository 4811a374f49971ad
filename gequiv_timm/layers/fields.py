"""Random band-limited test images that can be rotated *exactly*: for measuring equivariance at angles that do not
map the pixel grid to itself (45 degrees for C8, 30 for C12...).

Resampling a pixel image by 45 degrees is itself approximate, so a measured "equivariance error" would mix the
layer's error with the interpolation's. A :class:`RandomField` is a sum of plane waves defined on the whole plane;
:meth:`RandomField.sample` evaluates it at the transformed pixel coordinates ``g^-1 p``, so ``field.sample(g)`` *is*
``g . x`` (no interpolation, no content lost at the corners). With :func:`centre` the output is compared at the
rotation centre only, where ``g`` moves no pixel, so no interpolation enters on the output side either: what is
measured is the layer's own error (translation equivariance makes the centre as good as any pixel; the batch gives
the statistics). :meth:`~gequiv_timm.layers.gconv.EquivariantMixin.check_equivariance` uses both when asked about
such elements.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .groups import get_group

__all__ = ['RandomField', 'centre']


class RandomField:
    """A random band-limited field: ``x(p) = sum_j a_j cos(k_j . p + phi_j) / sqrt(waves / 2)`` per channel, with
    wave vectors of random direction and length uniform in ``[0, 2 pi / wavelength]`` (so every wavelength is at
    least ``wavelength`` pixels), amplitudes ``N(0, 1)`` and phases uniform; about unit variance.

    Args:
        shape: the leading shape, e.g. ``(B, C)`` for planar images or ``(B, C, |G|)`` for a map on the group (each
            group channel its own field).
        size: ``(H, W)``; ``p`` are pixel offsets from the image centre ``((H-1)/2, (W-1)/2)``, (row, col).
        wavelength: the shortest wavelength in pixels (8 by default: smooth on a 3x3 filter's scale).
        waves: plane waves per channel.
        seed, dtype, device: as usual; the same seed gives the same field.

    Example:
        >>> f = RandomField((2, 1), (9, 9), seed=0)
        >>> g = get_group('c8')
        >>> bool(torch.allclose(f.sample(g, 2), torch.rot90(f.sample(), 1, dims=(-2, -1)), atol=1e-12))
        True
    """

    def __init__(self, shape: Sequence[int], size: Sequence[int], wavelength: float = 8.0, waves: int = 48,
                 seed: int = 0, dtype: torch.dtype = torch.float64, device=None):
        if wavelength <= 0 or waves < 1:
            raise ValueError(f"RandomField: wavelength must be > 0 and waves >= 1, got {wavelength!r}, {waves!r}")
        self.shape, self.size = tuple(int(s) for s in shape), (int(size[0]), int(size[1]))
        self.dtype, self.device = dtype, device
        gen = torch.Generator().manual_seed(int(seed))
        n = math.prod(self.shape)
        ang = torch.rand(n, waves, generator=gen, dtype=torch.float64) * 2 * math.pi
        mag = torch.rand(n, waves, generator=gen, dtype=torch.float64) * 2 * math.pi / wavelength
        self._k = torch.stack([mag * torch.cos(ang), mag * torch.sin(ang)], -1)  # [n, waves, 2] (row, col)
        self._phase = torch.rand(n, waves, generator=gen, dtype=torch.float64) * 2 * math.pi
        self._amp = torch.randn(n, waves, generator=gen, dtype=torch.float64) / math.sqrt(waves / 2)

    def sample(self, group=None, g: int = 0, group_axis: Optional[bool] = None) -> torch.Tensor:
        """The field transformed by element ``g`` of ``group``, sampled on the pixels: ``[*shape, H, W]``.

        ``(g . x)(p) = x(g^-1 p)`` exactly, for any rotation angle. The pixel grid is the one
        :meth:`~.groups.Group.transform_plane` returns: ``(W, H)`` when ``g`` includes an odd number of whole
        quarter turns (``rot90`` swaps the axes), else ``(H, W)``. With ``group_axis`` (default: when the last
        entry of ``shape`` is ``|G|``) the field is a map on the group and its group axis is permuted too:
        ``(g . f)(p, h) = f(g^-1 p, g^-1 h)``, the action of :meth:`~.groups.Group.transform_group_map`.
        """
        h, w = self.size
        grp = get_group(group) if group is not None and g else None
        if grp is not None and ((4 * grp.decompose(g)[1]) // grp.rotations) % 2:
            h, w = w, h
        u, v = torch.meshgrid(torch.arange(h, dtype=torch.float64) - (h - 1) / 2,
                              torch.arange(w, dtype=torch.float64) - (w - 1) / 2, indexing='ij')
        perm = None
        if grp is not None:
            m, _ = grp.decompose(g)
            theta = grp.angle(g)
            c, s = math.cos(theta), math.sin(theta)
            if m:  # g^-1 = R^-r M: mirror (u -> -u) first
                u = -u
            u, v = c * u + s * v, -s * u + c * v
            if group_axis is None:
                group_axis = len(self.shape) >= 1 and self.shape[-1] == grp.order and grp.order > 1
            if group_axis:
                perm = grp.permutation(g)
        pts = torch.stack([u.reshape(-1), v.reshape(-1)], -1)  # [HW, 2]
        arg = torch.einsum('nwd,pd->nwp', self._k, pts) + self._phase[..., None]
        x = (self._amp[..., None] * torch.cos(arg)).sum(1).reshape(*self.shape, h, w)
        if perm is not None:
            x = x[..., perm, :, :]
        return x.to(dtype=self.dtype, device=self.device)


def centre(y: torch.Tensor) -> torch.Tensor:
    """The value at the centre pixel ``[..., H, W] -> [...]`` (``H``, ``W`` odd: the rotation centre is a pixel)."""
    h, w = y.shape[-2:]
    if h % 2 == 0 or w % 2 == 0:
        raise ValueError(f"centre: a map of even size {h}x{w} has no centre pixel; use an input size whose output "
                         f"is odd-sized")
    return y[..., (h - 1) // 2, (w - 1) // 2]
