"""Spatial-transformer transform families: regressed parameters (zero = identity) -> ``theta`` -> sampling grid.

The functional grids and warps they use are in :mod:`gequiv_timm.layers.stn_warp`; the spatial transformer
that regresses the parameters is :class:`gequiv_timm.layers.stn.SpatialTransformer`.

Transform families (``theta`` shapes; ``B`` batch):

============ ======= ============================================================ ===============
family       params  map ``(x, y) -> (x_s, y_s)``                                   ``theta``
============ ======= ============================================================ ===============
affine       6       ``A (x, y) + t``                                               ``[B, 2, 3]``
similarity   4       ``s R(a) (x, y) + t``                                          ``[B, 2, 3]``
rotation     1       ``R(a) (x, y)``                                                ``[B, 2, 3]``
attention    3       ``s (x, y) + t`` (the paper's attention transform)             ``[B, 2, 3]``
translation  2       ``(x, y) + t``                                                 ``[B, 2, 3]``
projective   8       ``(H (x, y, 1))_{1,2} / (H (x, y, 1))_3``, ``H_33 = 1``        ``[B, 3, 3]``
tps          2N      thin-plate spline through N control points (a ``g x g`` grid)  ``[B, N, 2]``
============ ======= ============================================================ ===============

Every family is parameterised as a *deviation from the identity*: raw parameters equal to zero give the identity
transform, so a regression layer with zero weight and zero bias starts the module at the identity (the output is the
input, to float rounding). Optional bounds keep the transform sane: rotation angle ``max_angle * tanh``, isotropic
scale in ``scale_range`` through a sigmoid, translation ``max_translation * tanh``, the linear part of an affine map
``I + max_linear * tanh``, the perspective row ``max_perspective * tanh / 2`` (with ``max_perspective < 1`` the
homogeneous coordinate stays ``>= 1 - max_perspective > 0`` on the whole output, so the warp never crosses the
horizon), and the TPS control points ``max_offset * tanh`` around their rest positions.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stn_warp import (
    SizeLike, _size2, affine_grid, attention_theta, check_theta, identity_grid, projective_grid, projective_invalid,
    rotation_theta, similarity_theta, tps_control_points, tps_solve_matrix, transform_points,
    translation_theta,
)

__all__ = [
    'TRANSFORMS', 'TransformFamily', 'AffineTransform', 'SimilarityTransform', 'RotationTransform',
    'AttentionTransform', 'TranslationTransform', 'ProjectiveTransform', 'TPSTransform', 'create_transform',
]

TRANSFORMS = ('affine', 'similarity', 'rotation', 'attention', 'translation', 'projective', 'tps')


# ----------------------------------------------------------------------------------------------------------------
# transform families: raw parameters (zero = identity) -> theta -> grid
# ----------------------------------------------------------------------------------------------------------------
def _bounded(raw: torch.Tensor, bound: Optional[float]) -> torch.Tensor:
    return raw if bound is None else bound * torch.tanh(raw)


def _check_bound(name: str, v, cls: str, upper: Optional[float] = None) -> None:
    if v is None:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v) or \
            (upper is not None and not v < upper):
        rng = f"in (0, {upper})" if upper is not None else "a positive finite number"
        raise ValueError(f"{cls}: bound must be {rng} or None (unbounded), got {name}={v!r}")


class TransformFamily(nn.Module):
    """A family of transforms: ``num_params`` raw parameters (zero = identity) -> ``theta`` -> sampling grid.

    Subclasses set ``name``, ``kind`` (``'affine'`` / ``'projective'`` / ``'tps'``, which fixes the shape of theta)
    and ``num_params``, and implement :meth:`to_theta`.
    """

    name: str = ''
    kind: str = 'affine'
    num_params: int = 0

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_params(self, params: torch.Tensor) -> None:
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(f"{type(self).__name__}: expected raw parameters [B, {self.num_params}], "
                             f"got {tuple(params.shape)}")

    def identity_theta(self, batch: int = 1, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.to_theta(torch.zeros(batch, self.num_params, dtype=dtype, device=device))

    def check(self, theta: torch.Tensor, finite: bool = True) -> None:
        check_theta(theta, self.kind, getattr(self, 'num_points', None), name=f"{self.name} theta", finite=finite)

    def invalid(self, theta: torch.Tensor, size: SizeLike, align_corners: bool) -> torch.Tensor:
        """Boolean ``[B]``: samples whose theta cannot be used (non-finite; for projective also singular)."""
        self.check(theta, finite=False)
        if self.kind == 'projective':
            return projective_invalid(theta, size, align_corners)
        return ~torch.isfinite(theta.detach()).flatten(1).all(1)

    def grid(self, theta: torch.Tensor, size: SizeLike, align_corners: bool) -> torch.Tensor:
        """Sampling grid ``[B, H, W, 2]`` for an output of ``size``."""
        if self.kind == 'affine':
            return affine_grid(theta, size, align_corners)
        return projective_grid(theta, size, align_corners)

    def probe_points(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``[P, 2]`` points used by the regularisers: the 3x3 grid ``{-1, 0, 1}^2`` (corners, edge midpoints,
        centre) for affine/projective families, the control points for TPS."""
        return tps_control_points(3, dtype, device)

    def map_probes(self, theta: torch.Tensor) -> torch.Tensor:
        return transform_points(theta, self.probe_points(theta.dtype, theta.device), self.kind)

    def deviation(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean squared displacement of the probe points from their identity positions (normalised units):
        zero exactly at the identity; the regulariser toward the identity."""
        p = self.probe_points(theta.dtype, theta.device)
        return (self.map_probes(theta) - p).pow(2).sum(-1).mean(-1)

    def out_of_bounds(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean squared distance by which the mapped probe points leave the image square ``[-1, 1]^2``:
        zero while the sampled region stays inside the input (the 'drifting out of the image' penalty)."""
        return F.relu(self.map_probes(theta).abs() - 1).pow(2).sum(-1).mean(-1)

    def extra_repr(self) -> str:
        return f"{self.name}, num_params={self.num_params}"


class AffineTransform(TransformFamily):
    """General affine map, 6 parameters: ``theta = [[1 + a, b, tx], [c, 1 + d, ty]]``.

    ``max_linear`` bounds ``a, b, c, d`` (each ``max_linear * tanh``), ``max_translation`` bounds ``tx, ty``.
    """

    name, kind, num_params = 'affine', 'affine', 6

    def __init__(self, max_linear: Optional[float] = None, max_translation: Optional[float] = None):
        super().__init__()
        _check_bound('max_linear', max_linear, type(self).__name__)
        _check_bound('max_translation', max_translation, type(self).__name__)
        self.max_linear, self.max_translation = max_linear, max_translation

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        lin = _bounded(params[:, [0, 1, 3, 4]], self.max_linear).view(-1, 2, 2)
        lin = lin + torch.eye(2, dtype=params.dtype, device=params.device)
        t = _bounded(params[:, [2, 5]], self.max_translation)
        return torch.cat((lin, t[:, :, None]), 2)


class _ScaleMixin:
    scale_range: Optional[Tuple[float, float]]

    def _init_scale(self, scale_range) -> None:
        if scale_range is not None:
            try:
                lo, hi = (float(s) for s in scale_range)
            except (TypeError, ValueError):
                raise ValueError(f"{type(self).__name__}: scale_range must be (min, max) or None, "
                                 f"got {scale_range!r}") from None
            if not 0 < lo < 1 < hi:
                raise ValueError(f"{type(self).__name__}: scale_range must satisfy 0 < min < 1 < max so that the "
                                 f"identity (scale 1) is inside it, got {(lo, hi)}")
            self.scale_range = (lo, hi)
            self._scale_offset = math.log((1 - lo) / (hi - 1))  # sigmoid(offset) = (1 - lo) / (hi - lo)
        else:
            self.scale_range = None

    def _scale(self, raw: torch.Tensor) -> torch.Tensor:
        if self.scale_range is None:
            return torch.exp(raw)  # positive, 1 at raw = 0; unbounded (may collapse: bound it or regularise)
        lo, hi = self.scale_range
        return lo + (hi - lo) * torch.sigmoid(raw + self._scale_offset)


class SimilarityTransform(_ScaleMixin, TransformFamily):
    """Rotation, isotropic scale and translation, 4 parameters ``(angle, log-scale, tx, ty)``:
    ``theta = [[s cos a, -s sin a, tx], [s sin a, s cos a, ty]]``.

    Bounds: ``max_angle`` (radians, ``max_angle * tanh``), ``scale_range = (min, max)`` (sigmoid; otherwise
    ``s = exp(raw)``), ``max_translation``.
    """

    name, kind, num_params = 'similarity', 'affine', 4

    def __init__(self, max_angle: Optional[float] = None, scale_range: Optional[Tuple[float, float]] = None,
                 max_translation: Optional[float] = None):
        super().__init__()
        _check_bound('max_angle', max_angle, type(self).__name__)
        _check_bound('max_translation', max_translation, type(self).__name__)
        self.max_angle, self.max_translation = max_angle, max_translation
        self._init_scale(scale_range)

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        a = _bounded(params[:, 0], self.max_angle)
        t = _bounded(params[:, 2:], self.max_translation)
        return similarity_theta(a, self._scale(params[:, 1]), t[:, 0], t[:, 1])


class RotationTransform(TransformFamily):
    """Rotation about the image centre, 1 parameter (radians; bounded by ``max_angle * tanh`` if given)."""

    name, kind, num_params = 'rotation', 'affine', 1

    def __init__(self, max_angle: Optional[float] = None):
        super().__init__()
        _check_bound('max_angle', max_angle, type(self).__name__)
        self.max_angle = max_angle

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        return rotation_theta(_bounded(params[:, 0], self.max_angle))


class AttentionTransform(_ScaleMixin, TransformFamily):
    """The paper's attention transform: isotropic scale and translation, 3 parameters ``(log-scale, tx, ty)``:
    ``theta = [[s, 0, tx], [0, s, ty]]`` (``s < 1`` zooms in on a crop). Bounds: ``scale_range``,
    ``max_translation``."""

    name, kind, num_params = 'attention', 'affine', 3

    def __init__(self, scale_range: Optional[Tuple[float, float]] = None, max_translation: Optional[float] = None):
        super().__init__()
        _check_bound('max_translation', max_translation, type(self).__name__)
        self.max_translation = max_translation
        self._init_scale(scale_range)

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        t = _bounded(params[:, 1:], self.max_translation)
        return attention_theta(self._scale(params[:, 0]), t[:, 0], t[:, 1])


class TranslationTransform(TransformFamily):
    """Translation only, 2 parameters (bounded by ``max_translation * tanh`` if given)."""

    name, kind, num_params = 'translation', 'affine', 2

    def __init__(self, max_translation: Optional[float] = None):
        super().__init__()
        _check_bound('max_translation', max_translation, type(self).__name__)
        self.max_translation = max_translation

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        t = _bounded(params, self.max_translation)
        return translation_theta(t[:, 0], t[:, 1])


class ProjectiveTransform(TransformFamily):
    """Homography, 8 parameters: ``H = [[1 + a, b, tx], [c, 1 + d, ty], [g, h, 1]]``.

    Bounds: ``max_linear``, ``max_translation`` as for affine; ``max_perspective = p`` in ``(0, 1)`` sets
    ``g, h = (p / 2) tanh(raw)``, so ``w = g x + h y + 1 >= 1 - p > 0`` on the whole image square: the warp can
    never cross the horizon. Unbounded, a singular or horizon-crossing H raises (or falls back, see the module).
    """

    name, kind, num_params = 'projective', 'projective', 8

    def __init__(self, max_linear: Optional[float] = None, max_translation: Optional[float] = None,
                 max_perspective: Optional[float] = None):
        super().__init__()
        _check_bound('max_linear', max_linear, type(self).__name__)
        _check_bound('max_translation', max_translation, type(self).__name__)
        _check_bound('max_perspective', max_perspective, type(self).__name__, upper=1.0)
        self.max_linear, self.max_translation, self.max_perspective = max_linear, max_translation, max_perspective

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        lin = _bounded(params[:, [0, 1, 3, 4]], self.max_linear).view(-1, 2, 2)
        lin = lin + torch.eye(2, dtype=params.dtype, device=params.device)
        t = _bounded(params[:, [2, 5]], self.max_translation)
        persp = params[:, 6:8] if self.max_perspective is None else 0.5 * self.max_perspective * torch.tanh(
            params[:, 6:8])
        top = torch.cat((lin, t[:, :, None]), 2)
        bottom = torch.cat((persp, torch.ones_like(persp[:, :1])), 1)[:, None]
        return torch.cat((top, bottom), 1)


class TPSTransform(TransformFamily):
    """Thin-plate spline through ``N = gy * gx`` control points on a regular grid over the image (2N parameters: the
    offsets of the source points from the control points; ``max_offset * tanh`` if bounded). ``theta`` is the source
    points ``[B, N, 2]``; at rest (``theta = control points``) the spline is the identity.

    The ``[H*W, N]`` solve matrix is cached per (size, align_corners, device) — a few KB for small images.
    """

    name, kind = 'tps', 'tps'

    def __init__(self, grid_size: SizeLike = 4, max_offset: Optional[float] = None):
        super().__init__()
        _check_bound('max_offset', max_offset, type(self).__name__)
        self.grid_size = _size2(grid_size, 'grid_size')
        self.num_points = self.grid_size[0] * self.grid_size[1]
        self.num_params = 2 * self.num_points
        self.max_offset = max_offset
        self._cache: Dict[tuple, torch.Tensor] = {}

    @property
    def ctrl(self) -> torch.Tensor:
        """The control points at rest ``[N, 2]`` (recomputed, never stored: nothing to go stale on a device move
        or a meta-device build)."""
        return tps_control_points(self.grid_size)

    def to_theta(self, params: torch.Tensor) -> torch.Tensor:
        self._check_params(params)
        off = _bounded(params, self.max_offset).view(-1, self.num_points, 2)
        return tps_control_points(self.grid_size, params.dtype, params.device) + off

    def solve_matrix(self, size: SizeLike, align_corners: bool, device=None) -> torch.Tensor:
        h, w = _size2(size)
        device = torch.device('cpu') if device is None else torch.device(device)
        key = (h, w, bool(align_corners), str(device))
        m = self._cache.get(key)
        if m is None:  # solved on the CPU in float64 from the rest positions (also for meta / accelerators)
            base = identity_grid((h, w), align_corners, torch.float64).view(-1, 2)
            m = tps_solve_matrix(base, tps_control_points(self.grid_size, torch.float64)).to(device)
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = m
        return m

    def grid(self, theta: torch.Tensor, size: SizeLike, align_corners: bool) -> torch.Tensor:
        check_theta(theta, 'tps', self.num_points, name='tps theta', finite=theta.device.type != 'meta')
        h, w = _size2(size)
        m = self.solve_matrix((h, w), align_corners, theta.device)
        return torch.matmul(m.to(theta.dtype), theta).view(-1, h, w, 2)

    def probe_points(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return tps_control_points(self.grid_size, dtype, device)

    def map_probes(self, theta: torch.Tensor) -> torch.Tensor:
        return theta  # the spline interpolates: control points map exactly to the source points

    def extra_repr(self) -> str:
        return f"tps, grid_size={self.grid_size}, num_params={self.num_params}"


_FAMILIES = {
    'affine': AffineTransform, 'similarity': SimilarityTransform, 'rotation': RotationTransform,
    'attention': AttentionTransform, 'translation': TranslationTransform, 'projective': ProjectiveTransform,
    'tps': TPSTransform,
}


def create_transform(transform: Union[str, TransformFamily] = 'affine', **kwargs) -> TransformFamily:
    """A :class:`TransformFamily` by name (one of :data:`TRANSFORMS`) with its bounds as keyword arguments, e.g.
    ``create_transform('similarity', scale_range=(0.5, 1.5), max_translation=0.5)``."""
    if isinstance(transform, TransformFamily):
        if kwargs:
            raise ValueError(f"create_transform: got a TransformFamily instance and extra arguments {sorted(kwargs)}; "
                             f"pass the bounds to its constructor instead")
        return transform
    if transform not in _FAMILIES:
        raise ValueError(f"unknown transform {transform!r}: expected one of {TRANSFORMS}")
    try:
        return _FAMILIES[transform](**kwargs)
    except TypeError as e:
        import inspect
        allowed = [p for p in inspect.signature(_FAMILIES[transform].__init__).parameters if p != 'self']
        raise ValueError(f"transform {transform!r} accepts the options {allowed}, got {sorted(kwargs)}") from e
