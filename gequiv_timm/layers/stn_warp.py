"""Spatial-transformer warps, functional: grid generators, the sampler and ``theta`` builders (pure functions).

The module forms are in :mod:`gequiv_timm.layers.stn` (:class:`~gequiv_timm.layers.stn.AffineWarp`,
:class:`~gequiv_timm.layers.stn.ProjectiveWarp`, :class:`~gequiv_timm.layers.stn.TPSWarp`); the transform
families that make ``theta`` from regressed parameters are in :mod:`gequiv_timm.layers.stn_transforms`.

Coordinates are normalised (``x`` right, ``y`` down, the image spanning ``[-1, 1]`` on both axes) and the map goes
from output to input, as in ``F.affine_grid``. ``align_corners`` is passed explicitly, and identically, to every grid
generator and to ``grid_sample``: the base grid of every family is made by ``F.affine_grid`` with the identity, so the
projective and thin-plate-spline grids use exactly the same pixel centres as the affine one. With
``align_corners=False`` (the default) the pixel centres sit at ``(2i + 1)/W - 1``; with ``True`` at ``2i/(W - 1) - 1``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .checks import check_float_tensor

__all__ = [
    'SizeLike', 'identity_grid', 'affine_grid', 'projective_grid', 'projective_invalid', 'tps_grid', 'warp',
    'affine_warp', 'projective_warp', 'tps_warp', 'check_theta', 'similarity_theta', 'rotation_theta',
    'attention_theta', 'translation_theta', 'homography_from_points', 'tps_control_points', 'tps_solve_matrix',
    'transform_points',
]

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
    check_float_tensor(x, name)


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
    check_float_tensor(theta, name)
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
    if theta.shape[0] == 0:  # F.affine_grid refuses an empty batch; an empty batch of grids, still on theta's graph
        return theta.new_zeros(0, h, w, 2) + theta.sum()
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
