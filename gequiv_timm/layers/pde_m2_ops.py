"""More M2 modules at LieTorch's names: the dilation/erosion-only layer ``DEPdeLayerM2``, the per-channel PDE
modules ``ConvectionDilationPdeM2`` / ``ConvectionErosionPdeM2``, the linear group convolution
``ConvM2Cartesian``, the projection ``AnisotropicDilatedProjectM2`` and ``SpatialResampleM2``.

Conventions (layout ``[B, C, Or, H, W]``, frame, group action, kernels) are those of :mod:`gequiv_timm.layers.pde`;
every module has :meth:`~gequiv_timm.layers.pde.M2EquivariantMixin.check_equivariance` (quarter turns: ``rot90``
of the plane with a shift of the orientations by ``Or / 4``). After Smets, Portegies, Bekkers & Duits, JMIV 2022
(arXiv:2001.09046); our own code.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .morphology import _check_m2, morphological_convolution_m2
from .pde import (
    BatchNormM2,
    ConvectionM2,
    DilationM2,
    ErosionM2,
    LinearM2,
    M2EquivariantMixin,
    _check_alpha,
    _KernelSize,
    _rotation_matrices,
    _triple,
    m2_morphological_kernel,
    rotated_kernel_bank_matrix,
)
from .pde_r2 import _check_resample

__all__ = [
    'AnisotropicDilatedProjectM2',
    'ConvM2Cartesian',
    'ConvectionDilationPdeM2',
    'ConvectionErosionPdeM2',
    'DEPdeLayerM2',
    'SpatialResampleM2',
    'anisotropic_dilated_project_m2',
    'conv_m2_cartesian',
]


def _positive(name: str, **values) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")


# ----------------------------------------------------------------------------------------------------------------
# PDE layers without convection, and the per-channel convection + dilation / erosion modules
# ----------------------------------------------------------------------------------------------------------------
class DEPdeLayerM2(M2EquivariantMixin, nn.Module):
    """Dilation -> erosion (``iterations`` times) -> linear -> batch norm: ``CDEPdeLayerM2`` without convection.

    Solves ``dW/dt = ||grad W||_{G1}^{2 alpha} - ||grad W||_{G2}^{2 alpha}`` per channel by operator splitting (each
    part exactly, as the morphological convolutions of :mod:`~gequiv_timm.layers.pde`), then mixes channels and
    normalises (:class:`~gequiv_timm.layers.pde.BatchNormM2`). Arguments as ``CDEPdeLayerM2``.

    Example:
        >>> DEPdeLayerM2(3, 4, (3, 5, 5))(torch.randn(2, 3, 8, 10, 10)).shape
        torch.Size([2, 4, 8, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _KernelSize = (3, 5, 5),
                 alpha: float = 0.65, iterations: int = 1, momentum: float = 0.1):
        super().__init__()
        _positive('DEPdeLayerM2', in_channels=in_channels, out_channels=out_channels, iterations=iterations)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.iterations = iterations
        self.dilation = DilationM2(in_channels, kernel_size, alpha)
        self.erosion = ErosionM2(in_channels, kernel_size, alpha)
        self.linear = LinearM2(in_channels, out_channels)
        self.batch_normalization = BatchNormM2(out_channels, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'DEPdeLayerM2', self.in_channels)
        for _ in range(self.iterations):
            x = self.erosion(self.dilation(x))
        return self.batch_normalization(self.linear(x))


class _ConvectionMorphologyPdeM2(M2EquivariantMixin, nn.Module):
    morphology = DilationM2

    def __init__(self, channels: int, kernel_size: _KernelSize = (3, 5, 5), iterations: int = 1,
                 alpha: float = 0.65):
        super().__init__()
        name = type(self).__name__
        _positive(name, channels=channels, iterations=iterations)
        self.in_channels = self.channels = channels
        self.iterations = iterations
        self.convection = ConvectionM2(channels)
        self.morph = self.morphology(channels, kernel_size, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, type(self).__name__, self.channels, min_size=2)
        for _ in range(self.iterations):
            x = self.morph(self.convection(x))
        return x


class ConvectionDilationPdeM2(_ConvectionMorphologyPdeM2):
    """Per channel: ``dW/dt = -c . grad W + ||grad W||_G^{2 alpha}`` for ``t = iterations`` by splitting
    (convection then dilation, ``iterations`` times); no channel mixing, no normalisation.

    Args (LieTorch's order): channels; kernel_size: odd ``k`` or ``(kOr, kH, kW)``; iterations; alpha in
    ``(1/2, 1]``. Parameters: ``convection.g0 [C, 3]``, ``morph.metric_params [C, 3]``.
    """

    morphology = DilationM2


class ConvectionErosionPdeM2(_ConvectionMorphologyPdeM2):
    """Per channel: ``dW/dt = -c . grad W - ||grad W||_G^{2 alpha}`` (convection then erosion); as
    :class:`ConvectionDilationPdeM2`."""

    morphology = ErosionM2


# ----------------------------------------------------------------------------------------------------------------
# linear group convolution
# ----------------------------------------------------------------------------------------------------------------
def conv_m2_cartesian(x: torch.Tensor, weight: torch.Tensor, rotation_matrix: torch.Tensor,
                      bias: torch.Tensor | None = None, padding: int = 0) -> torch.Tensor:
    """Linear group convolution on M2 (SE(2) at the discrete orientations), ``x [B, Cin, Or, H, W]``,
    ``weight [Cout, Cin, kOr, k, k]`` (the kernel as seen from orientation 0), ``rotation_matrix [Or, k*k, k*k]``
    from :func:`~gequiv_timm.layers.pde.rotated_kernel_bank_matrix`::

        out[b, d, o] = sum_{c, a} (psi_{d, c, a, theta_o} * x[b, c, (o + a - kOr//2) mod Or])   (+ bias[d])

    with ``psi_theta(p) = psi(R_{-theta} p)`` (bilinear rotation) and ``*`` the 2-D correlation: the kernel turns
    with the output orientation and reads the neighbouring orientations relative to it. One grouped ``conv2d``
    (groups = ``Or``) on the ``kOr`` orientation windows. Output ``[B, Cout, Or, H + 2p - k + 1, W + 2p - k + 1]``.
    """
    b, ci, orientations, h, w = x.shape
    co, ci_w, ko, k, _ = weight.shape
    ro = ko // 2
    # the rotated banks: [Or, Cout, Cin * kOr, k, k]
    bank = torch.einsum('opq,dcaq->odcap', rotation_matrix.to(weight.dtype), weight.reshape(co, ci, ko, k * k))
    bank = bank.reshape(orientations * co, ci * ko, k, k)
    # the input windows: [B, Or, Cin, kOr, H, W] -> [B, Or * Cin * kOr, H, W]
    if ro:
        x = torch.cat((x[:, :, orientations - ro:], x, x[:, :, :ro]), dim=2)
    win = x.unfold(2, ko, 1)                      # [B, Cin, Or, H, W, kOr]
    win = win.permute(0, 2, 1, 5, 3, 4).reshape(b, orientations * ci * ko, h, w)
    bias_full = bias.repeat(orientations) if bias is not None else None
    y = F.conv2d(win, bank, bias_full, padding=padding, groups=orientations)
    return y.unflatten(1, (orientations, co)).transpose(1, 2)


class ConvM2Cartesian(M2EquivariantMixin, nn.Module):
    """Learned linear group convolution on M2 (:func:`conv_m2_cartesian`), LieTorch's ``ConvM2Cartesian``.

    Args:
        in_channels, out_channels: ``Cin``, ``Cout``.
        orientations: ``Or`` (a multiple of 4 for exact quarter-turn equivariance).
        kernel_size: odd ``k`` (then ``kOr = min(k, Or)`` rounded to odd) or ``(kOr, k, k)``.
        padding: spatial zero padding (0 = valid, as LieTorch; ``k // 2`` keeps the size). bias: per ``Cout``.
        disk: restrict the spatial kernel to a disk (every rotated copy has the same support).

    Parameter ``weight [Cout, Cin, kOr, k, k]``. Shapes ``[B, Cin, Or, H, W] -> [B, Cout, Or, H', W']``.

    Example:
        >>> conv = ConvM2Cartesian(2, 3, orientations=8, kernel_size=(3, 5, 5), padding=2)
        >>> conv(torch.randn(1, 2, 8, 12, 12)).shape
        torch.Size([1, 3, 8, 12, 12])
    """

    def __init__(self, in_channels: int, out_channels: int, orientations: int = 8,
                 kernel_size: int | Sequence[int] = (3, 5, 5), padding: int = 0, bias: bool = False,
                 disk: bool = True):
        super().__init__()
        _positive('ConvM2Cartesian', in_channels=in_channels, out_channels=out_channels, orientations=orientations)
        if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
            ko = min(kernel_size, orientations)
            kernel_size = (ko if ko % 2 else ko - 1, kernel_size, kernel_size)
        ks = _triple(kernel_size, 'ConvM2Cartesian')
        if ks[1] != ks[2]:
            raise ValueError(f"ConvM2Cartesian: the spatial kernel must be square to be rotated, got {ks[1:]}")
        if ks[0] > orientations:
            raise ValueError(f"ConvM2Cartesian: the orientation kernel size {ks[0]} exceeds orientations="
                             f"{orientations}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"ConvM2Cartesian: padding must be a non-negative int, got {padding!r}")
        self.in_channels, self.out_channels, self.orientations = in_channels, out_channels, orientations
        self.kernel_size, self.padding, self.disk = ks, padding, disk
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *ks))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer('rotation_matrix', rotated_kernel_bank_matrix(ks[1], orientations, disk).to(
            device=self.weight.device, dtype=self.weight.dtype), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init; fan-in ``Cin * kOr * (pixels in the disk)``."""
        support = int((_rotation_matrices(self.kernel_size[1], self.orientations, self.disk)[0].sum(1) > 0).sum())
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (self.in_channels * self.kernel_size[0] * support)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, orientations={self.orientations}, "
                f"kernel_size={self.kernel_size}, padding={self.padding}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'ConvM2Cartesian', self.in_channels)
        if x.shape[2] != self.orientations:
            raise ValueError(f"ConvM2Cartesian: built for {self.orientations} orientations, got Or={x.shape[2]}")
        if min(x.shape[-2:]) + 2 * self.padding < self.kernel_size[1]:
            raise ValueError(f"ConvM2Cartesian: input {tuple(x.shape[-2:])} (padding {self.padding}) is smaller "
                             f"than the kernel {self.kernel_size[1]}")
        return conv_m2_cartesian(x, self.weight, self.rotation_matrix, self.bias, self.padding)


# ----------------------------------------------------------------------------------------------------------------
# projection and resampling
# ----------------------------------------------------------------------------------------------------------------
def anisotropic_dilated_project_m2(x: torch.Tensor, longitudinal: float, lateral: float, alpha: float = 0.65,
                                   kernel_size: int | None = None) -> torch.Tensor:
    """``[B, C, Or, H, W] -> [B, C, H, W]``: a fixed anisotropic spatial dilation of each orientation along its own
    direction, then the maximum over orientations (LieTorch's ``anisotropic_dilated_project_m2``).

    The dilation solves ``dW/dt = ||grad W||_G^{2 alpha}`` with ``G = diag(1 / longitudinal^2, 1 / lateral^2)`` in
    the frame (forward, lateral) of each orientation (no turning), i.e. the max-plus convolution with
    ``k(v) = nu_alpha * (v_fwd^2 / longitudinal^2 + v_lat^2 / lateral^2)^(beta / 2)`` -- elongated along the
    orientation (``longitudinal > lateral``): oriented structures are "stretched" before being projected.
    ``kernel_size`` defaults to ``2 * ceil(max(longitudinal, lateral)) + 1``.
    """
    _check_m2(x, 'anisotropic_dilated_project_m2')
    for n, v in (('longitudinal', longitudinal), ('lateral', lateral)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"anisotropic_dilated_project_m2: {n} must be a positive number, got {v!r}")
    alpha = _check_alpha(alpha, 'anisotropic_dilated_project_m2')
    k = kernel_size or 2 * int(math.ceil(max(longitudinal, lateral))) + 1
    c = x.shape[1]
    metric = torch.tensor([[1.0 / longitudinal, 1.0 / lateral, 0.0]], dtype=torch.float64)
    kernel = m2_morphological_kernel(metric, x.shape[2], (1, k, k), alpha).to(device=x.device, dtype=x.dtype)
    return morphological_convolution_m2(x, kernel.expand(c, *kernel.shape[1:]), erosion=False).amax(dim=2)


class AnisotropicDilatedProjectM2(M2EquivariantMixin, nn.Module):
    """Module form of :func:`anisotropic_dilated_project_m2` (fixed, untrained: LieTorch's
    ``AnisotropicDilatedProjectM2(longitudinal, lateral, alpha)``). ``[B, C, Or, H, W] -> [B, C, H, W]``."""

    out_planar = True

    def __init__(self, longitudinal: float, lateral: float, alpha: float = 0.65, kernel_size: int | None = None):
        super().__init__()
        for n, v in (('longitudinal', longitudinal), ('lateral', lateral)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"AnisotropicDilatedProjectM2: {n} must be a positive number, got {v!r}")
        if kernel_size is not None:
            _triple((1, kernel_size, kernel_size), 'AnisotropicDilatedProjectM2')
        self.longitudinal, self.lateral = float(longitudinal), float(lateral)
        self.alpha = _check_alpha(alpha, 'AnisotropicDilatedProjectM2')
        self.kernel_size = kernel_size
        self.in_channels = 1

    def extra_repr(self) -> str:
        return f"longitudinal={self.longitudinal}, lateral={self.lateral}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return anisotropic_dilated_project_m2(x, self.longitudinal, self.lateral, self.alpha, self.kernel_size)


class SpatialResampleM2(M2EquivariantMixin, nn.Module):
    """Resample the spatial axes of ``[B, C, Or, H, W]`` (each orientation alike, ``F.interpolate``), LieTorch's
    ``SpatialResampleM2(size=None, scale_factor=None, mode='nearest')``.

    Quarter-turn equivariance holds where the resampling commutes with ``rot90``: upsampling by an integer factor
    (``'nearest'``, ``'bilinear'``), ``'bilinear'`` / ``'area'`` downsampling of even sizes by 2; not ``'nearest'``
    downsampling (it keeps the even rows and columns, which a rotation maps to odd ones) --
    :meth:`check_equivariance` shows which.
    """

    def __init__(self, size=None, scale_factor: float | None = None, mode: str = 'nearest'):
        super().__init__()
        _check_resample('SpatialResampleM2', size, scale_factor, mode)
        self.size = size if size is None or isinstance(size, int) else tuple(size)
        self.scale_factor = None if scale_factor is None else float(scale_factor)
        self.mode = mode
        self.in_channels = 1

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_factor={self.scale_factor}, mode={self.mode!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'SpatialResampleM2')
        kw = {} if self.mode in ('nearest', 'area', 'nearest-exact') else dict(align_corners=False)
        y = F.interpolate(x.flatten(1, 2), size=self.size, scale_factor=self.scale_factor, mode=self.mode, **kw)
        return y.unflatten(1, x.shape[1:3])
