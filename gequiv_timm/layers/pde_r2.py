"""PDE layers on R^2 (translation equivariant): LieTorch's ``lietorch.nn.r2`` family in plain PyTorch.

After Smets, Portegies, Bekkers & Duits, "PDE-based Group Equivariant Convolutional Neural Networks", JMIV 2022
(arXiv:2001.09046), where the R2 layers are the translation-only baseline of the M2 layers in
:mod:`gequiv_timm.layers.pde`. Names and argument meanings follow LieTorch (``ConvectionR2``, ``DilationR2``,
``ErosionR2``, ``LinearR2``, ``MorphologicalConvolutionR2``, ``CDEPdeLayerR2``, ``DEPdeLayerR2``,
``SpatialResampleR2``); the code is our own.

Layout and conventions
----------------------
A feature map is ``[B, C, H, W]``; positions are ``p = (x, y)`` with ``x`` to the right (column) and ``y`` *up*
(minus the row), as in :mod:`~gequiv_timm.layers.pde`. The layers commute with integer translations away from the
image border (where the finite image ends, a translation is not a symmetry): :meth:`R2EquivariantMixin.
check_equivariance` shifts an input by whole pixels and compares outputs at least :meth:`~R2EquivariantMixin.reach`
pixels from the border and the wrap-around seam.

The PDEs (per channel, coefficients per channel) and their discretisation
------------------------------------------------------------------------
* convection ``dW/dt + c . grad W = 0``: ``W(p) = U(p - c)`` at ``t = 1`` (content moves by ``c``); sampled with
  bilinear interpolation (border values beyond the image) -- :func:`convection_r2`.
* dilation ``dW/dt = +||grad W||_G^{2 alpha}``, erosion ``dW/dt = -||grad W||_G^{2 alpha}`` with the metric
  ``G = H^T H`` (``metric_params = H [C, 2, 2]``, LieTorch's parametrisation; any ``H`` gives a positive
  semi-definite ``G``, so no constraint is needed). Their viscosity solutions at ``t = 1`` are the morphological
  convolutions (Hopf-Lax formulas) ``W(p) = sup_q U(q) - k(p - q)`` and ``W(p) = inf_q U(q) + k(p - q)`` with::

      k(v) = nu_alpha * ||v||_{G^{-1}}-dual^beta = nu_alpha * |H v|^beta,   beta = 2 alpha / (2 alpha - 1),
      nu_alpha = (2 alpha - 1) / (2 alpha)^beta

  sampled on the ``kH x kW`` grid of offsets ``v`` (:func:`r2_morphological_kernel`), the exact Hopf-Lax kernel of
  the Hamiltonian ``|p|^{2 alpha}`` (LieTorch scales the same kernel by ``1 / beta`` instead of ``nu_alpha``; the
  learned ``H`` absorbs the constant). The max-plus / min-plus convolution runs on the compiled operator of
  :mod:`~gequiv_timm.layers.pde_native` through :func:`~gequiv_timm.layers.morphology.morphological_convolution_r2`.
* the CDE layer chains convection -> dilation -> erosion (``iterations`` times: operator splitting of the sum of the
  three right-hand sides), then a learned linear combination of channels and batch norm.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .checks import EquivarianceError, check_float_tensor
from .morphology import morphological_convolution_r2
from .pde import ChannelMixing, _check_alpha, _check_finite, convection_m2

__all__ = [
    'CDEPdeLayerR2',
    'ConvectionR2',
    'DEPdeLayerR2',
    'DilationR2',
    'ErosionR2',
    'LinearR2',
    'MorphologicalConvolutionR2',
    'R2EquivariantMixin',
    'SpatialResampleR2',
    'convection_r2',
    'dilation_r2',
    'erosion_r2',
    'linear_r2',
    'morphological_convolution_r2',
    'r2_morphological_kernel',
]

_Size2 = Union[int, Sequence[int]]


def _check_r2(x: torch.Tensor, name: str, channels: int | None = None, min_size: int = 1) -> None:
    check_float_tensor(x, name, 'an R2 feature map [B, C, H, W]')
    if x.dim() != 4:
        raise ValueError(f"{name}: expected an R2 feature map [B, C, H, W], got shape {tuple(x.shape)}"
                         + (" (an M2 map? use the M2 layers of gequiv_timm.layers.pde)" if x.dim() == 5 else ''))
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name}: spatial size {tuple(x.shape[-2:])} is too small; need at least "
                         f"{min_size}x{min_size}")


def _pair(kernel_size: _Size2, name: str) -> tuple[int, int]:
    ks = (kernel_size,) * 2 if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) \
        else tuple(kernel_size)
    if len(ks) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in ks):
        raise ValueError(f"{name}: kernel_size must be an odd positive int or a pair (kH, kW) of odd positive ints "
                         f"(odd: the kernel needs a centre), got {kernel_size!r}")
    return ks  # type: ignore[return-value]


def _check_channels(name: str, **values) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")


class R2EquivariantMixin:
    """Adds :meth:`check_equivariance` for translations: shift a random input by whole pixels and compare.

    Subclasses implement :meth:`reach` (how far, in pixels, an output value looks into its input) and set
    ``in_channels``.
    """

    def reach(self) -> int:
        """Pixels from which an output value draws (0 for point-wise layers)."""
        return 0

    def _shift_out(self, shift: tuple[int, int]) -> tuple[int, int]:
        """The output shift that an input shift produces (the same, unless the layer resamples)."""
        return shift

    @torch.no_grad()
    def check_equivariance(self, x: torch.Tensor | None = None, size: int = 24,
                           shifts: Sequence[tuple[int, int]] = ((1, 2), (-3, 1), (2, -2)),
                           rtol: float | None = None) -> EquivarianceError:
        """``max_s |f(T_s x) - T_s f(x)|`` over the pixel shifts ``s = (rows, cols)``, compared where neither the
        image border nor the wrap-around seam of ``torch.roll`` is within :meth:`reach` plus the shift (in output
        pixels) of the point. Returns an :class:`~gequiv_timm.layers.checks.EquivarianceError` (``.relative`` = divided by
        ``max |f(x)|``); raises an AssertionError when a given ``rtol`` is exceeded. The module keeps its mode (batch
        norm in train mode sees the rolled border: check in eval mode)."""
        if x is None:
            p = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
            kw = dict(dtype=p.dtype, device=p.device) if p is not None else {}
            x = torch.randn(2, self.in_channels, size, size, **kw)  # type: ignore[attr-defined]
        y = self(x)  # type: ignore[operator]
        scale = y.abs().max().item() if y.numel() else 0.0
        per = {}
        for s in shifts:
            s = (int(s[0]), int(s[1]))
            so = self._shift_out(s)
            ys = self(torch.roll(x, s, dims=(-2, -1)))  # type: ignore[operator]
            yr = torch.roll(y, so, dims=(-2, -1))
            m = self._margin(s, so)
            h, w = ys.shape[-2:]
            if 2 * m >= min(h, w):
                raise ValueError(f"{type(self).__name__}.check_equivariance: the input ({tuple(x.shape[-2:])}) is "
                                 f"too small for the layer's reach {self.reach()} and shift {s}; use a larger size")
            per[s] = (ys - yr)[..., m:h - m, m:w - m].abs().max().item()
        err = max(per.values(), default=0.0)
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float('inf'))
        out = EquivarianceError(err, rel, per)
        if rtol is not None and rel > rtol:
            raise AssertionError(f"{type(self).__name__}: relative equivariance error {rel:.3g} > rtol {rtol:.3g}")
        return out

    def _margin(self, s: tuple[int, int], so: tuple[int, int]) -> int:
        return self.reach() + max(abs(v) for v in so)


# ----------------------------------------------------------------------------------------------------------------
# convection
# ----------------------------------------------------------------------------------------------------------------
def convection_r2(x: torch.Tensor, c: torch.Tensor, padding_mode: str = 'border') -> torch.Tensor:
    """Solve ``dW/dt + c . grad W = 0`` for unit time: ``W(p) = U(p - c)``, per channel.

    ``x [B, C, H, W]``, ``c [C, 2]`` = ``(cx, cy)`` in pixels (``x`` right, ``y`` up): content moves by ``c``.
    Bilinear interpolation (``grid_sample``, ``align_corners=True``); outside the image ``padding_mode``
    (``'border'``, ``'reflection'``, ``'zeros'``). It is :func:`~gequiv_timm.layers.pde.convection_m2` with one
    orientation and no turn. Output ``[B, C, H, W]``.
    """
    _check_r2(x, 'convection_r2', min_size=2)
    if not isinstance(c, torch.Tensor) or c.shape != (x.shape[1], 2):
        raise ValueError(f"convection_r2: c must be [C={x.shape[1]}, 2] (cx, cy per channel), got "
                         f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    _check_finite(c, 'convection_r2', 'c')
    g0 = torch.cat((c.to(x.dtype), c.new_zeros(c.shape[0], 1).to(x.dtype)), dim=1)
    return convection_m2(x.unsqueeze(2), g0, padding_mode).squeeze(2)


class ConvectionR2(R2EquivariantMixin, nn.Module):
    """Learned convection ``W(p) = U(p - c)`` per channel (:func:`convection_r2`).

    Args:
        channels: ``C``.
        init_scale: ``c`` starts as ``N(0, init_scale)`` pixels (zero would sit where bilinear interpolation has
            one-sided gradients).
        padding_mode: see :func:`convection_r2`.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``; parameter ``c [C, 2]``.

    Example:
        >>> conv = ConvectionR2(3)
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, channels: int, init_scale: float = 0.5, padding_mode: str = 'border'):
        super().__init__()
        _check_channels('ConvectionR2', channels=channels)
        if padding_mode not in ('border', 'reflection', 'zeros'):
            raise ValueError(f"ConvectionR2: padding_mode must be 'border', 'reflection' or 'zeros', got "
                             f"{padding_mode!r}")
        self.in_channels = self.channels = channels
        self.init_scale = float(init_scale)
        self.padding_mode = padding_mode
        self.c = nn.Parameter(torch.zeros(channels, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.c.normal_(0.0, self.init_scale)

    def extra_repr(self) -> str:
        return f"{self.channels}"

    def reach(self) -> int:
        return int(math.ceil(self.c.detach().abs().max().item())) + 1 if self.c.numel() else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_r2(x, 'ConvectionR2', self.channels, min_size=2)
        return convection_r2(x, self.c, self.padding_mode)


# ----------------------------------------------------------------------------------------------------------------
# dilation / erosion
# ----------------------------------------------------------------------------------------------------------------
def r2_morphological_kernel(metric_params: torch.Tensor, kernel_size: _Size2, alpha: float = 0.65,
                            t: float = 1.0) -> torch.Tensor:
    """Sampled dilation / erosion kernel ``[C, kH, kW]``: ``k(v) = nu_alpha * t * (|H v| / t)^beta`` with
    ``beta = 2 alpha / (2 alpha - 1)``, ``nu_alpha = (2 alpha - 1) / (2 alpha)^beta``, ``H = metric_params[c]``
    (``[C, 2, 2]``, metric ``G = H^T H``) and ``v = (j - kW//2, kH//2 - i)`` the offset of kernel entry ``(i, j)``
    (``x`` right, ``y`` up). Computed through ``|H v|^2`` (no square root): finite values and gradients for every
    finite ``H``, singular ones included."""
    alpha = _check_alpha(alpha, 'r2_morphological_kernel')
    if not isinstance(metric_params, torch.Tensor) or metric_params.dim() != 3 or metric_params.shape[1:] != (2, 2):
        raise ValueError(f"r2_morphological_kernel: metric_params must be [C, 2, 2] (the metric is H^T H), got "
                         f"{tuple(metric_params.shape) if isinstance(metric_params, torch.Tensor) else metric_params!r}")
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"r2_morphological_kernel: the time t must be a finite positive number, got {t!r}")
    _check_finite(metric_params, 'r2_morphological_kernel', 'metric_params')
    kh, kw = _pair(kernel_size, 'r2_morphological_kernel')
    dev, dt = metric_params.device, metric_params.dtype
    xs = (torch.arange(kw, device=dev, dtype=dt) - kw // 2).view(1, kw).expand(kh, kw)
    ys = (kh // 2 - torch.arange(kh, device=dev, dtype=dt)).view(kh, 1).expand(kh, kw)
    v = torch.stack((xs, ys), dim=-1)                        # [kH, kW, 2]
    hv = torch.einsum('cij,hwj->chwi', metric_params, v)     # [C, kH, kW, 2]
    rho2 = hv.square().sum(-1)
    beta = 2 * alpha / (2 * alpha - 1)
    nu = (2 * alpha - 1) / (2 * alpha) ** beta
    return nu * t * (rho2 / (t * t)).pow(beta / 2)


def dilation_r2(x: torch.Tensor, metric_params: torch.Tensor, kernel_size: _Size2, alpha: float = 0.65,
                iterations: int = 1) -> torch.Tensor:
    """Approximate solution of ``dW/dt = ||grad W||_G^{2 alpha}`` at ``t = iterations``: max-plus convolution with
    :func:`r2_morphological_kernel`, ``iterations`` times. ``[B, C, H, W] -> same``."""
    _check_r2(x, 'dilation_r2')
    k = r2_morphological_kernel(metric_params, kernel_size, alpha).to(x.dtype)
    for _ in range(iterations):
        x = morphological_convolution_r2(x, k, erosion=False)
    return x


def erosion_r2(x: torch.Tensor, metric_params: torch.Tensor, kernel_size: _Size2, alpha: float = 0.65,
               iterations: int = 1) -> torch.Tensor:
    """Approximate solution of ``dW/dt = -||grad W||_G^{2 alpha}``: min-plus convolution (see :func:`dilation_r2`)."""
    _check_r2(x, 'erosion_r2')
    k = r2_morphological_kernel(metric_params, kernel_size, alpha).to(x.dtype)
    for _ in range(iterations):
        x = morphological_convolution_r2(x, k, erosion=True)
    return x


class _MorphologyR2(R2EquivariantMixin, nn.Module):
    erosion = False

    def __init__(self, channels: int, kernel_size: _Size2 = 5, alpha: float = 0.65, iterations: int = 1):
        super().__init__()
        name = type(self).__name__
        _check_channels(name, channels=channels, iterations=iterations)
        self.in_channels = self.channels = channels
        self.kernel_size = _pair(kernel_size, name)
        self.alpha = _check_alpha(alpha, name)
        self.iterations = iterations
        self.metric_params = nn.Parameter(torch.empty(channels, 2, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``H = diag(U(0.5, 1.5), U(0.5, 1.5)) + off-diagonal U(-0.25, 0.25)``: anisotropic, mildly sheared
        kernels of about the support's size."""
        with torch.no_grad():
            self.metric_params.uniform_(-0.25, 0.25)
            self.metric_params.diagonal(dim1=1, dim2=2).uniform_(0.5, 1.5)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, alpha={self.alpha}"
                + (f", iterations={self.iterations}" if self.iterations > 1 else ''))

    def reach(self) -> int:
        return self.iterations * max(self.kernel_size) // 2

    def kernel(self) -> torch.Tensor:
        """The sampled kernel ``[C, kH, kW]``."""
        return r2_morphological_kernel(self.metric_params, self.kernel_size, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_r2(x, name, self.channels)
        _check_finite(self.metric_params, name, 'metric_params')
        k = self.kernel().to(x.dtype)
        for _ in range(self.iterations):
            x = morphological_convolution_r2(x, k, erosion=self.erosion)
        return x


class DilationR2(_MorphologyR2):
    """Learned fractional dilation on R2 (max-plus convolution with :func:`r2_morphological_kernel`), per channel.

    Solves ``dW/dt = ||grad W||_G^{2 alpha}`` for ``t = iterations`` (see the module docstring).

    Args:
        channels: ``C``.
        kernel_size: odd ``k`` or ``(kH, kW)``: the grid on which the kernel is sampled.
        alpha: the PDE exponent, in ``(1/2, 1]`` (LieTorch's default 0.65).
        iterations: applications of the morphological convolution.

    Parameter ``metric_params [C, 2, 2]`` (``H``; metric ``G = H^T H``). Shapes ``[B, C, H, W] -> same``; the output
    is ``>=`` the input (``k >= 0``, ``k(0) = 0``).

    Example:
        >>> dil = DilationR2(3, kernel_size=5)
        >>> x = torch.randn(2, 3, 16, 16)
        >>> bool((dil(x) >= x).all())
        True
    """

    erosion = False


class ErosionR2(_MorphologyR2):
    """Learned fractional erosion on R2 (min-plus convolution), ``dW/dt = -||grad W||_G^{2 alpha}``; arguments as
    :class:`DilationR2`. The output is ``<=`` the input."""

    erosion = True


class MorphologicalConvolutionR2(R2EquivariantMixin, nn.Module):
    """Min-plus convolution with a freely learned kernel (LieTorch's ``MorphologicalConvolutionR2``):
    ``out[b, c, y, x] = min_{i, j} x[b, c, y + i - kH//2, x + j - kW//2] + kernel[c, i, j]``.

    Args:
        channels: ``C``. kernel_size: ``(kH, kW)`` or an int, odd.

    Parameter ``kernel [C, kH, kW]`` (initialised ``U(0, 1)``, as LieTorch). Shapes ``[B, C, H, W] -> same``.
    """

    def __init__(self, channels: int, kernel_size: _Size2 = 5):
        super().__init__()
        _check_channels('MorphologicalConvolutionR2', channels=channels)
        self.in_channels = self.channels = channels
        self.kernel_size = _pair(kernel_size, 'MorphologicalConvolutionR2')
        self.kernel = nn.Parameter(torch.empty(channels, *self.kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.kernel, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"

    def reach(self) -> int:
        return max(self.kernel_size) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_r2(x, 'MorphologicalConvolutionR2', self.channels)
        _check_finite(self.kernel, 'MorphologicalConvolutionR2', 'kernel')
        return morphological_convolution_r2(x, self.kernel.to(x.dtype), erosion=True)


# ----------------------------------------------------------------------------------------------------------------
# linear combinations and the PDE layers
# ----------------------------------------------------------------------------------------------------------------
def linear_r2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Channel mixing ``out[b, d] = sum_c weight[d, c] x[b, c] (+ bias[d])``: a ``1 x 1`` convolution.
    ``x [B, Cin, H, W]``, ``weight [Cout, Cin]`` -> ``[B, Cout, H, W]``."""
    return F.conv2d(x, weight[:, :, None, None].to(x.dtype), bias)


class LinearR2(R2EquivariantMixin, ChannelMixing):
    """Learned linear combination of channels, ``[B, Cin, H, W] -> [B, Cout, H, W]`` (weight ``[Cout, Cin]``)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False):
        _check_channels('LinearR2', in_channels=in_channels, out_channels=out_channels)
        super().__init__(in_channels, out_channels, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_r2(x, 'LinearR2', self.in_channels)
        return linear_r2(x, self.weight, self.bias)


class CDEPdeLayerR2(R2EquivariantMixin, nn.Module):
    """Convection -> dilation -> erosion (``iterations`` times) -> linear -> ``BatchNorm2d``: one PDE layer on R2.

    Solves ``dW/dt = -c . grad W + ||grad W||_{G1}^{2 alpha} - ||grad W||_{G2}^{2 alpha}`` per channel by operator
    splitting (each sub-PDE solved exactly for unit time, see the module docstring), then mixes channels.

    Args (LieTorch's order): in_channels, out_channels; kernel_size: odd ``k`` or ``(kH, kW)`` of the morphological
    kernels; iterations: splitting steps; alpha: in ``(1/2, 1]``; momentum: of the batch norm.

    Shapes: ``[B, Cin, H, W] -> [B, Cout, H, W]``.

    Example:
        >>> layer = CDEPdeLayerR2(3, 8, kernel_size=5)
        >>> layer(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    convect = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Size2 = 5, iterations: int = 1,
                 alpha: float = 0.65, momentum: float = 0.1):
        super().__init__()
        name = type(self).__name__
        _check_channels(name, in_channels=in_channels, out_channels=out_channels, iterations=iterations)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.iterations = iterations
        self.convection = ConvectionR2(in_channels) if self.convect else None
        self.dilation = DilationR2(in_channels, kernel_size, alpha)
        self.erosion = ErosionR2(in_channels, kernel_size, alpha)
        self.linear = LinearR2(in_channels, out_channels)
        self.batch_normalization = nn.BatchNorm2d(out_channels, momentum=momentum)

    def reach(self) -> int:
        per = self.dilation.reach() + self.erosion.reach() + (self.convection.reach() if self.convection else 0)
        return self.iterations * per

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_r2(x, type(self).__name__, self.in_channels, min_size=2 if self.convect else 1)
        for _ in range(self.iterations):
            if self.convection is not None:
                x = self.convection(x)
            x = self.erosion(self.dilation(x))
        return self.batch_normalization(self.linear(x))


class DEPdeLayerR2(CDEPdeLayerR2):
    """Dilation -> erosion (``iterations`` times) -> linear -> ``BatchNorm2d``: :class:`CDEPdeLayerR2` without the
    convection, ``dW/dt = ||grad W||_{G1}^{2 alpha} - ||grad W||_{G2}^{2 alpha}``. Same arguments.

    Example:
        >>> DEPdeLayerR2(3, 4)(torch.randn(2, 3, 9, 9)).shape
        torch.Size([2, 4, 9, 9])
    """

    convect = False


# ----------------------------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------------------------
def _check_resample(name: str, size, scale_factor, mode: str):
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{name}: give exactly one of size and scale_factor (got size={size!r}, "
                         f"scale_factor={scale_factor!r})")
    if mode not in ('nearest', 'bilinear', 'bicubic', 'area', 'nearest-exact'):
        raise ValueError(f"{name}: mode must be 'nearest', 'nearest-exact', 'bilinear', 'bicubic' or 'area', got "
                         f"{mode!r}")
    if scale_factor is not None and not (isinstance(scale_factor, (int, float)) and scale_factor > 0):
        raise ValueError(f"{name}: scale_factor must be a positive number, got {scale_factor!r}")


class SpatialResampleR2(R2EquivariantMixin, nn.Module):
    """Resample the spatial axes of ``[B, C, H, W]`` (``F.interpolate``; LieTorch's ``SpatialResampleR2``).

    Args:
        size: output ``(H', W')`` (or an int), or None. scale_factor: or a factor (exactly one of the two).
        mode: ``F.interpolate``'s mode (LieTorch's default ``'nearest'``).

    Translation equivariance holds for shifts that the factor maps to whole pixels (e.g. even shifts when
    halving, any shift when doubling), which :meth:`check_equivariance` uses.
    """

    def __init__(self, size: _Size2 | None = None, scale_factor: float | None = None, mode: str = 'nearest'):
        super().__init__()
        _check_resample('SpatialResampleR2', size, scale_factor, mode)
        self.size = size if size is None or isinstance(size, int) else tuple(size)
        self.scale_factor = None if scale_factor is None else float(scale_factor)
        self.mode = mode
        self.in_channels = 1

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_factor={self.scale_factor}, mode={self.mode!r}"

    def reach(self) -> int:
        """In output pixels: the interpolation's support (2 input pixels), scaled when upsampling."""
        return 2 * int(math.ceil(max(1.0, self.scale_factor or 1.0)))

    def _shift_out(self, shift):
        f = self.scale_factor if self.scale_factor is not None else 1.0
        return (int(round(shift[0] * f)), int(round(shift[1] * f)))

    def check_equivariance(self, x=None, size: int = 24, shifts=((2, 4), (-4, 2)), rtol=None):
        return super().check_equivariance(x, size, shifts, rtol)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_r2(x, 'SpatialResampleR2')
        kw = {} if self.mode in ('nearest', 'area', 'nearest-exact') else dict(align_corners=False)
        return F.interpolate(x, size=self.size, scale_factor=self.scale_factor, mode=self.mode, **kw)
