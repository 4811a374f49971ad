"""Dilation / erosion on M2 with a *non-diagonal* left-invariant metric, and the CDE layer built on them
(LieTorch's ``...M2NonDiag`` modules), in plain PyTorch on the compiled morphological operator.

The diagonal layers of :mod:`gequiv_timm.layers.pde` use the metric ``G = diag(w1^2, w2^2, w3^2)`` in the
left-invariant frame ``(A1, A2, A3)`` (forward, lateral, turning). Here ``G = H^T H`` for a learned ``H [3, 3]`` per
channel, so the metric may couple the directions (e.g. make "forward while turning" cheaper than either alone: a
curved, not just elongated, kernel). Still left-invariant (``G`` is constant in the moving frame), hence exactly
equivariant, and ``rho(g^{-1}) = rho(g)`` still holds (``log(g^{-1}) = -log(g)``), so the kernel is sampled per
output orientation exactly as the diagonal one:

    dilation  dW/dt = +||grad W||_G^{2 alpha},   erosion  dW/dt = -||grad W||_G^{2 alpha},   ``G = H^T H``
    k(g) = nu_alpha * t * (|H c(g)| / t)^beta,   beta = 2 alpha / (2 alpha - 1),   nu_alpha as in pde.py,

with ``c(g)`` the exponential coordinates (:func:`~gequiv_timm.layers.pde.m2_log_coordinates`): the logarithmic
norm approximation of Smets et al. (JMIV 2022, arXiv:2001.09046) with the non-diagonal metric in place of the
diagonal one. ``W = max-plus (min-plus) convolution of U with k`` at ``t = 1`` (``iterations`` times).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .morphology import _check_m2, morphological_convolution_m2
from .pde import (
    BatchNormM2,
    ConvectionM2,
    LinearM2,
    M2EquivariantMixin,
    _check_alpha,
    _check_finite,
    _KernelSize,
    _log_coordinates,
    _triple,
)

__all__ = [
    'CDEPdeLayerM2NonDiag',
    'DilationM2NonDiag',
    'ErosionM2NonDiag',
    'FractionalDilationM2NonDiag',
    'FractionalErosionM2NonDiag',
    'dilation_m2_nondiag',
    'erosion_m2_nondiag',
    'm2_morphological_kernel_nondiag',
]


def m2_morphological_kernel_nondiag(metric_params: torch.Tensor, orientations: int, kernel_size: _KernelSize,
                                    alpha: float = 0.65, t: float = 1.0) -> torch.Tensor:
    """Sampled kernel ``[C, Or, kOr, kH, kW]`` for the metric ``G = H^T H`` (``metric_params = H [C, 3, 3]`` acting on
    the exponential coordinates ``(c1, c2, c3)``; see the module docstring). ``H = diag(w)`` gives
    :func:`~gequiv_timm.layers.pde.m2_morphological_kernel` with ``metric_params = w``. Through ``|H c|^2`` (no square
    root): finite values and gradients for every finite ``H``."""
    alpha = _check_alpha(alpha, 'm2_morphological_kernel_nondiag')
    if not isinstance(metric_params, torch.Tensor) or metric_params.dim() != 3 or metric_params.shape[1:] != (3, 3):
        raise ValueError(f"m2_morphological_kernel_nondiag: metric_params must be [C, 3, 3] (H; the metric is H^T H "
                         f"in the frame forward, lateral, turning), got "
                         f"{tuple(metric_params.shape) if isinstance(metric_params, torch.Tensor) else metric_params!r}")
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"m2_morphological_kernel_nondiag: the time t must be a finite positive number, got {t!r}")
    _check_finite(metric_params, 'm2_morphological_kernel_nondiag', 'metric_params')
    ks = _triple(kernel_size, 'm2_morphological_kernel_nondiag')
    coords = _log_coordinates(int(orientations), ks).to(device=metric_params.device, dtype=metric_params.dtype)
    hc = torch.einsum('okhwj,cij->cokhwi', coords, metric_params)
    rho2 = hc.square().sum(-1)
    beta = 2 * alpha / (2 * alpha - 1)
    nu = (2 * alpha - 1) / (2 * alpha) ** beta
    return nu * t * (rho2 / (t * t)).pow(beta / 2)


def dilation_m2_nondiag(x: torch.Tensor, metric_params: torch.Tensor, kernel_size: _KernelSize,
                        alpha: float = 0.65, iterations: int = 1) -> torch.Tensor:
    """``dW/dt = ||grad W||_G^{2 alpha}``, ``G = H^T H``: max-plus convolution, ``iterations`` times."""
    _check_m2(x, 'dilation_m2_nondiag')
    k = m2_morphological_kernel_nondiag(metric_params, x.shape[2], kernel_size, alpha).to(x.dtype)
    for _ in range(iterations):
        x = morphological_convolution_m2(x, k, erosion=False)
    return x


def erosion_m2_nondiag(x: torch.Tensor, metric_params: torch.Tensor, kernel_size: _KernelSize,
                       alpha: float = 0.65, iterations: int = 1) -> torch.Tensor:
    """``dW/dt = -||grad W||_G^{2 alpha}``, ``G = H^T H``: min-plus convolution, ``iterations`` times."""
    _check_m2(x, 'erosion_m2_nondiag')
    k = m2_morphological_kernel_nondiag(metric_params, x.shape[2], kernel_size, alpha).to(x.dtype)
    for _ in range(iterations):
        x = morphological_convolution_m2(x, k, erosion=True)
    return x


class _MorphologyM2NonDiag(M2EquivariantMixin, nn.Module):
    erosion = False

    def __init__(self, channels: int, kernel_size: _KernelSize = (3, 5, 5), alpha: float = 0.65,
                 iterations: int = 1):
        super().__init__()
        name = type(self).__name__
        for n, v in (('channels', channels), ('iterations', iterations)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {n} must be a positive int, got {v!r}")
        self.in_channels = self.channels = channels
        self.kernel_size = _triple(kernel_size, name)
        self.alpha = _check_alpha(alpha, name)
        self.iterations = iterations
        self.metric_params = nn.Parameter(torch.empty(channels, 3, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``H = diag(U(0.5, 1.5)) + U(-0.1, 0.1)`` off the diagonal: the diagonal layers' scales, slightly coupled."""
        with torch.no_grad():
            self.metric_params.uniform_(-0.1, 0.1)
            self.metric_params.diagonal(dim1=1, dim2=2).uniform_(0.5, 1.5)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, alpha={self.alpha}"
                + (f", iterations={self.iterations}" if self.iterations > 1 else ''))

    def kernel(self, orientations: int) -> torch.Tensor:
        """The sampled kernel ``[C, Or, kOr, kH, kW]``."""
        return m2_morphological_kernel_nondiag(self.metric_params, orientations, self.kernel_size, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        _check_m2(x, name, self.channels)
        if self.kernel_size[0] > x.shape[2]:
            raise ValueError(f"{name}: orientation kernel size {self.kernel_size[0]} exceeds Or={x.shape[2]}")
        k = self.kernel(x.shape[2]).to(x.dtype)
        for _ in range(self.iterations):
            x = morphological_convolution_m2(x, k, erosion=self.erosion)
        return x


class DilationM2NonDiag(_MorphologyM2NonDiag):
    """Learned left-invariant fractional dilation with a non-diagonal metric ``G = H^T H`` (module docstring).

    Args:
        channels: ``C``. kernel_size: odd ``k`` or ``(kOr, kH, kW)``. alpha: in ``(1/2, 1]``.
        iterations: applications (time ``t = iterations``).

    Parameter ``metric_params [C, 3, 3]`` (``H``). Shapes ``[B, C, Or, H, W] -> same``.

    Example:
        >>> layer = DilationM2NonDiag(2, (3, 5, 5))
        >>> layer(torch.randn(1, 2, 8, 12, 12)).shape
        torch.Size([1, 2, 8, 12, 12])
    """

    erosion = False


class ErosionM2NonDiag(_MorphologyM2NonDiag):
    """Learned left-invariant fractional erosion with a non-diagonal metric; as :class:`DilationM2NonDiag`."""

    erosion = True


FractionalDilationM2NonDiag = DilationM2NonDiag  # LieTorch's other name
FractionalErosionM2NonDiag = ErosionM2NonDiag


class CDEPdeLayerM2NonDiag(M2EquivariantMixin, nn.Module):
    """:class:`~gequiv_timm.layers.pde.CDEPdeLayerM2` with non-diagonal-metric dilation and erosion: convection ->
    dilation -> erosion (``iterations`` times) -> linear -> :class:`~gequiv_timm.layers.pde.BatchNormM2`.

    Solves ``dW/dt = -c . grad W + ||grad W||_{G1}^{2 alpha} - ||grad W||_{G2}^{2 alpha}`` by operator splitting, with
    ``G1 = H1^T H1``, ``G2 = H2^T H2``. Arguments as ``CDEPdeLayerM2``. Shapes ``[B, Cin, Or, H, W] ->
    [B, Cout, Or, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _KernelSize = (3, 5, 5),
                 alpha: float = 0.65, iterations: int = 1, momentum: float = 0.1):
        super().__init__()
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"CDEPdeLayerM2NonDiag: iterations must be a positive int, got {iterations!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.iterations = iterations
        self.convection = ConvectionM2(in_channels)
        self.dilation = DilationM2NonDiag(in_channels, kernel_size, alpha)
        self.erosion = ErosionM2NonDiag(in_channels, kernel_size, alpha)
        self.linear = LinearM2(in_channels, out_channels)
        self.batch_normalization = BatchNormM2(out_channels, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_m2(x, 'CDEPdeLayerM2NonDiag', self.in_channels, min_size=2)
        for _ in range(self.iterations):
            x = self.erosion(self.dilation(self.convection(x)))
        return self.batch_normalization(self.linear(x))
