"""Learned canonicalization, the pure PyTorch parts: a small G-CNN that predicts a group element of the input, and the
per-sample action of group elements on image batches.

Kaba et al., "Equivariance with Learned Canonicalization Functions", ICML 2023; Mondal et al., "Equivariant
Adaptation of Large Pretrained Models", NeurIPS 2023. A canonicalizer ``c`` is a function of the image with values
in the group ``G`` that is *equivariant*, ``c(g x) = g c(x)``; then ``c(x)^-1 x`` is the same image for every
``g x`` of the orbit of ``x`` (``c(g x)^-1 g x = c(x)^-1 g^-1 g x``), and any network run on it is invariant.

:class:`GroupCanonicalizer` computes ``c`` as the argmax of group logits ``l(x) in R^|G|`` that permute under the
group, ``l(g x)[h] = l(x)[g^-1 h]`` (the regular representation, the layout of a group axis in
:mod:`.groups`), so ``argmax l(g x) = g argmax l(x)``: a lifting group convolution, group convolutions (batch norm,
ReLU), a last group convolution to one field, and the spatial mean of that field (``[B, 1, |G|, h, w] -> [B, |G|]``).
With odd kernels, symmetric padding and stride 1, every layer commutes with p4 / p4m exactly (to float rounding) at
every input size (:mod:`.gconv`); the spatial mean is invariant. The network sees a downscaled copy:
``F.adaptive_avg_pool2d(x, s)`` with ``s = min(size, H, W)``. Adaptive average pooling averages over the bins
``[floor(i H / s), ceil((i + 1) H / s))``, which mirror onto each other under ``i -> s - 1 - i``, and it treats the
two axes alike, so it commutes exactly with ``rot90`` and flips for *every* ``H, W`` (not only multiples of ``s``):
the downscaling costs no exactness.

For ``cN`` / ``dN`` with rotations other than quarter turns, the group convolutions are approximate at those
rotations (harmonic filters, :mod:`.filter_basis`) and so are the resampled rotations of :class:`GroupAction`.

:class:`GroupAction` applies one element per sample: ``out[b] = T(g_b) x[b]`` with ``T`` the action of
:meth:`~.groups.Group.transform_plane` (``rot90`` and flips for p4 / p4m: exact index permutations; for the other
rotations of ``cN`` / ``dN``, ``grid_sample`` about the image centre, bilinear by default, zeros outside). It returns
the stack of all ``|G|`` transformed copies ``[|G|, B, C, H, W]``; the model picks one per sample with a one-hot
weight (exact: ``1 * x + 0 * y = x``), which is also how the straight-through gradient reaches the canonicalizer.
"""
# No ``from __future__ import annotations``: TorchScript reads the class annotations of GroupAction.
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gconv import GroupBatchNorm, GroupConv2d
from .groups import get_group

__all__ = ['GroupAction', 'GroupCanonicalizer', 'select_elements', 'straight_through_onehot']


class GroupAction(nn.Module):
    """All ``|G|`` transforms of an image batch: ``[B, C, H, W] -> [|G|, B, C, H, W]`` with ``out[h] = T(h) x``.

    ``T(h)`` is :meth:`Group.transform_plane <gequiv_timm.layers.groups.Group.transform_plane>` of element
    ``h = M^m R^r``: the rotation by ``2 pi r / N`` (whole quarter turns by ``rot90``; the rest, under 90 degrees,
    resampled about the image centre with ``grid_sample`` in ``mode``, zeros outside), then the up-down mirror if
    ``m``. Exact (an index permutation) for every element of p4 / p4m and for the quarter turns and mirrors of
    ``cN`` / ``dN``. A quarter turn swaps ``H`` and ``W``: the stack needs square inputs unless every element is a
    mirror or a half turn (checked by the caller).

    Args:
        group: a group name (``'p4'``, ``'p4m'``, ``'c8'``, ...) or :class:`~gequiv_timm.layers.groups.Group`.
        mode: ``'bilinear'`` (default), ``'bicubic'`` or ``'nearest'`` for the resampled rotations.
        inverse: ``out[h] = T(h^-1) x`` instead (the turn back of a canonicalizer's prediction ``h``).

    Example:
        >>> act = GroupAction('p4m')
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = act(x)
        >>> y.shape, bool(torch.equal(y[5], torch.flip(torch.rot90(x, 1, (-2, -1)), (-2,))))
        (torch.Size([8, 2, 3, 8, 8]), True)
    """

    __jit_ignored_attributes__ = ['group']
    mirrors: List[int]
    quarters: List[int]
    rests: List[float]

    def __init__(self, group='p4', mode: str = 'bilinear', inverse: bool = False):
        super().__init__()
        if mode not in ('bilinear', 'bicubic', 'nearest'):
            raise ValueError(f"GroupAction: mode must be 'bilinear', 'bicubic' or 'nearest', got {mode!r}")
        self.group = get_group(group)
        self.order = self.group.order
        self.mode = mode
        self.inverse = bool(inverse)
        n = self.group.rotations
        self.mirrors, self.quarters, self.rests = [], [], []
        for h in range(self.order):
            m, r = self.group.decompose(self.group.inv(h) if inverse else h)
            q = (4 * r) // n
            rest = 2 * math.pi * r / n - q * math.pi / 2 if (4 * r) % n else 0.0
            self.mirrors.append(int(m))
            self.quarters.append(int(q))
            self.rests.append(float(rest))
        self.exact = self.group.exact
        self.swaps_axes = any(q % 2 == 1 for q in self.quarters)

    def extra_repr(self) -> str:
        return (f"{self.group.name}" + (f", mode={self.mode!r}" if not self.exact else '') +
                (', inverse=True' if self.inverse else ''))

    def _rotate(self, x: torch.Tensor, angle: float) -> torch.Tensor:
        """``out(p) = x(R^-1 p)`` about the image centre (the pixel-centre convention of
        :func:`~gequiv_timm.layers.groups.rotate_plane`), by ``grid_sample`` (``align_corners=False``, zeros)."""
        h, w = x.shape[-2], x.shape[-1]
        rows = torch.arange(h, dtype=torch.float64, device=x.device) - (h - 1) / 2
        cols = torch.arange(w, dtype=torch.float64, device=x.device) - (w - 1) / 2
        u = rows.view(-1, 1).expand(h, w)
        v = cols.view(1, -1).expand(h, w)
        c, s = math.cos(angle), math.sin(angle)
        su = c * u + s * v + (h - 1) / 2
        sv = -s * u + c * v + (w - 1) / 2
        grid = torch.stack([(2 * sv + 1) / w - 1, (2 * su + 1) / h - 1], -1).to(x.dtype)
        flat = x.reshape(-1, 1, h, w)
        out = F.grid_sample(flat, grid.unsqueeze(0).expand(flat.shape[0], h, w, 2), mode=self.mode,
                            padding_mode='zeros', align_corners=False)
        return out.reshape(x.shape)

    def transform(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """``T(h) x`` (``T(h^-1) x`` when ``inverse``) for one element ``h``, all samples alike."""
        rest = self.rests[h]
        if rest != 0.0:
            x = self._rotate(x, rest)
        q = self.quarters[h]
        if q != 0:
            x = torch.rot90(x, q, [-2, -1])
        if self.mirrors[h] != 0:
            x = torch.flip(x, [-2])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        for h in range(self.order):
            outs.append(self.transform(x, h))
        return torch.stack(outs, 0)


def select_elements(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_h weights[b, h] * stack[h, b]``: ``[|G|, B, ...]`` and ``[B, |G|]`` -> ``[B, ...]``.

    With a one-hot ``weights`` (or :func:`straight_through_onehot`, whose forward value is exactly one-hot) this is
    the chosen copy exactly: ``1 * x + 0 * y + ... = x`` in floating point for finite values.
    """
    w = weights.transpose(0, 1).to(stack.dtype)
    for _ in range(stack.dim() - 2):
        w = w.unsqueeze(-1)
    return (w * stack).sum(0)


def straight_through_onehot(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hard argmax one-hot in the forward pass, softmax gradient in the backward pass (straight-through estimator).

    ``onehot(argmax l) + p - p.detach()`` with ``p = softmax(l / temperature)``: its value is exactly the one-hot
    (``p - p.detach()`` is exactly zero), its gradient that of ``p``. Ties go to the lowest index (``argmax``).
    """
    p = torch.softmax(logits / temperature, dim=-1)
    hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(p.dtype)
    return hard + (p - p.detach())


class GroupCanonicalizer(nn.Module):
    """A small G-CNN that outputs group logits ``[B, |G|]`` which permute under the group:
    ``l(g x)[h] = l(x)[g^-1 h]`` (exactly, to float rounding, for p4 / p4m), so ``argmax l`` is an equivariant
    canonicalization function (module docstring).

    Layers: ``adaptive_avg_pool2d`` to ``s = min(size, H, W)`` (skipped when the input is already ``s x s``), a
    lifting :class:`~.gconv.GroupConv2d` ``in_chans -> width`` fields (``kernel_size``, same padding),
    :class:`~.gconv.GroupBatchNorm`, ReLU, then ``depth`` times ``width -> width`` group convs (3x3) with batch norm and
    ReLU, a last ``width -> 1`` group conv (3x3), and the spatial mean.

    Args:
        in_chans: image channels ``C``.
        group: ``'p4'``, ``'p4m'``, ``'cN'``, ``'dN'``.
        width: fields per hidden layer (``width * |G|`` channels).
        depth: hidden group convs after the lifting layer (>= 0).
        kernel_size: odd size of the lifting filter.
        size: the side of the downscaled copy it sees.

    Shapes: ``[B, C, H, W] -> [B, |G|]``. Cost: about ``(C k^2 + 9 depth width + 9) width |G|^2 s^2`` multiply-adds
    (p4, width 8, depth 2, k 5, s 64, C 3: 0.09 GMACs; p4m with width 4 the same; resnet18 at 224: 1.8 GMACs).

    Example:
        >>> net = GroupCanonicalizer(1, 'p4', width=4, depth=1, size=16).eval()
        >>> x = torch.randn(2, 1, 28, 28)
        >>> l, lr = net(x), net(torch.rot90(x, 1, (-2, -1)))
        >>> l.shape, bool(torch.allclose(lr, l[:, [3, 0, 1, 2]], atol=1e-5))
        (torch.Size([2, 4]), True)
    """

    __jit_ignored_attributes__ = ['group']

    def __init__(self, in_chans: int = 3, group='p4', width: int = 8, depth: int = 2, kernel_size: int = 5,
                 size: int = 64):
        super().__init__()
        for name, v, lo in (('in_chans', in_chans, 1), ('width', width, 1), ('depth', depth, 0),
                            ('kernel_size', kernel_size, 1), ('size', size, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"GroupCanonicalizer: {name} must be an int >= {lo}, got {v!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"GroupCanonicalizer: kernel_size must be odd (an even filter has no centre pixel, so "
                             f"its rotations are off by half a pixel), got {kernel_size}; use {kernel_size + 1}")
        self.group = get_group(group)
        if self.group.order == 1:
            raise ValueError("GroupCanonicalizer: group 'z2' has one element; there is no pose to predict. Use 'p4', "
                             "'p4m', 'cN' or 'dN'.")
        self.order = self.group.order
        self.in_chans, self.width, self.depth, self.kernel_size, self.size = in_chans, width, depth, kernel_size, size
        g = self.group
        layers: List[nn.Module] = [GroupConv2d(in_chans, width, kernel_size, 'z2', g, padding=kernel_size // 2,
                                               bias=False), GroupBatchNorm(width, g), nn.ReLU()]
        for _ in range(depth):
            layers += [GroupConv2d(width, width, 3, g, g, padding=1, bias=False), GroupBatchNorm(width, g), nn.ReLU()]
        layers.append(GroupConv2d(width, 1, 3, g, g, padding=1, bias=True))
        self.net = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return f"{self.group.name}, size={self.size}"

    def downscale(self, x: torch.Tensor) -> torch.Tensor:
        """The copy the network sees: ``adaptive_avg_pool2d`` to ``min(size, H, W)`` (commutes with p4m exactly)."""
        s = min(self.size, x.shape[-2], x.shape[-1])
        if x.shape[-2] != s or x.shape[-1] != s:
            x = F.adaptive_avg_pool2d(x, [s, s])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(self.downscale(x))  # [B, 1, |G|, s, s]
        return y.mean(dim=(-2, -1)).flatten(1)
