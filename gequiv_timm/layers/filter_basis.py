"""Filter bases: the fixed linear map from a group convolution's base weights to its filter at every group element.

A group convolution correlates with the filter ``g . psi`` for every output element ``g`` (:mod:`.gconv`). For p4 and
p4m, ``g . psi`` is ``psi`` with its pixels permuted (GrouPy's index gather). A rotation by ``2 pi / N`` with
``N = 8, 12, 16, ...`` does not map the pixel grid to itself, so the rotated filter must be *computed* from the
base weights by a linear map built once: ``bank = weight @ map``. Three bases are offered (``filter_basis=``):

* ``'pixel'``: the weights are the ``k x k`` pixels; the rotated filters are index permutations. Exact, and the
  only choice that keeps GrouPy's weights; available where every element maps the grid to itself (z2, p4, p4m,
  ``c2``, ``d1``, ``d2``). The default there.
* ``'harmonic'``: the weights are the coefficients of a band-limited steerable basis (the default for every other
  group): a centre tap and, on each integer radius ``rho = 1 .. (k-1)/2``, a Gaussian ring
  ``exp(-(|p| - rho)^2 / (2 sigma^2))`` (``sigma = 0.6``, ``0.4`` on the outermost ring, which the square
  clips) times the circular harmonics ``1, cos(m phi), sin(m phi)`` for ``m = 1 .. min(max_frequency, 2 rho)``
  (``max_frequency = 2`` by default; harmonics with ``m > 0`` vanish at the centre, as a continuous function
  must). This is the construction of Weiler, Hamprecht & Storath, "Learning Steerable Filters for Rotation
  Equivariant CNNs" (CVPR 2018) and of escnn's ``R2Conv`` bases (Weiler & Cesa, NeurIPS 2019), written here from
  the papers. Rotating a harmonic only rotates its coefficient pair, ``(a, b) -> R(m theta) (a, b)``, so the
  filter at angle ``theta`` is the sampled basis times that steering matrix: the filter *space* is closed under
  every rotation, not only under the group's. The columns are orthonormalised once (symmetric, ``(B^T B)^-1/2``),
  so the He init counts ``C_in * |G_in| * n_basis`` terms and keeps the filters' energy.
* ``'bilinear'``: the weights are the ``k x k`` pixels of the filter at the identity; the filter at angle
  ``theta`` is that pixel grid resampled bilinearly at ``R(theta)^-1 p`` (zeros outside), as interpolating SE(2)
  G-CNNs do (cf. Bekkers, "B-Spline CNNs on Lie Groups", ICLR 2020, with first-order splines). Kept for
  comparison: on white filters it is far less equivariant (below).

Exactness: the map of element ``M^m R^r`` is built at the angle left after the largest whole number ``q`` of quarter
turns (``2 pi r / N - q pi / 2``, under 90 degrees), then rotated by ``q`` quarter turns and mirrored with exact
index operations (``rot90``, ``flip`` of the ``k x k`` grid). So when 4 divides ``N`` the maps of ``R^(r + N/4)`` and
``M R^r`` are exactly the ``rot90`` and the flip of the map of ``R^r``: quarter turns and mirrors stay exact to float
rounding, in every basis.

Measured (``benchmarks/bench_cn.py --part basis``, float64, C8 at 45 degrees, He-random weights, mean of 3 seeds;
random band-limited images with wavelengths >= 8 pixels, rotated exactly, compared at the rotation centre so that
no output interpolation enters; relative error ``max |f(g x) - g f(x)| / max |f(x)|``):

===============================  =======  =================  =========================
basis                            weights  lifting 3x3 / 5x5  lift+ReLU+gconv 3x3 / 5x5
===============================  =======  =================  =========================
``'harmonic'`` (default)         6 / 11   0.006 / 0.005      0.031 / 0.026
``'harmonic'``, max_frequency=1  4 / 7    0.004 / 0.001      0.012 / 0.014
``'bilinear'``                   9 / 25   0.28 / 0.42        0.45 / 0.68
bicubic (measured, not offered)  9 / 25   0.22 / 0.47        0.35 / 0.73
no rotation at all (broken)      6 / 11   0.34 / 0.31        0.46 / 0.52
===============================  =======  =================  =========================

A white 3x3 or 5x5 filter has no good 45-degree rotation on its own grid (resampling it is about as wrong as not
rotating it); a band-limited one has, and the rotated filters stay in the same small space, whatever the angle. The
harmonic basis is therefore the default, with fewer weights per filter; ``max_frequency=1`` trades detail (no
``cos 2 phi`` line detectors) for a further 2-3x lower error. ``'bilinear'`` stays available for comparison.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Tuple

import torch

from .groups import get_group

__all__ = ['FILTER_BASES', 'DEFAULT_MAX_FREQUENCY', 'DENSE_LIMIT', 'default_filter_basis', 'resolve_filter_basis',
           'basis_size',
           'harmonic_frequencies', 'rotation_maps', 'expansion_map', 'count_parameters']

FILTER_BASES = ('pixel', 'harmonic', 'bilinear')
DEFAULT_MAX_FREQUENCY = 2
RING_SIGMA = 0.6        # width of the inner Gaussian rings, in filter taps
OUTER_RING_SIGMA = 0.4  # the outermost ring, clipped by the square grid (measured best, benchmarks/bench_cn.py)


def default_filter_basis(group) -> str:
    """``'pixel'`` where every element of ``group`` maps the pixel grid to itself, else ``'harmonic'``."""
    return 'pixel' if get_group(group).exact else 'harmonic'


def resolve_filter_basis(filter_basis: Optional[str], group, max_frequency: Optional[int] = None,
                         owner: str = 'GroupConv2d') -> Tuple[str, Optional[int]]:
    """Check ``filter_basis`` / ``max_frequency`` for ``group`` and fill in the defaults: ``(basis, max_frequency)``
    (``max_frequency`` is ``None`` unless the basis is ``'harmonic'``). Raises a ValueError naming ``owner``."""
    g = get_group(group)
    basis = default_filter_basis(g) if filter_basis is None else filter_basis
    if basis not in FILTER_BASES:
        raise ValueError(f"{owner}: filter_basis must be one of {FILTER_BASES} (or None for the group's default), "
                         f"got {filter_basis!r}")
    if basis == 'pixel' and not g.exact:
        raise ValueError(f"{owner}: filter_basis='pixel' permutes filter pixels, which needs rotations by multiples "
                         f"of 90 degrees; group {g.name!r} rotates by {360 / g.rotations:g} degrees. Use "
                         f"filter_basis='harmonic' (the default for {g.name!r}) or 'bilinear'.")
    if basis != 'harmonic':
        if max_frequency is not None:
            raise ValueError(f"{owner}: max_frequency applies to filter_basis='harmonic' only, got "
                             f"max_frequency={max_frequency!r} with filter_basis={basis!r}")
        return basis, None
    if max_frequency is None:
        max_frequency = DEFAULT_MAX_FREQUENCY
    if not isinstance(max_frequency, int) or isinstance(max_frequency, bool) or max_frequency < 0:
        raise ValueError(f"{owner}: max_frequency must be a non-negative int, got {max_frequency!r}")
    return basis, max_frequency


def harmonic_frequencies(kernel_size: int, max_frequency: int = DEFAULT_MAX_FREQUENCY) -> List[Tuple[int, int, int]]:
    """The harmonic basis functions of a ``k x k`` filter as ``(ring radius, frequency m, 0 for cos / 1 for sin)``,
    in column order: the centre ``(0, 0, 0)``, then for each ring ``rho = 1 .. (k-1)/2`` frequency 0 and the
    ``(cos, sin)`` pairs of ``m = 1 .. min(max_frequency, 2 rho)``."""
    out = [(0, 0, 0)]
    for rho in range(1, (kernel_size - 1) // 2 + 1):
        out.append((rho, 0, 0))
        for m in range(1, min(max_frequency, 2 * rho) + 1):
            out += [(rho, m, 0), (rho, m, 1)]
    return out


def basis_size(kernel_size: int, filter_basis: str = 'harmonic', max_frequency: Optional[int] = None) -> int:
    """Number of weights per (output channel, input channel, input group element) in ``filter_basis``: ``k * k``
    for ``'pixel'`` and ``'bilinear'``; for ``'harmonic'`` 6 (3x3), 11 (5x5), 16 (7x7) at ``max_frequency=2``."""
    if filter_basis in ('pixel', 'bilinear'):
        return kernel_size * kernel_size
    if filter_basis != 'harmonic':
        raise ValueError(f"basis_size: filter_basis must be one of {FILTER_BASES}, got {filter_basis!r}")
    mf = DEFAULT_MAX_FREQUENCY if max_frequency is None else max_frequency
    return len(harmonic_frequencies(kernel_size, mf))


def _offsets(kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)``: the (row, column) offsets of the ``k x k`` taps from the centre, float64, flattened."""
    c = (kernel_size - 1) / 2
    u, v = torch.meshgrid(torch.arange(kernel_size, dtype=torch.float64) - c,
                          torch.arange(kernel_size, dtype=torch.float64) - c, indexing='ij')
    return u.reshape(-1), v.reshape(-1)


def _harmonic_samples(kernel_size: int, max_frequency: int) -> torch.Tensor:
    """The harmonic basis sampled at the taps, ``[k*k, n]`` float64, not yet orthonormalised."""
    u, v = _offsets(kernel_size)
    r = torch.sqrt(u * u + v * v)
    phi = torch.atan2(v, u)
    outer = (kernel_size - 1) // 2
    cols = []
    for rho, m, sin in harmonic_frequencies(kernel_size, max_frequency):
        if rho == 0:
            cols.append((r < 0.5).to(torch.float64))
            continue
        sigma = OUTER_RING_SIGMA if rho == outer else RING_SIGMA
        ring = torch.exp(-0.5 * (r - rho) ** 2 / sigma ** 2)
        if m == 0:
            cols.append(ring)
        else:  # a harmonic of frequency m > 0 vanishes at the centre (where its angle is undefined)
            wave = torch.sin(m * phi) if sin else torch.cos(m * phi)
            cols.append(torch.where(r < 0.5, torch.zeros_like(r), ring * wave))
    return torch.stack(cols, 1)


def _harmonic_map(kernel_size: int, max_frequency: int, angle: float) -> torch.Tensor:
    """``[k*k, n]``: column ``j`` is orthonormal basis function ``j`` rotated by ``angle`` (sampled at the taps).

    ``f(R^-1 p)`` for ``f = a cos(m phi) + b sin(m phi)`` is ``f`` with ``(a, b)`` rotated by ``m * angle``; so the
    rotated basis is the sampled basis ``B`` times the block-diagonal steering matrix ``S``, and with the
    orthonormalising ``T = (B^T B)^-1/2`` the map is ``B S T``."""
    b = _harmonic_samples(kernel_size, max_frequency)
    evals, evecs = torch.linalg.eigh(b.T @ b)
    t = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    freqs = harmonic_frequencies(kernel_size, max_frequency)
    steer = torch.eye(len(freqs), dtype=torch.float64)
    if angle:
        j = 0
        while j < len(freqs):
            m = freqs[j][1]
            if m:  # the (cos, sin) pair j, j + 1: new coefficients = R(m angle) (a, b)
                c, s = math.cos(m * angle), math.sin(m * angle)
                steer[j:j + 2, j:j + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
                j += 2
            else:
                j += 1
    return b @ steer @ t


def _bilinear_map(kernel_size: int, angle: float) -> torch.Tensor:
    """``[k*k, k*k]``: row ``p`` holds the bilinear weights of the taps around ``R(angle)^-1 p`` (zeros outside)."""
    n = kernel_size * kernel_size
    if not angle:
        return torch.eye(n, dtype=torch.float64)
    u, v = _offsets(kernel_size)
    c, s = math.cos(angle), math.sin(angle)
    src_u, src_v = c * u + s * v, -s * u + c * v
    out = torch.zeros(n, n, dtype=torch.float64)
    half = (kernel_size - 1) / 2
    for du in (0, 1):
        for dv in (0, 1):
            iu, iv = torch.floor(src_u) + du, torch.floor(src_v) + dv
            w = (1 - (src_u - iu).abs()) * (1 - (src_v - iv).abs())
            ok = (iu.abs() <= half) & (iv.abs() <= half) & (w > 0)
            col = ((iu + half) * kernel_size + (iv + half)).long()
            rows = torch.arange(n)[ok]
            out.index_put_((rows, col[ok]), w[ok], accumulate=True)
    return out


def _base_map(kernel_size: int, filter_basis: str, max_frequency: Optional[int], angle: float) -> torch.Tensor:
    if filter_basis == 'harmonic':
        return _harmonic_map(kernel_size, max_frequency, angle)
    if filter_basis == 'bilinear':
        return _bilinear_map(kernel_size, angle)
    if angle:
        raise ValueError(f"the 'pixel' basis cannot rotate by {math.degrees(angle):g} degrees")
    return torch.eye(kernel_size * kernel_size, dtype=torch.float64)


@lru_cache(maxsize=None)
def _rotation_maps(group: str, kernel_size: int, filter_basis: str, max_frequency: Optional[int]) -> torch.Tensor:
    with torch.device('cpu'):  # cached: never build it on a default device such as 'meta' (timm's test builds)
        return _build_rotation_maps(group, kernel_size, filter_basis, max_frequency)


def _build_rotation_maps(group: str, kernel_size: int, filter_basis: str, max_frequency: Optional[int]) -> torch.Tensor:
    g = get_group(group)
    n = g.rotations
    rest = {}  # one map per angle under 90 degrees; whole quarter turns and mirrors are exact index operations
    maps = []
    for h in range(g.order):
        m, r = g.decompose(h)
        q = (4 * r) // n
        key = (4 * r) % n  # the angle left, in units of 2 pi / (4 n)
        if key not in rest:
            rest[key] = _base_map(kernel_size, filter_basis, max_frequency, 2 * math.pi * key / (4 * n))
        a = rest[key].view(kernel_size, kernel_size, -1)
        a = torch.rot90(a, q, dims=(0, 1))
        if m:
            a = torch.flip(a, dims=(0,))
        maps.append(a.reshape(kernel_size * kernel_size, -1))
    return torch.stack(maps)


def rotation_maps(group, kernel_size: int, filter_basis: Optional[str] = None,
                  max_frequency: Optional[int] = None) -> torch.Tensor:
    """``[|G|, k*k, n_basis]`` float64: ``maps[g] @ w`` is the ``k x k`` filter ``g . psi`` (flattened) of the base
    weights ``w`` (``n_basis`` of them) in ``filter_basis``; ``maps[0]`` is the filter at the identity.

    Exactness: ``maps[g]`` for a quarter turn or a mirror of ``g'`` is the exact ``rot90`` / flip of ``maps[g']``.
    """
    g = get_group(group)
    basis, mf = resolve_filter_basis(filter_basis, g, max_frequency, 'rotation_maps')
    return _rotation_maps(g.name, int(kernel_size), basis, mf).clone()


DENSE_LIMIT = 1 << 20  # entries of the one-matmul group-to-group map (4 MiB in float32); above it: matmul + gather


def expansion_map(in_group, out_group, kernel_size: int, filter_basis: Optional[str] = None,
                  max_frequency: Optional[int] = None, dense: Optional[bool] = None,
                  maps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The fixed map of a group convolution ``in_group -> out_group`` in a resampling basis: ``(fmap, idx)``.

    The bank's filter for output element ``h`` on input element ``k`` is the base filter of input element
    ``h^-1 k`` rotated by ``h`` (``(h . psi)(p, k) = psi(h^-1 p, h^-1 k)``). Two layouts compute it:

    * one matmul (``idx`` is ``None``): ``fmap`` ``[|G_in| * n_basis, |G_out| * |G_in| * k * k]`` float64, and
      ``w.reshape(C_out * C_in, -1) @ fmap`` is the bank in ``(C_out, C_in, h, k, pixel)`` order (the rotation and
      the permutation of the input group axis in one map). Always for a lifting layer (``|G_in| = 1``: then it is
      just the rotation maps), and by default when the map has at most :data:`DENSE_LIMIT` entries (C8, D8, C16
      3x3; C8, C12 5x5): the fewest operations;
    * matmul + gather (``dense=False``, or larger maps): ``fmap`` ``[n_basis, |G_out| * k * k]`` rotates every base
      filter to every output element, ``[C_out * C_in * |G_in|, |G_out| * k * k]``, and ``idx``
      ``[|G_out| * |G_in| * k * k]`` (one ``index_select``) reads entry ``(h^-1 k, h, pixel)`` for ``(h, k,
      pixel)``: ``|G_in|`` times fewer multiply-adds and a map ``|G_in|^2`` times smaller. What
      :class:`~.gconv.GroupConv2d` uses for every group-to-group layer (issue 18): its eager expansion does the
      gather and the bank's layout in one ``index_select``, so the gather costs nothing extra, and a 16 -> 16 field
      D8 layer's expansion (forward and backward) takes half the time of the one-matmul map.

    Either way ``w.reshape(-1, fmap.shape[0]) @ fmap`` (then ``index_select(1, idx)`` on the ``[C_out * C_in, -1]``
    view when ``idx`` is given) is the bank. ``maps`` ``[|G_out|, k * k, n_basis]`` replaces
    :func:`rotation_maps` (to try another way of rotating filters: ``conv.filter_map, conv.filter_idx =
    expansion_map(..., maps=mine)``).
    """
    gi, go = get_group(in_group), get_group(out_group)
    if gi.order > 1 and gi.name != go.name:
        raise ValueError(f"expansion_map: a group convolution maps {gi.name}->{go.name}: expected 'z2' (lifting) or "
                         f"the same group in and out")
    kk = kernel_size * kernel_size
    if maps is None:
        maps = rotation_maps(go, kernel_size, filter_basis, max_frequency)  # [Go, k*k, nb]
    elif maps.dim() != 3 or maps.shape[:2] != (go.order, kk):
        raise ValueError(f"expansion_map: maps must be [|G|={go.order}, k*k={kk}, n_basis], got {tuple(maps.shape)}")
    maps = maps.to(torch.float64)
    nb = maps.shape[2]
    fmap = maps.permute(2, 0, 1).reshape(nb, go.order * kk)
    if gi.order == 1:
        return fmap, None
    n = go.order
    src = torch.tensor([go.permutation(h) for h in range(n)], dtype=torch.long, device='cpu')  # [h, k] = h^-1 k
    if dense is None:
        dense = n * nb * n * n * kk <= DENSE_LIMIT
    if dense:
        out = torch.zeros(n, nb, n, n, kk, dtype=torch.float64, device='cpu')  # [src, b, h, k, pixel]
        rot = maps.permute(0, 2, 1)  # [h, b, pixel]
        for h in range(n):
            out[src[h], :, h, torch.arange(n)] = rot[h].unsqueeze(0).expand(n, nb, kk)
        return out.reshape(n * nb, n * n * kk), None
    pix = torch.arange(kk, device='cpu')
    h = torch.arange(n, device='cpu')
    idx = src[:, :, None] * (n * kk) + h[:, None, None] * kk + pix[None, None, :]  # [h, k, pixel]
    return fmap, idx.reshape(-1)


def count_parameters(in_channels: int, out_channels: int, kernel_size: int = 3, in_group='z2', out_group='p4',
                     filter_basis: Optional[str] = None, max_frequency: Optional[int] = None,
                     bias: bool = True) -> int:
    """Number of trainable parameters of ``GroupConv2d(in_channels, out_channels, kernel_size, in_group,
    out_group, filter_basis=..., max_frequency=..., bias=...)`` without building it:
    ``C_out * C_in * |G_in| * n_basis (+ C_out)``.

    Example:
        >>> count_parameters(16, 16, 3, 'c8', 'c8')  # harmonic: 6 weights per 3x3 filter
        12304
        >>> count_parameters(16, 16, 3, 'p4', 'p4')  # pixel
        9232
    """
    gi, go = get_group(in_group), get_group(out_group)
    basis, mf = resolve_filter_basis(filter_basis, go, max_frequency, 'count_parameters')
    return out_channels * in_channels * gi.order * basis_size(kernel_size, basis, mf) + (out_channels if bias else 0)
