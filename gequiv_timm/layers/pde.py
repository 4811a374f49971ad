"""PDE-based group equivariant layers on the roto-translation space M2 = R^2 x S^1.

After Smets, Portegies, Bekkers & Duits, "PDE-based Group Equivariant Convolutional Neural Networks", JMIV 2022
(arXiv:2001.09046). Their reference implementation is LieTorch (``lietorch.nn.m2``); this module is plain PyTorch
and keeps LieTorch's public names (``LiftM2Cartesian``, ``ConvectionM2``, ``DilationM2``, ``ErosionM2``,
``LinearM2``, ``MaxProjectM2``, ``CDEPdeLayerM2``) so that its users feel at home. No weights or code are shared
with LieTorch; conventions are the ones written below.

Layout and conventions
----------------------
A feature map on M2 is ``[B, C, Or, H, W]``: ``Or`` orientations ``theta_o = 2 pi o / Or``. Positions use
``x`` to the right (column index) and ``y`` *up* (minus the row index), angles turn counter-clockwise as displayed,
so ``torch.rot90(img, 1, dims=(-2, -1))`` is the rotation by ``+90`` degrees. A point of M2 is identified with the
group element ``g = (x, y, theta)`` of SE(2), with ``(x, y, th) (x', y', th') = ((x, y) + R_th (x', y'), th + th')``.

The group acts on feature maps by left translation, ``(L_h U)(g) = U(h^{-1} g)``. Rotating an image by ``+90``
degrees (``Or`` a multiple of 4) therefore acts on an M2 map as ``torch.rot90`` on the spatial axes followed by
``torch.roll(.., Or // 4, dims=2)``; every layer here commutes with that action exactly (to float rounding), which
:meth:`M2EquivariantMixin.check_equivariance` verifies by actually rotating inputs.

The left-invariant frame at ``g = (x, y, theta)`` is ``A1 = cos th d_x + sin th d_y`` (forward), ``A2 = -sin th
d_x + cos th d_y`` (lateral), ``A3 = d_theta`` (turning). All trainable coefficients (convection vector, metric)
are expressed in this frame, which is what makes the layers equivariant.

The PDE layers (one per channel, coefficients per channel)
----------------------------------------------------------
* convection ``dW/dt + c . grad W = 0`` with a left-invariant vector field: the solution at ``t = 1`` is
  ``W(g) = U(g g0^{-1})`` with ``g0 = exp(c)``; we train the group element ``g0 = (x0, y0, theta0)`` directly
  (:class:`ConvectionM2`) and resample with trilinear interpolation (periodic in orientation).
* dilation ``dW/dt = +||grad W||_G^{2 alpha}`` and erosion ``dW/dt = -||grad W||_G^{2 alpha}`` with a left-invariant
  metric ``G = diag(w1^2, w2^2, w3^2)`` in the frame ``(A1, A2, A3)``. Their viscosity solutions at ``t = 1`` are
  morphological (max-plus / min-plus) convolutions::

      dilation  W(g) = sup_h  U(h) - k(h^{-1} g),      erosion  W(g) = inf_h  U(h) + k(h^{-1} g),

  with the kernel approximated through the logarithmic norm of Smets et al. (their ``rho_c``)::

      k(g) = nu_alpha * rho(g)^(2 alpha / (2 alpha - 1)),   nu_alpha = (2 alpha - 1) / (2 alpha)^(2 alpha / (2 alpha - 1)),
      rho(g)^2 = (w1 c1)^2 + (w2 c2)^2 + (w3 c3)^2,
      c1 = h x + (th / 2) y,   c2 = -(th / 2) x + h y,   c3 = th,   h = (th / 2) cot(th / 2)  (h(0) = 1),

  where ``(c1, c2, c3)`` are the exponential coordinates of ``g = (x, y, th)`` (``g = exp(c1 A1 + c2 A2 + c3 A3)``,
  ``th`` wrapped to ``(-pi, pi]``). ``rho`` is symmetric, ``rho(g^{-1}) = rho(g)``, so ``k(h^{-1} g) = k(g^{-1}
  h)`` and the kernel only needs the offset of ``h`` seen from ``g``'s own frame: that is why the sampled kernel
  is stored per output orientation, ``[C, Or, kOr, kH, kW]`` (:func:`m2_morphological_kernel`).
  ``alpha`` must lie in ``(1/2, 1]``; ``k >= 0`` with ``k(e) = 0``, so dilation >= input >= erosion.

  Degenerate metrics: the metric enters as ``w_i^2``, so a negative ``w_i`` is the same metric as ``|w_i|``, and
  ``w_i = 0`` is a well-defined flat direction (the kernel does not penalise it; the operation becomes a plain
  max / min filter along it). Neither ever yields NaN, in values or gradients. Non-finite coefficients
  (``nan``/``inf`` in the metric or in ``g0``) raise a ValueError naming the layer.

The max-plus / min-plus convolution itself, on which dilation and erosion run, is the engine in
:mod:`gequiv_timm.layers.morphology` (memory O(output), no unfold; re-exported here).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import EquivarianceError, check_equivariance, check_float_tensor
from .groups import get_group
from .morphology import _check_m2, morphological_convolution_m2
from .pde_native import native_convection_m2, use_native_convection

__all__ = [
    'LiftM2Cartesian', 'ReflectionPadM2', 'ConvectionM2', 'DilationM2', 'ErosionM2', 'LinearM2', 'MaxProjectM2',
    'SumProjectM2', 'BatchNormM2', 'CDEPdeLayerM2', 'M2EquivariantMixin', 'PDEStem',
    'lift_m2_cartesian', 'reflection_pad_m2', 'convection_m2', 'morphological_convolution_m2', 'dilation_m2',
    'erosion_m2', 'linear_m2', 'max_project_m2', 'sum_project_m2', 'm2_morphological_kernel',
    'm2_log_coordinates', 'rotate_m2', 'rotated_kernel_bank_matrix',
]

_KernelSize = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# checks and the group action
# ----------------------------------------------------------------------------------------------------------------
def _check_planar(x: torch.Tensor, name: str, channels: int) -> None:
    """A floating-point planar batch ``[B, channels, H, W]``, or a TypeError (kind) / ValueError (shape) that says
    what to do (the policy of :mod:`gequiv_timm.layers.checks`)."""
    check_float_tensor(x, name, f'an image batch [B, {channels}, H, W]')
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected a planar input [B, {channels}, H, W], got shape {tuple(x.shape)}"
                         + (f"; {x.shape[1]} channels: build it with in_chans={x.shape[1]}"
                            if x.dim() == 4 else ''))


def _check_finite(t: torch.Tensor, name: str, what: str) -> None:
    if t.device.type == 'meta':  # shape-only tensors (timm's meta-device construction) have no values to check
        return
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[:4].tolist()
        raise ValueError(f"{name}: {what} has non-finite entries (nan/inf) at {bad}; it must be finite. If this "
                         f"happened during training, lower the learning rate or clip gradients, then reload a good "
                         f"checkpoint or call reset_parameters().")


def _triple(kernel_size: _KernelSize, name: str) -> Tuple[int, int, int]:
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        ks = (kernel_size,) * 3
    else:
        ks = tuple(kernel_size)
    if len(ks) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1
                               for k in ks):
        raise ValueError(f"{name}: kernel_size must be an odd positive int or a triple (kOr, kH, kW) of odd positive "
                         f"ints (odd: the kernel needs a centre), got {kernel_size!r}")
    return ks  # type: ignore[return-value]


_P4 = get_group('p4')


def rotate_m2(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Rotate an M2 map ``[..., Or, H, W]`` by ``k * 90`` degrees (``Or`` a multiple of 4): element ``k`` of the
    one point-group abstraction (:class:`~gequiv_timm.layers.groups.Group` ``'p4'``, whose plane action the group
    convolutions use too) on the spatial axes, and a cyclic shift of the orientation axis by ``k * Or / 4``."""
    orientations = x.shape[-3]
    if orientations % 4:
        raise ValueError(f"rotate_m2: a 90-degree rotation needs Or to be a multiple of 4, got Or={orientations}")
    return torch.roll(_P4.transform_plane(x, k % 4), k * orientations // 4, dims=-3)


class M2EquivariantMixin:
    """Adds :meth:`check_equivariance`: rotate a random input by 90, 180, 270 degrees and compare.

    Subclasses set ``in_planar`` / ``out_planar`` (a planar map ``[B, C, H, W]`` rotates by ``rot90`` alone) and
    implement ``_example_input``.
    """

    in_planar: bool = False
    out_planar: bool = False

    def _example_input(self, size: int = 13, orientations: int = 8, batch: int = 2) -> torch.Tensor:
        p = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
        kw = dict(dtype=p.dtype, device=p.device) if p is not None else {}
        c = self.in_channels  # type: ignore[attr-defined]
        if self.in_planar:
            return torch.randn(batch, c, size, size, **kw)
        return torch.randn(batch, c, orientations, size, size, **kw)

    @staticmethod
    def _rot(x: torch.Tensor, k: int, planar: bool) -> torch.Tensor:
        return _P4.transform_plane(x, k % 4) if planar else rotate_m2(x, k)

    @torch.no_grad()
    def check_equivariance(self, x: Optional[torch.Tensor] = None, size: int = 13, orientations: int = 8,
                           rtol: Optional[float] = None) -> EquivarianceError:
        """The error ``max_k |f(R^k x) - R^k f(x)|`` over quarter turns ``k = 1, 2, 3``
        (:func:`~gequiv_timm.layers.checks.check_equivariance`: a float, the absolute error; ``.relative`` is it
        divided by ``max |f(x)|``). Raises an AssertionError when the relative error exceeds a given ``rtol``. The module keeps its train/eval mode (batch
        norm in train mode uses batch statistics, which are rotation invariant).
        """
        if x is None:
            x = self._example_input(size, orientations)
        return check_equivariance(self, x, lambda t, k: self._rot(t, k, self.in_planar),  # type: ignore[arg-type]
                                  lambda t, k: self._rot(t, k, self.out_planar), (1, 2, 3), rtol=rtol,
                                  name=type(self).__name__)


# ----------------------------------------------------------------------------------------------------------------
# lifting, padding, projection
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _rotation_matrices(kernel_size: int, orientations: int, disk: bool) -> torch.Tensor:
    k = kernel_size
    r = (k - 1) / 2
    # explicit device='cpu' throughout: these tables are cached, and must not pick up a default device (e.g. timm
    # building a model under `with torch.device('meta')`)
    idx = torch.arange(k * k, device='cpu').view(k, k)
    mask = None
    if disk:
        ar = torch.arange(k, dtype=torch.float64, device='cpu') - r
        rows, cols = torch.meshgrid(ar, ar, indexing='ij')
        mask = ((rows ** 2 + cols ** 2) <= (r + 0.5) ** 2).flatten().to(torch.float64)

    def bilinear(theta: float) -> torch.Tensor:
        # rotated kernel psi_theta(p) = psi(R_{-theta} p), p = (x, y) = (col - r, r - row)
        m = torch.zeros(k * k, k * k, dtype=torch.float64, device='cpu')
        c, s = math.cos(theta), math.sin(theta)
        for row in range(k):
            for col in range(k):
                x, y = col - r, r - row
                qx, qy = c * x + s * y, -s * x + c * y
                fc, fr = qx + r, r - qy
                c0, r0 = math.floor(fc + 1e-12), math.floor(fr + 1e-12)
                ac, ar = fc - c0, fr - r0
                for dr, wr in ((0, 1 - ar), (1, ar)):
                    for dc, wc in ((0, 1 - ac), (1, ac)):
                        rr, cc = r0 + dr, c0 + dc
                        w = wr * wc
                        if w > 1e-12 and 0 <= rr < k and 0 <= cc < k:
                            m[row * k + col, rr * k + cc] += w
        return m

    if orientations % 4 == 0:
        q = orientations // 4
        base = [bilinear(2 * math.pi * o / orientations) for o in range(q)]
        # rotation by a further r quarter turns is exactly a permutation of the output positions
        mats = [None] * orientations
        for quarter in range(4):
            perm = torch.rot90(idx, quarter, dims=(0, 1)).flatten()
            for o in range(q):
                mats[quarter * q + o] = base[o][perm]
    else:
        mats = [bilinear(2 * math.pi * o / orientations) for o in range(orientations)]
    out = torch.stack(mats)
    if mask is not None:
        out = out * mask[None, :, None]
    return out


def rotated_kernel_bank_matrix(kernel_size: int, orientations: int, disk: bool = True) -> torch.Tensor:
    """Interpolation matrices ``[Or, k*k, k*k]``: ``psi_o = M[o] @ psi`` is the flattened ``k x k`` kernel rotated
    by ``theta_o = 2 pi o / Or`` (bilinear, ``psi_theta(p) = psi(R_{-theta} p)``), with ``M[o + Or/4]`` an exact
    ``rot90`` of ``M[o]``. ``disk`` zeroes positions farther than ``(k-1)/2 + 1/2`` from the centre, so that all
    orientations share one round support."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"rotated_kernel_bank_matrix: kernel_size must be odd, got {kernel_size}")
    if orientations < 1:
        raise ValueError(f"rotated_kernel_bank_matrix: orientations must be >= 1, got {orientations}")
    return _rotation_matrices(int(kernel_size), int(orientations), bool(disk)).clone()


_LIFT_UNFOLD_MAX = 32  # Cin * k * k up to which the CPU lift runs as im2col + bmm (a grayscale 5x5 lift: 25)


def lift_m2_cartesian(x: torch.Tensor, weight: torch.Tensor, rotation_matrix: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Lifting convolution ``R^2 -> M2``: correlate ``x [B, Cin, H, W]`` with ``Or`` rotated copies of ``weight
    [Cout, Cin, k, k]`` (``rotation_matrix [Or, k*k, k*k]`` from :func:`rotated_kernel_bank_matrix`).

    ``out[b, c, o] = (psi_{c, theta_o} * x)`` with ``psi_theta(p) = psi(R_{-theta} p)``; output ``[B, Cout, Or,
    H', W']``. Rotating ``x`` by 90 degrees rotates the output and shifts its orientations by ``Or / 4``.
    """
    co, ci, k, _ = weight.shape
    orientations = rotation_matrix.shape[0]
    bank = torch.einsum('opq,ciq->ocip', rotation_matrix.to(weight.dtype), weight.reshape(co, ci, k * k))
    bank = bank.transpose(0, 1).reshape(co * orientations, ci, k, k)
    b = bias.repeat_interleave(orientations) if bias is not None else None
    if x.device.type == 'cpu' and ci * k * k <= _LIFT_UNFOLD_MAX:
        # few input channels (a grayscale image): im2col + one matrix product per sample. The CPU convolution's
        # weight gradient is slow for one input channel at one thread (~1.3x this, forward + backward, on
        # [64, 1, 28, 28] -> 192 maps); the same products of the same 25 values (equal outputs in the tests)
        bsz, _, h, w = x.shape
        ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        cols = F.unfold(x, k, padding=padding, stride=stride)  # [B, Cin*k*k, H'*W']
        y = torch.bmm(bank.reshape(co * orientations, ci * k * k).expand(bsz, -1, -1), cols)
        if b is not None:
            y = y + b.view(1, -1, 1)
        return y.view(bsz, co, orientations, ho, wo)
    y = F.conv2d(x, bank, b, stride, padding)
    return y.unflatten(1, (co, orientations))


class LiftM2Cartesian(M2EquivariantMixin, nn.Module):
    """Learned lifting ``[B, Cin, H, W] -> [B, Cout, Or, H', W']`` by rotated copies of a 2-D kernel.

    Args:
        in_channels, out_channels: ``Cin``, ``Cout``.
        orientations: ``Or``; a multiple of 4 gives exact 90-degree equivariance.
        kernel_size: odd ``k``.
        stride, padding: as ``nn.Conv2d`` (``padding_mode`` ``'zeros'`` or ``'reflect'``).
        bias: one bias per output channel, shared over orientations.
        disk: restrict the kernel to a disk so that every rotated copy has the same support.

    Example:
        >>> lift = LiftM2Cartesian(1, 8, orientations=8, kernel_size=5, padding=2)
        >>> lift(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 8, 8, 28, 28])
    """

    in_planar = True

    def __init__(self, in_channels: int, out_channels: int, orientations: int = 8, kernel_size: int = 5,
                 stride: int = 1, padding: int = 0, padding_mode: str = 'zeros', bias: bool = False,
                 disk: bool = True):
        super().__init__()
        for n, v in (('in_channels', in_channels), ('out_channels', out_channels), ('orientations', orientations),
                     ('kernel_size', kernel_size), ('stride', stride)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LiftM2Cartesian: {n} must be a positive int, got {v!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"LiftM2Cartesian: kernel_size must be odd (rotations need a centre pixel), got "
                             f"{kernel_size}; use {kernel_size + 1}")
        if padding_mode not in ('zeros', 'reflect'):
            raise ValueError(f"LiftM2Cartesian: padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.orientations, self.kernel_size = orientations, kernel_size
        self.stride, self.padding, self.padding_mode = stride, int(padding), padding_mode
        self.disk = disk
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer('rotation_matrix', rotated_kernel_bank_matrix(kernel_size, orientations, disk).to(
            device=self.weight.device, dtype=self.weight.dtype), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init; fan-in is ``Cin * (number of pixels in the disk)``."""
        support = int((_rotation_matrices(self.kernel_size, self.orientations, self.disk)[0].sum(1) > 0).sum())
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (self.in_channels * support)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, orientations={self.orientations}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_planar(x, 'LiftM2Cartesian', self.in_channels)
        pad = self.padding
        if pad and self.padding_mode == 'reflect':
            x, pad = F.pad(x, (pad,) * 4, mode='reflect'), 0
        if min(x.shape[-2:]) + 2 * pad < self.kernel_size:
            raise ValueError(f"LiftM2Cartesian: input {tuple(x.shape[-2:])} is smaller than the kernel "
                             f"{self.kernel_size}")
        return lift_m2_cartesian(x, self.weight, self.rotation_matrix, self.bias, self.stride, pad)


def reflection_pad_m2(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflection padding of the spatial axes of ``[B, C, Or, H, W]`` (the orientation axis is periodic and is
    never padded). Output ``[B, C, Or, H + 2p, W + 2p]``."""
    _check_m2(x, 'reflection_pad_m2', min_size=padding + 1)
    if padding == 0:
        return x
    b, c = x.shape[:2]
    return F.pad(x.flatten(1, 2), (padding,) * 4, mode='reflect').unflatten(1, (c, x.shape[2]))


class ReflectionPadM2(nn.Module):
    """Module form of :func:`reflection_pad_m2`."""

    def __init__(self, padding: int):
        super().__init__()
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"ReflectionPadM2: padding must be a non-negative int, got {padding!r}")
        self.padding = padding

    def extra_repr(self) -> str:
        return f"padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reflection_pad_m2(x, self.padding)


def max_project_m2(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, Or, H, W] -> [B, C, H, W]``: maximum over orientations (rotation equivariant planar map)."""
    _check_m2(x, 'max_project_m2')
    return x.amax(dim=2)


def sum_project_m2(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, Or, H, W] -> [B, C, H, W]``: sum over orientations."""
    _check_m2(x, 'sum_project_m2')
    return x.sum(dim=2)


class MaxProjectM2(nn.Module):
    """Maximum projection over the orientation axis, ``[B, C, Or, H, W] -> [B, C, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_project_m2(x)


class SumProjectM2(nn.Module):
    """Sum projection over the orientation axis, ``[B, C, Or, H, W] -> [B, C, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_project_m2(x)


# ----------------------------------------------------------------------------------------------------------------
# convection
# ----------------------------------------------------------------------------------------------------------------
def convection_m2(x: torch.Tensor, g0: torch.Tensor, padding_mode: str = 'border') -> torch.Tensor:
    """Solve the convection PDE for unit time: ``W(g) = U(g g0^{-1})`` per channel.

    Args:
        x: ``U``, ``[B, C, Or, H, W]``.
        g0: ``[C, 3]``, one group element ``(x0, y0, theta0)`` per channel (pixels, pixels, radians). Content at
            ``h`` moves to ``h g0``: forward by ``x0`` and sideways by ``y0`` in its own frame, turning by
            ``theta0``.
        padding_mode: how samples outside the image are read (``grid_sample``'s ``'border'``, ``'reflection'``,
            ``'zeros'``).

    For ``g = (p, theta_o)``: ``g g0^{-1} = (p - R_{theta_o - theta0} (x0, y0), theta_o - theta0)``. The orientation
    shift is a periodic linear interpolation, the spatial shift a bilinear ``grid_sample`` (``align_corners=True``)
    per (channel, orientation): trilinear interpolation in all. Output ``[B, C, Or, H, W]``. On CPU with
    ``padding_mode='border'`` the same stencil runs on the compiled operator of :mod:`~gequiv_timm.layers.pde_native`
    (same values up to float rounding; ``set_morphology_backend('torch')`` selects the ``grid_sample`` path).
    """
    _check_m2(x, 'convection_m2', min_size=2)
    b, c, orientations, h, w = x.shape
    if g0.shape != (c, 3):
        raise ValueError(f"convection_m2: g0 must be [C={c}, 3] (x0, y0, theta0 per channel), got {tuple(g0.shape)}")
    _check_finite(g0, 'convection_m2', 'g0')
    g0 = g0.to(x.dtype)
    step = 2 * math.pi / orientations
    # orientation: V(., o) = U(., o - s), s = theta0 / step, linear and periodic
    s = g0[:, 2] / step
    n = torch.floor(s.detach())
    o = torch.arange(orientations, device=x.device)
    if padding_mode == 'border' and use_native_convection(x):  # the same resampling on the compiled operator
        ang = o.to(x.dtype).view(1, -1) * step - g0[:, 2:3]
        cos, sin = torch.cos(ang), torch.sin(ang)
        ux = -(cos * g0[:, 0:1] - sin * g0[:, 1:2])
        uy = -(sin * g0[:, 0:1] + cos * g0[:, 1:2])
        return native_convection_m2(x, s - n, n.long(), -uy, ux)
    frac = (s - n).view(1, c, 1, 1, 1)
    base = (torch.arange(c, device=x.device) * orientations).view(c, 1)
    i0 = base + torch.remainder(o.view(1, -1) - n.long().view(-1, 1), orientations)
    i1 = base + torch.remainder(o.view(1, -1) - n.long().view(-1, 1) - 1, orientations)
    flat = x.flatten(1, 2)
    v = (1 - frac) * flat.index_select(1, i0.flatten()).view_as(x) + frac * flat.index_select(1, i1.flatten()).view_as(x)
    # space: W(p, o) = V(p + u, o), u = -R_{theta_o - theta0} (x0, y0) in (x right, y up)
    ang = o.to(x.dtype).view(1, -1) * step - g0[:, 2:3]
    cos, sin = torch.cos(ang), torch.sin(ang)
    ux = -(cos * g0[:, 0:1] - sin * g0[:, 1:2])
    uy = -(sin * g0[:, 0:1] + cos * g0[:, 1:2])
    shift = torch.stack((2 * ux / (w - 1), -2 * uy / (h - 1)), dim=-1)  # [C, Or, 2] as (col, row), normalised
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device),
                            torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device), indexing='ij')
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0) + shift.reshape(c * orientations, 1, 1, 2)
    v = v.permute(1, 2, 0, 3, 4).reshape(c * orientations, b, h, w)
    out = F.grid_sample(v, grid, mode='bilinear', padding_mode=padding_mode, align_corners=True)
    return out.view(c, orientations, b, h, w).permute(2, 0, 1, 3, 4).contiguous()


class ConvectionM2(M2EquivariantMixin, nn.Module):
    """Learned left-invariant convection ``W(g) = U(g g0^{-1})`` per channel (see :func:`convection_m2`).

    Args:
        channels: ``C``.
        init_scale: ``g0`` starts as ``N(0, init_scale)`` pixels for ``(x0, y0)`` and ``N(0, init_scale / 10)``
            radians for ``theta0`` (zero is the identity, where bilinear interpolation has one-sided gradients).
        padding_mode: see :func:`convection_m2`.

    Shapes: ``[B, C, Or, H, W] -> [B, C, Or, H, W]``; parameter ``g0 [C, 3]``.
    """

    def __init__(self, channels: int, init_scale: float = 0.5, padding_mode: str = 'border'):
        super().__init__()
        if padding_mode not in ('border', 'reflection', 'zeros'):
            raise ValueError(f"ConvectionM2: padding_mode must be 'border', 'reflection' or 'zeros', got "
                             f"{padding_mode!r}")
        self.in_channels = self.channels = channels
        self.init_scale = init_scale
        self.padding_mode = padding_mode
        self.g0 = nn.Parameter(torch.zeros(channels, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.g0.normal_(0.0, 1.0).mul_(torch.tensor([self.init_scale, self.init_scale, self.init_scale / 10]))

    def extra_repr(self) -> str:
        return f"{self.channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'ConvectionM2', self.channels, min_size=2)
        return convection_m2(x, self.g0, self.padding_mode)


# ----------------------------------------------------------------------------------------------------------------
# morphological kernels, dilation and erosion (the max-plus engine is layers/morphology.py)
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _log_coordinates(orientations: int, kernel_size: Tuple[int, int, int]) -> torch.Tensor:
    ko, kh, kw = kernel_size
    step = 2 * math.pi / orientations
    th = (torch.arange(ko, dtype=torch.float64, device='cpu') - ko // 2) * step
    th = torch.remainder(th + math.pi, 2 * math.pi) - math.pi  # wrap to [-pi, pi)
    dy = -(torch.arange(kh, dtype=torch.float64, device='cpu') - kh // 2)  # y up
    dx = torch.arange(kw, dtype=torch.float64, device='cpu') - kw // 2

    def frame(theta_o: float) -> torch.Tensor:
        c, s = math.cos(theta_o), math.sin(theta_o)
        t = th.view(-1, 1, 1)
        x = (c * dx.view(1, 1, -1) + s * dy.view(1, -1, 1)).expand(ko, kh, kw)
        y = (-s * dx.view(1, 1, -1) + c * dy.view(1, -1, 1)).expand(ko, kh, kw)
        half = t / 2
        hcot = torch.where(t == 0, torch.ones_like(t), half / torch.tan(torch.where(t == 0, torch.ones_like(t), half)))
        c1 = hcot * x + half * y
        c2 = -half * x + hcot * y
        c3 = t.expand(ko, kh, kw)
        return torch.stack((c1, c2, c3), dim=-1)

    if orientations % 4 == 0:
        q = orientations // 4
        base = [frame(o * step) for o in range(q)]
        # a quarter turn more of the output frame is exactly a rot90 of the spatial offsets
        out = [torch.rot90(base[o], quarter, dims=(1, 2)) for quarter in range(4) for o in range(q)]
    else:
        out = [frame(o * step) for o in range(orientations)]
    return torch.stack(out)  # [Or, kOr, kH, kW, 3]


def m2_log_coordinates(orientations: int, kernel_size: _KernelSize) -> torch.Tensor:
    """Exponential coordinates ``(c1, c2, c3)`` of every kernel offset seen from each output orientation's frame:
    ``[Or, kOr, kH, kW, 3]`` (float64). Entry ``[o, a, i, j]`` is ``log(g_o^{-1} h)`` with ``g_o = (0, 0,
    theta_o)`` and ``h = (j - kW//2, kH//2 - i, (a - kOr//2) 2 pi / Or)``."""
    ks = _triple(kernel_size, 'm2_log_coordinates')
    return _log_coordinates(int(orientations), ks).clone()


def _check_alpha(alpha: float, name: str) -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) \
            or not 0.5 < alpha <= 1.0:
        raise ValueError(f"{name}: alpha must be a number in (0.5, 1] (the PDE dW/dt = ||grad W||^(2 alpha) needs "
                         f"alpha > 1/2 for a finite kernel exponent 2 alpha / (2 alpha - 1)); got {alpha!r}. "
                         f"LieTorch's default is 0.65.")
    return float(alpha)


def m2_morphological_kernel(metric_params: torch.Tensor, orientations: int, kernel_size: _KernelSize,
                            alpha: float = 0.65, t: float = 1.0) -> torch.Tensor:
    """Sampled approximate dilation/erosion kernel ``[C, Or, kOr, kH, kW]``.

    ``k = nu_alpha * t * (rho / t)^(2a / (2a - 1))``, ``nu_alpha = (2a - 1) / (2a)^(2a / (2a - 1))``,
    ``rho^2 = sum_i (w_i c_i)^2`` with ``metric_params = w [C, 3]`` in the frame (forward, lateral, angular) and
    ``c`` from :func:`m2_log_coordinates`. Computed through ``rho^2`` (no square root), so values and gradients
    are finite for every finite ``w`` (zero and negative included: the metric is ``w^2``).
    """
    alpha = _check_alpha(alpha, 'm2_morphological_kernel')
    if metric_params.dim() != 2 or metric_params.shape[1] != 3:
        raise ValueError(f"m2_morphological_kernel: metric_params must be [C, 3] (forward, lateral, angular), got "
                         f"{tuple(metric_params.shape)}")
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"m2_morphological_kernel: the time t must be a finite positive number, got {t!r}")
    _check_finite(metric_params, 'm2_morphological_kernel', 'metric_params')
    ks = _triple(kernel_size, 'm2_morphological_kernel')
    coords = _log_coordinates(int(orientations), ks).to(device=metric_params.device, dtype=metric_params.dtype)
    rho2 = torch.einsum('okhwi,ci->cokhw', coords.square(), metric_params.square())
    beta = 2 * alpha / (2 * alpha - 1)
    nu = (2 * alpha - 1) / (2 * alpha) ** beta
    return nu * t * (rho2 / (t * t)).pow(beta / 2)


def dilation_m2(x: torch.Tensor, metric_params: torch.Tensor, kernel_size: _KernelSize, alpha: float = 0.65,
                iterations: int = 1) -> torch.Tensor:
    """Approximate solution of ``dW/dt = ||grad W||_G^(2 alpha)`` at ``t = 1`` (``iterations`` applications):
    max-plus convolution with :func:`m2_morphological_kernel`. ``[B, C, Or, H, W] -> same``."""
    _check_m2(x, 'dilation_m2')
    k = m2_morphological_kernel(metric_params, x.shape[2], kernel_size, alpha)
    for _ in range(iterations):
        x = morphological_convolution_m2(x, k, erosion=False)
    return x


def erosion_m2(x: torch.Tensor, metric_params: torch.Tensor, kernel_size: _KernelSize, alpha: float = 0.65,
               iterations: int = 1) -> torch.Tensor:
    """Approximate solution of ``dW/dt = -||grad W||_G^(2 alpha)`` at ``t = 1``: min-plus convolution."""
    _check_m2(x, 'erosion_m2')
    k = m2_morphological_kernel(metric_params, x.shape[2], kernel_size, alpha)
    for _ in range(iterations):
        x = morphological_convolution_m2(x, k, erosion=True)
    return x


class _MorphologyM2(M2EquivariantMixin, nn.Module):
    erosion = False

    def __init__(self, channels: int, kernel_size: _KernelSize = (3, 5, 5), alpha: float = 0.65, iterations: int = 1):
        super().__init__()
        name = type(self).__name__
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{name}: channels must be a positive int, got {channels!r}")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"{name}: iterations must be a positive int, got {iterations!r}")
        self.in_channels = self.channels = channels
        self.kernel_size = _triple(kernel_size, name)
        self.alpha = _check_alpha(alpha, name)
        self.iterations = iterations
        self.metric_params = nn.Parameter(torch.empty(channels, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Metric scales uniform in ``[0.5, 1.5]`` (spatial, per pixel) and ``[0.5, 1.5]`` per radian."""
        nn.init.uniform_(self.metric_params, 0.5, 1.5)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, alpha={self.alpha}"
                + (f", iterations={self.iterations}" if self.iterations > 1 else ''))

    def kernel(self, orientations: int) -> torch.Tensor:
        """The sampled kernel ``[C, Or, kOr, kH, kW]`` for ``orientations``."""
        return m2_morphological_kernel(self.metric_params, orientations, self.kernel_size, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_m2(x, name, self.channels)
        if self.kernel_size[0] > x.shape[2]:
            raise ValueError(f"{name}: orientation kernel size {self.kernel_size[0]} exceeds Or={x.shape[2]}")
        _check_finite(self.metric_params, name, 'metric_params')
        k = self.kernel(x.shape[2])
        for _ in range(self.iterations):
            x = morphological_convolution_m2(x, k, erosion=self.erosion)
        return x


class DilationM2(_MorphologyM2):
    """Learned left-invariant fractional dilation (max-plus convolution), per channel; see the module docstring.

    Args:
        channels: ``C``.
        kernel_size: odd ``k`` or ``(kOr, kH, kW)``; the support on which the kernel is sampled.
        alpha: the PDE exponent, in ``(1/2, 1]``.
        iterations: how many times the morphological convolution is applied (time ``t = iterations``).

    Parameter ``metric_params [C, 3]``: ``(w1, w2, w3)``, the metric ``diag(w1^2, w2^2, w3^2)`` in the frame
    (forward, lateral, angular); larger ``w`` = a steeper kernel = less dilation in that direction.
    """

    erosion = False


class ErosionM2(_MorphologyM2):
    """Learned left-invariant fractional erosion (min-plus convolution), per channel; as :class:`DilationM2`."""

    erosion = True


# ----------------------------------------------------------------------------------------------------------------
# linear combination and the CDE layer
# ----------------------------------------------------------------------------------------------------------------
def linear_m2(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Channel mixing on M2 (a ``1 x 1 x 1`` group convolution): ``out[b, d] = sum_c weight[d, c] x[b, c]``.
    ``x [B, Cin, Or, H, W]``, ``weight [Cout, Cin]`` -> ``[B, Cout, Or, H, W]``, contiguous: one matrix product
    per sample on the ``[Cin, Or*H*W]`` view (``bmm`` with the weight expanded; the same values as the einsum
    ``'bcohw,dc->bdohw'``, without its permuted copies, ~2x faster with its backward, and the batch norm and the
    compiled operators that follow get a contiguous map)."""
    b = x.shape[0]
    y = torch.bmm(weight.expand(b, *weight.shape), x.flatten(2)).view(b, weight.shape[0], *x.shape[2:])
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1, 1)
    return y


class ChannelMixing(nn.Module):
    """The parameters of a learned linear combination of channels (weight ``[Cout, Cin]``, optional bias ``[Cout]``,
    initialised as ``nn.Linear``), shared by :class:`LinearM2` and ``pde_r2.LinearR2``, which add the forward."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}"


class LinearM2(M2EquivariantMixin, ChannelMixing):
    """Learned linear combination of channels, ``[B, Cin, Or, H, W] -> [B, Cout, Or, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'LinearM2', self.in_channels)
        return linear_m2(x, self.weight, self.bias)


class BatchNormM2(nn.BatchNorm3d):
    """Batch norm of an M2 map ``[B, C, Or, H, W]``: one mean / variance / affine pair per channel, shared over
    orientations and positions (so it commutes with rotations, in train and eval mode).

    The same module as ``nn.BatchNorm3d`` (same parameters, buffers and state-dict keys; ``isinstance`` holds), but
    computed on the ``[B, C, Or*H*W]`` view of the input: PyTorch's CPU kernel is about twice as fast on 3-D input.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (3, 5):
            raise ValueError(f"BatchNormM2: expected an M2 feature map [B, C, Or, H, W], got shape "
                             f"{tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            self._check_input_dim(x)
            return super().forward(x)
        return super().forward(x.flatten(2)).view(x.shape)


class CDEPdeLayerM2(M2EquivariantMixin, nn.Module):
    """One PDE-G-CNN layer: convection -> dilation -> erosion (``iterations`` times) -> linear -> batch norm.

    This is the "CDE" layer of Smets et al. (2022): the convection transports features along the learned
    left-invariant vector field, the dilation / erosion pair (a morphological opening/closing-like operation with
    learned anisotropic metric) replaces ReLU + max pooling, and the linear combination mixes channels.
    Batch norm statistics are shared over orientations (:class:`BatchNormM2`), so the layer stays equivariant in
    train mode too.

    Args:
        in_channels, out_channels: channels before / after the linear combination.
        kernel_size: odd ``k`` or ``(kOr, kH, kW)`` of the morphological kernels.
        alpha: the dilation/erosion exponent in ``(1/2, 1]``.
        iterations: repetitions of convection -> dilation -> erosion (shared coefficients).

    Shapes: ``[B, Cin, Or, H, W] -> [B, Cout, Or, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _KernelSize = (3, 5, 5),
                 alpha: float = 0.65, iterations: int = 1, momentum: float = 0.1):
        super().__init__()
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"CDEPdeLayerM2: iterations must be a positive int, got {iterations!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.iterations = iterations
        self.convection = ConvectionM2(in_channels)
        self.dilation = DilationM2(in_channels, kernel_size, alpha)
        self.erosion = ErosionM2(in_channels, kernel_size, alpha)
        self.linear = LinearM2(in_channels, out_channels)
        self.batch_normalization = BatchNormM2(out_channels, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'CDEPdeLayerM2', self.in_channels, min_size=2)
        for _ in range(self.iterations):
            x = self.erosion(self.dilation(self.convection(x)))
        return self.batch_normalization(self.linear(x))


# ----------------------------------------------------------------------------------------------------------------
# a planar-in, planar-out stem for timm backbones
# ----------------------------------------------------------------------------------------------------------------
class PDEStem(M2EquivariantMixin, nn.Module):
    """Planar stem built from PDE layers: ``[B, in_chans, H, W] -> [B, out_chans, H / stride, W / stride]``.

    ``lift (k x k, 'same' padding) -> BN -> CDE layers -> spatial max pool by `stride` -> max projection over
    orientations -> 1x1 conv -> BN -> ReLU``. The projection makes the output a planar map that rotates with the
    input (exactly for 90-degree turns when ``H`` and ``W`` are multiples of ``stride``, up to the backbone's own
    padding otherwise); it is meant to replace a timm backbone's stem (``conv1/bn1/act1/maxpool`` of a ResNet).

    Args:
        in_chans, out_chans: planar channels in and out.
        stride: total spatial reduction (1, 2 or 4 typical; pooling is max pooling of window = stride).
        width: channels on M2. orientations: ``Or`` (a multiple of 4 for exact quarter-turn equivariance).
        depth: number of CDE layers. kernel_size: the lifting kernel. pde_kernel_size: the morphological kernel.
    """

    in_planar = True
    out_planar = True
    first_conv = 'lift'  # the stem's own first layer (timm's ``first_conv`` metadata points at it once injected)
    layout = 'planar'

    def __init__(self, in_chans: int = 3, out_chans: int = 64, stride: int = 4, width: int = 16,
                 orientations: int = 8, depth: int = 1, kernel_size: int = 5, pde_kernel_size: _KernelSize = (3, 5, 5),
                 alpha: float = 0.65):
        super().__init__()
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"PDEStem: stride must be a positive int, got {stride!r}")
        self.in_channels = self.in_chans = in_chans
        self.out_chans = out_chans
        self.stride = stride
        self.orientations = orientations
        self.lift = LiftM2Cartesian(in_chans, width, orientations, kernel_size, padding=kernel_size // 2)
        self.lift_norm = BatchNormM2(width)
        self.layers = nn.Sequential(*[CDEPdeLayerM2(width, width, pde_kernel_size, alpha) for _ in range(depth)])
        self.project = MaxProjectM2()
        self.proj = nn.Conv2d(width, out_chans, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_planar(x, 'PDEStem', self.in_chans)
        x = self.layers(self.lift_norm(self.lift(x)))
        if self.stride > 1:
            x = F.max_pool2d(x.flatten(1, 2), self.stride, self.stride, ceil_mode=True).unflatten(1, x.shape[1:3])
        return self.act(self.norm(self.proj(self.project(x))))
