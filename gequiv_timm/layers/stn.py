"""Spatial transformers (Jaderberg, Simonyan, Zisserman, Kavukcuoglu, "Spatial Transformer Networks", NeurIPS 2015).

A spatial transformer has three parts:

1. a *localisation net* maps the input ``U [B, C, H, W]`` to transform parameters ``theta``;
2. a *grid generator* maps every output pixel ``(x_t, y_t)`` to a source location ``(x_s, y_s) = T_theta(x_t, y_t)``;
3. a differentiable *sampler* (here ``F.grid_sample``) reads ``U`` at those locations: ``V = U(T_theta(G))``.

Coordinates are normalised (``x`` right, ``y`` down, the image spanning ``[-1, 1]`` on both axes) and the map goes
from output to input, as in ``F.affine_grid``. ``align_corners`` is passed explicitly, and identically, to every grid
generator and to ``grid_sample``: the base grid of every family is made by ``F.affine_grid`` with the identity, so the
projective and thin-plate-spline grids use exactly the same pixel centres as the affine one. With
``align_corners=False`` (the default) the pixel centres sit at ``(2i + 1)/W - 1``; with ``True`` at ``2i/(W - 1) - 1``.

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

Known problems and what this module does about them:

* *drifting out of the image / collapsing scale*: bounds (above) and :meth:`SpatialTransformer.transform_loss`, a
  regulariser toward the identity (mean squared displacement of probe points) plus a penalty on probe points that
  leave the image square;
* *``align_corners`` mismatch*: one explicit flag used by every grid and by the sampler;
* *unstable training*: identity start, bounds, and a separate (smaller) learning rate for the localisation net, as in
  the paper (see the models' ``param_groups``);
* *invalid ``theta``*: a non-finite ``theta`` or a singular / horizon-crossing projective matrix raises a
  ``ValueError`` saying which sample; with ``invalid='identity'`` the module instead replaces those samples' transforms
  by the identity and counts them in ``last_num_fallbacks`` (documented fallback, never silent NaNs).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'TRANSFORMS', 'identity_grid', 'affine_grid', 'projective_grid', 'tps_grid', 'warp', 'affine_warp',
    'projective_warp', 'tps_warp', 'check_theta', 'similarity_theta', 'rotation_theta', 'attention_theta',
    'translation_theta', 'homography_from_points', 'tps_control_points', 'tps_solve_matrix', 'transform_points',
    'TransformFamily', 'AffineTransform', 'SimilarityTransform', 'RotationTransform', 'AttentionTransform',
    'TranslationTransform', 'ProjectiveTransform', 'TPSTransform', 'create_transform',
    'AffineWarp', 'ProjectiveWarp', 'TPSWarp', 'LocalisationCNN', 'SpatialTransformer',
    'ParallelSpatialTransformer',
]

TRANSFORMS = ('affine', 'similarity', 'rotation', 'attention', 'translation', 'projective', 'tps')
_PADDING_MODES = ('zeros', 'border', 'reflection')
_SAMPLE_MODES = ('bilinear', 'nearest', 'bicubic')
SizeLike = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------
def _size2(size: SizeLike, name: str = 'size') -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair (H, W) of ints, got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def _check_image(x: torch.Tensor, name: str, channels: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                         f"set in_chans={x.shape[1]} when building the module")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {x.dtype}; convert with x.float()")


def _check_sampler(mode: str, padding_mode: str, name: str) -> None:
    if mode not in _SAMPLE_MODES:
        raise ValueError(f"{name}: mode must be one of {_SAMPLE_MODES}, got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")


_THETA_SHAPES = {'affine': '[B, 2, 3]', 'projective': '[B, 3, 3]', 'tps': '[B, N, 2]'}


def check_theta(theta: torch.Tensor, kind: str, num_points: Optional[int] = None, name: str = 'theta',
                finite: bool = True) -> None:
    """Raise a ``ValueError`` unless ``theta`` has the shape of ``kind`` (``'affine'`` ``[B, 2, 3]``, ``'projective'``
    ``[B, 3, 3]``, ``'tps'`` ``[B, N, 2]``) and, with ``finite=True``, holds only finite values."""
    if kind not in _THETA_SHAPES:
        raise ValueError(f"check_theta: kind must be one of {tuple(_THETA_SHAPES)}, got {kind!r}")
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {_THETA_SHAPES[kind]}, got {type(theta).__name__}")
    shape = tuple(theta.shape)
    ok = theta.dim() == 3
    if ok and kind == 'affine':
        ok = shape[1:] == (2, 3)
    elif ok and kind == 'projective':
        ok = shape[1:] == (3, 3)
    elif ok and kind == 'tps':
        ok = shape[2] == 2 and (num_points is None or shape[1] == num_points)
    if not ok:
        hint = ''
        if kind == 'affine' and theta.dim() == 2 and shape[-1] == 6:
            hint = '; it looks flat: use theta.view(-1, 2, 3)'
        elif kind == 'affine' and shape[1:] == (3, 3):
            hint = '; a 3x3 matrix is a projective transform: use projective_grid / transform="projective"'
        elif kind == 'projective' and shape[1:] == (2, 3):
            hint = '; a 2x3 matrix is affine: use affine_grid / transform="affine"'
        elif kind == 'projective' and theta.dim() == 2 and shape[-1] in (8, 9):
            hint = '; it looks flat: build the 3x3 matrix first (ProjectiveTransform().to_theta for 8 parameters)'
        expected = _THETA_SHAPES[kind] if num_points is None or kind != 'tps' else f'[B, {num_points}, 2]'
        raise ValueError(f"{name}: expected a {kind} theta of shape {expected}, got {shape}{hint}")
    if not theta.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {theta.dtype}")
    if finite and theta.device.type != 'meta':
        bad = ~torch.isfinite(theta.detach()).flatten(1).all(1)
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"{name}: non-finite values (NaN/Inf) in the {kind} transform of sample(s) {idx[:8]}"
                f"{'...' if len(idx) > 8 else ''}. The localisation net has diverged: lower its learning rate "
                f"(lr multiplier), bound the transform (max_translation, scale_range, ...), or add transform_loss(); "
                f"SpatialTransformer(invalid='identity') falls back to the identity for such samples instead.")


# ----------------------------------------------------------------------------------------------------------------
# grid generators (functional)
# ----------------------------------------------------------------------------------------------------------------
def identity_grid(size: SizeLike, align_corners: bool, dtype: torch.dtype = torch.float32,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """The identity sampling grid ``[H, W, 2]`` (``(x, y)`` in normalised coordinates), made by ``F.affine_grid`` so
    that it matches ``grid_sample`` for the same ``align_corners``."""
    h, w = _size2(size)
    eye = torch.tensor([[[1., 0., 0.], [0., 1., 0.]]], dtype=dtype, device=device)
    return F.affine_grid(eye, [1, 1, h, w], align_corners=align_corners)[0]


def affine_grid(theta: torch.Tensor, size: SizeLike, align_corners: bool) -> torch.Tensor:
    """Sampling grid ``[B, H, W, 2]`` of the affine maps ``theta [B, 2, 3]`` for an output of ``size = (H, W)``.

    ``grid[b, i, j] = theta[b] @ (x_j, y_i, 1)``, with ``(x_j, y_i)`` the normalised centre of output pixel ``(i, j)``.

    Example:
        >>> theta = torch.tensor([[[1., 0., 0.], [0., 1., 0.]]])
        >>> affine_grid(theta, (4, 5), align_corners=False).shape
        torch.Size([1, 4, 5, 2])
    """
    check_theta(theta, 'affine')
    h, w = _size2(size)
    return F.affine_grid(theta, [theta.shape[0], 1, h, w], align_corners=align_corners)


def _homogeneous_denominator(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return base[..., 0] * theta[:, None, 2, 0] + base[..., 1] * theta[:, None, 2, 1] + theta[:, None, 2, 2]


def projective_invalid(theta: torch.Tensor, size: SizeLike = (8, 8), align_corners: bool = False,
                       eps: float = 1e-6) -> torch.Tensor:
    """Boolean ``[B]``: which 3x3 matrices are unusable for an output of ``size`` — non-finite, singular
    (``|det H| < eps * max|H|^3``), or with the homogeneous coordinate ``w = h_31 x + h_32 y + h_33`` reaching
    ``|w| < eps`` or changing sign on the output grid (the plane would fold through the horizon)."""
    check_theta(theta, 'projective', finite=False)
    t = theta.detach()
    bad = ~torch.isfinite(t).flatten(1).all(1)
    t = torch.where(bad[:, None, None], torch.eye(3, dtype=t.dtype, device=t.device).expand_as(t), t)
    t64 = t.double()
    scale = t64.abs().flatten(1).amax(1).clamp_min(1e-30)
    bad |= torch.linalg.det(t64).abs() < eps * scale ** 3
    base = identity_grid(size, align_corners, t64.dtype, t64.device).view(1, -1, 2)
    wden = _homogeneous_denominator(t64, base)
    sign = torch.sign(wden[:, :1])
    bad |= (wden * sign).amin(1) < eps * scale
    return bad


def projective_grid(theta: torch.Tensor, size: SizeLike, align_corners: bool, eps: float = 1e-6) -> torch.Tensor:
    """Sampling grid ``[B, H, W, 2]`` of the projective maps (homographies) ``theta [B, 3, 3]``.

    ``(x_s, y_s) = (u / w, v / w)`` with ``(u, v, w) = theta @ (x_t, y_t, 1)``. Raises a ``ValueError`` for a
    non-finite, singular or horizon-crossing matrix (see :func:`projective_invalid`) rather than returning NaN or
    Inf sampling locations.

    Example:
        >>> projective_grid(torch.eye(3)[None], (4, 4), align_corners=False).shape
        torch.Size([1, 4, 4, 2])
    """
    check_theta(theta, 'projective')
    h, w = _size2(size)
    bad = projective_invalid(theta, (h, w), align_corners, eps) if theta.device.type != 'meta' else None
    if bad is not None and bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"projective_grid: the 3x3 matrix of sample(s) {idx[:8]} is singular or sends part of the {h}x{w} output "
            f"to infinity (|det H| or the homogeneous coordinate w = h31 x + h32 y + h33 is ~0 or changes sign). "
            f"Bound the perspective row (ProjectiveTransform(max_perspective=0.5)) or use invalid='identity' in "
            f"SpatialTransformer to fall back to the identity for such samples.")
    base = identity_grid((h, w), align_corners, theta.dtype, theta.device).view(1, h * w, 2)
    num_x = base[..., 0] * theta[:, None, 0, 0] + base[..., 1] * theta[:, None, 0, 1] + theta[:, None, 0, 2]
    num_y = base[..., 0] * theta[:, None, 1, 0] + base[..., 1] * theta[:, None, 1, 1] + theta[:, None, 1, 2]
    den = _homogeneous_denominator(theta, base)
    return torch.stack((num_x / den, num_y / den), -1).view(-1, h, w, 2)


def tps_control_points(grid_size: SizeLike = 4, dtype: torch.dtype = torch.float32,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Control points at rest: a regular ``gy x gx`` grid spanning ``[-1, 1]^2``, as ``[N, 2]`` ``(x, y)`` rows
    (row-major, ``N = gy * gx``; each side needs at least 2 points)."""
    gy, gx = _size2(grid_size, 'grid_size')
    if gy < 2 or gx < 2:
        raise ValueError(f"tps_control_points: need at least 2 control points per side, got grid_size={(gy, gx)}")
    ys = torch.linspace(-1, 1, gy, dtype=dtype, device=device)
    xs = torch.linspace(-1, 1, gx, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack((xx.flatten(), yy.flatten()), -1)


def _tps_kernel(r2: torch.Tensor) -> torch.Tensor:
    # U(r) = r^2 log r^2 with U(0) = 0
    return r2 * torch.log(r2.clamp_min(1e-20))


def tps_solve_matrix(points: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """The linear map ``M [P, N]`` with ``tps(points) = M @ src`` for the thin-plate spline that sends the control
    points ``ctrl [N, 2]`` (in output space) to ``src [N, 2]`` (in input space).

    The spline is ``f(p) = a_0 + A p + sum_i w_i U(|p - c_i|)``, ``U(r) = r^2 log r^2``, with ``f(c_i) = s_i`` and
    ``sum_i w_i = 0``, ``sum_i w_i c_i = 0``. With ``L = [[K, P], [P^T, 0]]`` (``K_ij = U(|c_i - c_j|)``,
    ``P = [1, c]``), the coefficients are ``L^{-1} [S; 0]``, so ``M = [U(|p - c|), 1, p] @ L^{-1}[:, :N]``.
    Computed in float64. Because affine maps lie in the span, ``src = ctrl`` gives the identity exactly.
    """
    c = ctrl.double()
    p = points.double()
    n = c.shape[0]
    k = _tps_kernel(torch.cdist(c, c) ** 2)
    pc = torch.cat((torch.ones(n, 1, dtype=c.dtype, device=c.device), c), 1)
    top = torch.cat((k, pc), 1)
    bottom = torch.cat((pc.t(), torch.zeros(3, 3, dtype=c.dtype, device=c.device)), 1)
    L = torch.cat((top, bottom), 0)
    L_inv = torch.linalg.inv(L)
    up = _tps_kernel(torch.cdist(p, c) ** 2)
    rows = torch.cat((up, torch.ones(p.shape[0], 1, dtype=c.dtype, device=c.device), p), 1)
    return rows @ L_inv[:, :n]


def tps_grid(src: torch.Tensor, ctrl: torch.Tensor, size: SizeLike, align_corners: bool,
             solve_matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sampling grid ``[B, H, W, 2]`` of the thin-plate splines sending ``ctrl [N, 2]`` (output space, at rest) to
    ``src [B, N, 2]`` (input space). ``solve_matrix`` (``[H*W, N]`` from :func:`tps_solve_matrix` on the identity
    grid) may be passed to skip the solve.

    Example:
        >>> c = tps_control_points(3)
        >>> tps_grid(c[None], c, (5, 5), align_corners=False).shape
        torch.Size([1, 5, 5, 2])
    """
    check_theta(src, 'tps', num_points=ctrl.shape[0], name='tps src points')
    h, w = _size2(size)
    if solve_matrix is None:
        base = identity_grid((h, w), align_corners, torch.float64, src.device).view(-1, 2)
        solve_matrix = tps_solve_matrix(base, ctrl)
    if solve_matrix.shape != (h * w, ctrl.shape[0]):
        raise ValueError(f"tps_grid: solve_matrix must be [H*W={h * w}, N={ctrl.shape[0]}], "
                         f"got {tuple(solve_matrix.shape)}")
    grid = torch.matmul(solve_matrix.to(src.dtype), src)  # [B, H*W, 2]
    return grid.view(-1, h, w, 2)


def warp(x: torch.Tensor, grid: torch.Tensor, align_corners: bool, mode: str = 'bilinear',
         padding_mode: str = 'zeros') -> torch.Tensor:
    """The sampler: ``F.grid_sample(x [B, C, H, W], grid [B, h, w, 2]) -> [B, C, h, w]`` with checks."""
    _check_image(x, 'warp')
    _check_sampler(mode, padding_mode, 'warp')
    if grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != x.shape[0]:
        raise ValueError(f"warp: grid must be [B={x.shape[0]}, h, w, 2], got {tuple(grid.shape)}")
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def affine_warp(x: torch.Tensor, theta: torch.Tensor, out_size: Optional[SizeLike] = None, align_corners: bool = False,
                mode: str = 'bilinear', padding_mode: str = 'zeros') -> torch.Tensor:
    """Warp ``x [B, C, H, W]`` by affine ``theta [B, 2, 3]`` to ``[B, C, *out_size]`` (default: the input size)."""
    _check_image(x, 'affine_warp')
    grid = affine_grid(theta, out_size or x.shape[-2:], align_corners)
    return warp(x, grid, align_corners, mode, padding_mode)


def projective_warp(x: torch.Tensor, theta: torch.Tensor, out_size: Optional[SizeLike] = None,
                    align_corners: bool = False, mode: str = 'bilinear', padding_mode: str = 'zeros') -> torch.Tensor:
    """Warp ``x [B, C, H, W]`` by homographies ``theta [B, 3, 3]`` to ``[B, C, *out_size]``."""
    _check_image(x, 'projective_warp')
    grid = projective_grid(theta, out_size or x.shape[-2:], align_corners)
    return warp(x, grid, align_corners, mode, padding_mode)


def tps_warp(x: torch.Tensor, src: torch.Tensor, ctrl: torch.Tensor, out_size: Optional[SizeLike] = None,
             align_corners: bool = False, mode: str = 'bilinear', padding_mode: str = 'zeros') -> torch.Tensor:
    """Warp ``x [B, C, H, W]`` by the thin-plate splines ``ctrl [N, 2] -> src [B, N, 2]`` to ``[B, C, *out_size]``."""
    _check_image(x, 'tps_warp')
    grid = tps_grid(src, ctrl, out_size or x.shape[-2:], align_corners)
    return warp(x, grid, align_corners, mode, padding_mode)


# ----------------------------------------------------------------------------------------------------------------
# theta builders
# ----------------------------------------------------------------------------------------------------------------
def _as_batch(*vals: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    ts = [torch.as_tensor(v) for v in vals]
    dtype = torch.promote_types(torch.get_default_dtype(), ts[0].dtype) if not ts[0].is_floating_point() \
        else ts[0].dtype
    ts = torch.broadcast_tensors(*[t.to(dtype).reshape(-1) for t in ts])
    return tuple(ts)


def similarity_theta(angle, scale, tx, ty) -> torch.Tensor:
    """``[B, 2, 3]`` for ``(x, y) -> s R(angle) (x, y) + (tx, ty)``; ``angle`` in radians (a positive angle turns the
    sampling grid clockwise on screen, i.e. the displayed output counter-clockwise, as ``data.rotate_images``)."""
    angle, scale, tx, ty = _as_batch(angle, scale, tx, ty)
    c, s = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack((torch.stack((c, -s, tx), -1), torch.stack((s, c, ty), -1)), 1)


def rotation_theta(angle) -> torch.Tensor:
    """``[B, 2, 3]`` rotation about the image centre by ``angle`` radians."""
    angle, = _as_batch(angle)
    z = torch.zeros_like(angle)
    return similarity_theta(angle, z + 1, z, z)


def attention_theta(scale, tx, ty) -> torch.Tensor:
    """``[B, 2, 3]`` for the paper's attention transform ``[[s, 0, tx], [0, s, ty]]`` (isotropic crop)."""
    scale, tx, ty = _as_batch(scale, tx, ty)
    z = torch.zeros_like(scale)
    return torch.stack((torch.stack((scale, z, tx), -1), torch.stack((z, scale, ty), -1)), 1)


def translation_theta(tx, ty) -> torch.Tensor:
    """``[B, 2, 3]`` translation ``[[1, 0, tx], [0, 1, ty]]`` (normalised units: 2 is the image width)."""
    tx, ty = _as_batch(tx, ty)
    return attention_theta(torch.ones_like(tx), tx, ty)


def homography_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The homographies ``H [B, 3, 3]`` (``H_33 = 1``) with ``H (dst_i, 1) ~ (src_i, 1)`` for 4 point pairs
    ``src, dst [B, 4, 2]``: used as a projective ``theta`` it samples the input at ``src_i`` for output ``dst_i``.
    Solved in float64 (direct linear transform); raises a ``ValueError`` when 3 of the points are collinear."""
    if src.shape != dst.shape or src.dim() != 3 or src.shape[1:] != (4, 2):
        raise ValueError(f"homography_from_points: expected src and dst of shape [B, 4, 2], got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    s, d = src.double(), dst.double()
    x, y, u, v = d[..., 0], d[..., 1], s[..., 0], s[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack((x, y, one, zero, zero, zero, -u * x, -u * y), -1)
    rows_v = torch.stack((zero, zero, zero, x, y, one, -v * x, -v * y), -1)
    a = torch.cat((rows_u, rows_v), 1)  # [B, 8, 8]
    b = torch.cat((u, v), 1)
    sol, info = torch.linalg.solve_ex(a, b)
    if (info != 0).any() or not torch.isfinite(sol).all():
        raise ValueError("homography_from_points: degenerate point configuration (3 collinear points?)")
    h = torch.cat((sol, torch.ones_like(sol[:, :1])), 1).view(-1, 3, 3)
    return h.to(src.dtype)


def transform_points(theta: torch.Tensor, points: torch.Tensor, kind: str,
                     solve_matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply ``theta`` to ``points [P, 2]`` (output space) giving ``[B, P, 2]`` (input space). For ``'tps'``,
    ``solve_matrix`` from :func:`tps_solve_matrix` (``[P, N]``) is required."""
    if kind == 'affine':
        return points @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
    if kind == 'projective':
        hom = torch.cat((points, torch.ones_like(points[:, :1])), 1)
        uvw = hom @ theta.transpose(1, 2)
        return uvw[..., :2] / uvw[..., 2:]
    if kind == 'tps':
        if solve_matrix is None:
            raise ValueError("transform_points: kind='tps' needs solve_matrix (tps_solve_matrix(points, ctrl))")
        return torch.matmul(solve_matrix.to(theta.dtype), theta)
    raise ValueError(f"transform_points: kind must be 'affine', 'projective' or 'tps', got {kind!r}")


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


# ----------------------------------------------------------------------------------------------------------------
# warp modules (thin wrappers around the functionals)
# ----------------------------------------------------------------------------------------------------------------
class _WarpBase(nn.Module):
    def __init__(self, out_size: Optional[SizeLike] = None, align_corners: bool = False, mode: str = 'bilinear',
                 padding_mode: str = 'zeros'):
        super().__init__()
        _check_sampler(mode, padding_mode, type(self).__name__)
        self.out_size = None if out_size is None else _size2(out_size, 'out_size')
        self.align_corners, self.mode, self.padding_mode = bool(align_corners), mode, padding_mode

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, align_corners={self.align_corners}, mode={self.mode!r}, "
                f"padding_mode={self.padding_mode!r}")


class AffineWarp(_WarpBase):
    """Module form of :func:`affine_warp`: ``forward(x [B, C, H, W], theta [B, 2, 3]) -> [B, C, *out_size]``."""

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return affine_warp(x, theta, self.out_size, self.align_corners, self.mode, self.padding_mode)


class ProjectiveWarp(_WarpBase):
    """Module form of :func:`projective_warp`: ``forward(x [B, C, H, W], theta [B, 3, 3])``."""

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return projective_warp(x, theta, self.out_size, self.align_corners, self.mode, self.padding_mode)


class TPSWarp(_WarpBase):
    """Module form of :func:`tps_warp` for a ``grid_size`` lattice of control points:
    ``forward(x [B, C, H, W], src [B, N, 2])``."""

    def __init__(self, grid_size: SizeLike = 4, **kwargs):
        super().__init__(**kwargs)
        self.family = TPSTransform(grid_size)

    def forward(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__)
        grid = self.family.grid(src, self.out_size or x.shape[-2:], self.align_corners)
        return warp(x, grid, self.align_corners, self.mode, self.padding_mode)


# ----------------------------------------------------------------------------------------------------------------
# localisation net and the spatial transformer
# ----------------------------------------------------------------------------------------------------------------
class LocalisationCNN(nn.Sequential):
    """The default localisation net: ``[conv k x k -> max-pool 2 -> ReLU] x len(channels)`` -> adaptive average
    pool to ``pool_size`` -> flatten -> linear ``hidden`` -> ReLU. Works for any input size;
    ``num_features = hidden``.

    Shapes: ``[B, in_chans, H, W] -> [B, hidden]``.
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (20, 20), kernel_size: int = 5, hidden: int = 50,
                 pool_size: int = 2):
        layers = []
        c = in_chans
        for co in channels:
            layers += [nn.Conv2d(c, co, kernel_size, padding=kernel_size // 2), nn.MaxPool2d(2, ceil_mode=True),
                       nn.ReLU(inplace=True)]
            c = co
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(), nn.Linear(c * pool_size * pool_size, hidden),
                   nn.ReLU(inplace=True)]
        super().__init__(*layers)
        self.in_chans = in_chans
        self.num_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__, self.in_chans)
        return super().forward(x)


class SpatialTransformer(nn.Module):
    """Spatial transformer: localisation net -> ``num_transforms`` transforms of one family -> warped outputs.

    Args:
        in_chans: channels of the input (image or feature map).
        transform: a family name (:data:`TRANSFORMS`) or a :class:`TransformFamily`.
        loc_net: a module mapping ``[B, in_chans, h, w]`` to features ``[B, F]`` (e.g. a timm model built with
            ``num_classes=0``); ``None`` builds :class:`LocalisationCNN` from ``loc_kwargs``.
        loc_features: ``F``; read from ``loc_net.num_features`` when omitted.
        loc_input_size: resize the input to this size (antialiased bilinear) before the localisation net: predict
            the transform from a small image, sample from the full-resolution one.
        out_size: output size ``(h, w)`` (or an int), or a float ``f``: ``round(f * (H, W))`` of each input;
            ``None`` keeps the input size. Smaller than the input = the paper's CUB trick (transform at high
            resolution, hand a smaller crop on).
        num_transforms: ``K`` transforms predicted in parallel from the same localisation features (the 2x / 4x
            ST-CNN). With ``K > 1`` the output is ``[B, K, C, h, w]``.
        align_corners, mode, padding_mode: passed to every grid generator and to ``grid_sample``.
        invalid: ``'raise'`` (default) raises a ``ValueError`` on a non-finite theta or an unusable homography;
            ``'identity'`` replaces those samples' theta by the identity (counted in ``last_num_fallbacks``).
        reg_weight, boundary_weight: weights of :meth:`transform_loss` (identity regulariser and out-of-image
            penalty).
        **family_kwargs: bounds of the family (``max_translation``, ``scale_range``, ``max_angle``, ...).

    The final regression layer (``self.head``) has zero weight and zero bias, and raw parameters zero mean the
    identity in every family, so at initialisation ``forward(x) == x`` (to float rounding) when ``out_size`` is the
    input size. (Consequence: at the very first step the localisation net itself gets zero gradient — only
    ``head`` does; from the second step on the gradient reaches the whole localisation net.)

    Shapes: ``[B, C, H, W] -> [B, C, h, w]`` (``K = 1``) or ``[B, K, C, h, w]``. After each forward,
    ``last_theta`` holds the (detached) transforms ``[B, ...]`` (``[B, K, ...]`` for ``K > 1``).

    Example:
        >>> stn = SpatialTransformer(1, 'similarity', scale_range=(0.5, 1.5))
        >>> x = torch.rand(2, 1, 28, 28)
        >>> torch.allclose(stn(x), x, atol=1e-5)
        True
    """

    def __init__(self, in_chans: int = 1, transform: Union[str, TransformFamily] = 'affine',
                 loc_net: Optional[nn.Module] = None, loc_features: Optional[int] = None,
                 loc_kwargs: Optional[dict] = None, loc_input_size: Optional[SizeLike] = None,
                 out_size: Optional[SizeLike] = None, num_transforms: int = 1, align_corners: bool = False,
                 mode: str = 'bilinear', padding_mode: str = 'zeros', invalid: str = 'raise',
                 reg_weight: float = 0.0, boundary_weight: float = 0.0, **family_kwargs):
        super().__init__()
        name = type(self).__name__
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
        if not isinstance(num_transforms, int) or num_transforms < 1:
            raise ValueError(f"{name}: num_transforms must be a positive int, got {num_transforms!r}")
        if invalid not in ('raise', 'identity'):
            raise ValueError(f"{name}: invalid must be 'raise' or 'identity', got {invalid!r}")
        _check_sampler(mode, padding_mode, name)
        self.family = create_transform(transform, **family_kwargs)
        if loc_net is None:
            loc_net = LocalisationCNN(in_chans, **(loc_kwargs or {}))
        elif loc_kwargs:
            raise ValueError(f"{name}: loc_kwargs configure the default LocalisationCNN; they cannot be used with a "
                             f"given loc_net")
        if loc_features is None:
            loc_features = getattr(loc_net, 'num_features', None)
            if not isinstance(loc_features, int):
                raise ValueError(f"{name}: cannot tell the localisation net's output size: pass loc_features=F "
                                 f"(it must map [B, {in_chans}, H, W] to [B, F])")
        self.in_chans = in_chans
        self.loc_net = loc_net
        self.loc_features = loc_features
        self.loc_input_size = None if loc_input_size is None else _size2(loc_input_size, 'loc_input_size')
        self.num_transforms = num_transforms
        self.head = nn.Linear(loc_features, num_transforms * self.family.num_params)
        if isinstance(out_size, float):
            if not 0 < out_size <= 16:
                raise ValueError(f"{name}: a float out_size is a scale factor of the input size and must be in "
                                 f"(0, 16], got {out_size}")
            self.out_size = out_size
        else:
            self.out_size = None if out_size is None else _size2(out_size, 'out_size')
        self.align_corners, self.mode, self.padding_mode, self.invalid = bool(align_corners), mode, padding_mode, \
            invalid
        self.reg_weight, self.boundary_weight = float(reg_weight), float(boundary_weight)
        self._theta: Optional[torch.Tensor] = None
        self.last_num_fallbacks = 0
        self.reset_head()

    def reset_head(self) -> None:
        """Zero weight and bias: every transform starts at the identity."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def extra_repr(self) -> str:
        return (f"in_chans={self.in_chans}, num_transforms={self.num_transforms}, out_size={self.out_size}, "
                f"align_corners={self.align_corners}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
                f"invalid={self.invalid!r}")

    # ---------------------------------------------------------------------------------------------------------
    def localise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw parameters ``[B, K, P]`` from the localisation net."""
        z = x
        if self.loc_input_size is not None and tuple(z.shape[-2:]) != self.loc_input_size:
            z = F.interpolate(z, size=self.loc_input_size, mode='bilinear', align_corners=False, antialias=True)
        feats = self.loc_net(z)
        if feats.dim() != 2 or feats.shape[1] != self.loc_features:
            raise ValueError(f"{type(self).__name__}: the localisation net returned {tuple(feats.shape)}, expected "
                             f"[B, {self.loc_features}] (build a timm loc net with num_classes=0 so it returns "
                             f"pooled features)")
        return self.head(feats).view(x.shape[0], self.num_transforms, self.family.num_params)

    def output_size(self, x: torch.Tensor) -> Tuple[int, int]:
        """The output size ``(h, w)`` for input ``x``."""
        if self.out_size is None:
            return int(x.shape[-2]), int(x.shape[-1])
        if isinstance(self.out_size, float):
            return max(1, round(self.out_size * x.shape[-2])), max(1, round(self.out_size * x.shape[-1]))
        return self.out_size

    def predict_theta(self, x: torch.Tensor) -> torch.Tensor:
        """Transforms ``[B*K, ...]`` (sample-major) for ``x``, after the invalid-theta policy."""
        params = self.localise(x).flatten(0, 1)
        theta = self.family.to_theta(params)
        if theta.device.type == 'meta':  # shape-only run (timm's meta-device checks): nothing to validate
            self.last_num_fallbacks = 0
            return theta
        size = self.output_size(x)
        bad = self.family.invalid(theta, size, self.align_corners)
        self.last_num_fallbacks = int(bad.sum())
        if self.last_num_fallbacks:
            if self.invalid == 'raise':
                self.family.check(theta)  # non-finite: raises with its own message
                if self.family.kind == 'projective':
                    self.family.grid(theta, size, self.align_corners)  # singular: raises
                raise ValueError(f"{type(self).__name__}: unusable transform for samples {bad.nonzero().flatten()}")
            ident = self.family.identity_theta(1, theta.dtype, theta.device).expand_as(theta)
            theta = torch.where(bad.view(-1, *([1] * (theta.dim() - 1))), ident, theta)
        return theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__, self.in_chans)
        theta = self.predict_theta(x)
        self._theta = theta
        b, k = x.shape[0], self.num_transforms
        size = self.output_size(x)
        grid = self.family.grid(theta, size, self.align_corners)  # [B*K, h, w, 2]
        src = x if k == 1 else x[:, None].expand(b, k, *x.shape[1:]).flatten(0, 1)
        out = warp(src, grid, self.align_corners, self.mode, self.padding_mode)
        return out if k == 1 else out.view(b, k, *out.shape[1:])

    # ---------------------------------------------------------------------------------------------------------
    @property
    def last_theta(self) -> Optional[torch.Tensor]:
        """The transforms of the last forward (detached): ``[B, *theta]`` or ``[B, K, *theta]``."""
        if self._theta is None:
            return None
        t = self._theta.detach()
        return t if self.num_transforms == 1 else t.view(-1, self.num_transforms, *t.shape[1:])

    def sampling_grid(self, size: Optional[SizeLike] = None) -> Optional[torch.Tensor]:
        """The sampling grid ``[B*K, h, w, 2]`` of the last transforms (for inspection / plotting)."""
        if self._theta is None:
            return None
        with torch.no_grad():
            if size is None:
                size = self.out_size if isinstance(self.out_size, tuple) else (16, 16)
            return self.family.grid(self._theta.detach(), size, self.align_corners)

    def transform_loss(self, reg_weight: Optional[float] = None,
                       boundary_weight: Optional[float] = None) -> torch.Tensor:
        """``reg_weight * mean deviation from identity + boundary_weight * mean out-of-image penalty`` of the last
        forward's transforms (differentiable; add it to the task loss). Zero before the first forward."""
        rw = self.reg_weight if reg_weight is None else float(reg_weight)
        bw = self.boundary_weight if boundary_weight is None else float(boundary_weight)
        if self._theta is None:
            return self.head.bias.new_zeros(())
        loss = self._theta.new_zeros(())
        if rw:
            loss = loss + rw * self.family.deviation(self._theta).mean()
        if bw:
            loss = loss + bw * self.family.out_of_bounds(self._theta).mean()
        return loss


class ParallelSpatialTransformer(SpatialTransformer):
    """``K`` parallel transformers sharing one localisation net (the paper's 2x / 4x ST-CNN):
    ``[B, C, H, W] -> [B, K, C, h, w]``. Same arguments as :class:`SpatialTransformer`, ``num_transforms=2`` by
    default. Each transform starts at the identity; ``init_translations`` (``K`` pairs ``(tx, ty)``) may instead start
    them on different parts of the image for the translating families (attention, similarity, affine, translation).
    """

    def __init__(self, in_chans: int = 3, transform: Union[str, TransformFamily] = 'attention', num_transforms: int = 2,
                 init_translations: Optional[Sequence[Sequence[float]]] = None, **kwargs):
        super().__init__(in_chans, transform, num_transforms=num_transforms, **kwargs)
        self.init_translations = None if init_translations is None else [tuple(map(float, t)) for t in
                                                                         init_translations]
        self.reset_head()

    def reset_head(self) -> None:
        super().reset_head()
        init = getattr(self, 'init_translations', None)
        if init is None:
            return
        if len(init) != self.num_transforms or any(len(t) != 2 for t in init):
            raise ValueError(f"{type(self).__name__}: init_translations must be {self.num_transforms} pairs (tx, ty), "
                             f"got {init!r}")
        idx = {'affine': (2, 5), 'similarity': (2, 3), 'attention': (1, 2), 'translation': (0, 1)}.get(
            self.family.name)
        if idx is None:
            raise ValueError(f"{type(self).__name__}: init_translations needs a family with a translation "
                             f"(affine, similarity, attention, translation), not {self.family.name!r}")
        bound = getattr(self.family, 'max_translation', None)
        p = self.family.num_params
        with torch.no_grad():
            for k, t in enumerate(init):
                for j, v in zip(idx, t):
                    if bound is not None:
                        if not abs(v) < bound:
                            raise ValueError(f"{type(self).__name__}: init translation {v} is outside the bound "
                                             f"max_translation={bound}")
                        v = math.atanh(v / bound)
                    self.head.bias[k * p + j] = v
