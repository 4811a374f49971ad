"""The discrete groups of the G-CNN layers: ``z2`` (trivial), ``p4`` and ``p4m``, and the cyclic and dihedral groups
``cN`` / ``dN`` of any order.

Only the *point* part of the group (the stabiliser of the origin) is stored here; translations are handled by
the convolution itself. The point groups are

* ``z2``  : the trivial group ``{e}`` (order 1); a "group convolution" over it is a plain convolution,
* ``p4``  : the cyclic group C4 of rotations by multiples of 90 degrees (order 4),
* ``p4m`` : the dihedral group D4 of rotations and mirror reflections (order 8).

The element order and the action are GrouPy's (``groupy/garray/D4_array.py``, ``p4m_array.py``), so that GrouPy
weights give GrouPy's outputs and index ``h`` of a group axis means GrouPy's element ``h``. With ``(u, v)`` the
(row, column) offset of a pixel from the centre,

* ``R`` is the quarter turn with matrix ``[[0, -1], [1, 0]]``; on an image tensor ``[..., H, W]`` it is
  ``torch.rot90(x, 1, dims=(-2, -1))`` (counter-clockwise as displayed with row 0 at the top),
* ``M`` is the mirror with matrix ``[[-1, 0], [0, 1]]`` (``u -> -u``, "mirror reflection in the second
  translation axis" in GrouPy's words); on an image it is ``torch.flip(x, dims=(-2,))`` (an up-down flip),

and element ``i`` of p4m is ``(m, r) = divmod(i, 4)`` standing for ``g = M^m R^r`` (GrouPy's ``int2mat``: first
``r`` quarter turns, then the mirror if ``m == 1``). For p4, ``i = r``. (Releases before 0.1.0 used ``R^r M'^m``
with a left-right mirror ``M'``: elements 4 and 6 were swapped; :func:`p4m_legacy_permutation` converts.)

**C_N and D_N** (``'c8'``, ``'d8'``, ``'c12'``, ``'d16'``, ... any ``N >= 1``, parsed by :func:`get_group`): ``R`` is
the rotation by ``2 pi / N`` with matrix ``[[cos, -sin], [sin, cos]]`` on ``(row, col)`` offsets (at ``N = 4`` the
quarter turn above), ``M`` the same up-down mirror, and element ``h = m * N + r`` stands for ``M^m R^r``: p4m's
convention with ``N`` in place of 4. ``'c4'`` and ``'d4'`` *are* ``'p4'`` and ``'p4m'`` (the same objects: GrouPy's
names stay the canonical ones), ``'c1'`` is ``'z2'``. A rotation by a multiple of 90 degrees maps the pixel grid to
itself and acts exactly (``rot90``); any other rotation is resampled with ``grid_sample`` about the image centre
(:func:`rotate_plane`), so it is exact only for the continuous image the pixels sample, and approximate on pixels.
:meth:`Group.is_grid_element` tells which elements act exactly; :attr:`Group.exact` whether all do (``N`` in
``{1, 2, 4}``).

A feature map on the group, ``f: Z^2 x G -> R``, stored as ``[..., |G|, H, W]`` (the GrouPy layout), transforms as

.. math:: (g \\cdot f)(x, h) = f(g^{-1} x, g^{-1} h),

i.e. the spatial axes are transformed by ``g`` and the group axis is permuted, ``out[..., h, :, :] =
spatially_transformed[..., g^{-1} h, :, :]``. A filter bank on the group transforms in exactly the same way, which
is what the group convolutions use to build their filter banks (Cohen & Welling, "Group Equivariant
Convolutional Networks", ICML 2016, eq. 10).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Tuple

import math
import re

import torch
import torch.nn.functional as F

__all__ = ['Group', 'get_group', 'GROUPS', 'transform_plane', 'transform_group_map', 'filter_indices',
           'p4m_legacy_permutation', 'rotate_plane']


@dataclass(frozen=True)
class Group:
    """A finite point group acting on the plane by rotations (by multiples of ``2 pi / N``) and mirrors.

    Attributes:
        name: ``'z2'``, ``'p4'``, ``'p4m'``, or ``'cN'`` / ``'dN'``.
        order: number of elements ``|G|`` (``N`` for C_N, ``2N`` for D_N).
        mirror: whether the group contains reflections.
    """

    name: str
    order: int
    mirror: bool
    _table: Tuple[Tuple[int, ...], ...] = field(default=(), repr=False, compare=False)

    # ----- elements ---------------------------------------------------------------------------------------
    @property
    def rotations(self) -> int:
        """``N``: the number of rotations (4 for p4 and p4m, 1 for z2)."""
        return self.order // 2 if self.mirror else self.order

    @property
    def exact(self) -> bool:
        """Whether every element maps the pixel grid to itself (``N`` divides 4): then the action is exact."""
        return 4 % self.rotations == 0

    def decompose(self, g: int) -> Tuple[int, int]:
        """Return ``(m, r)`` with ``g = M^m R^r`` (GrouPy's int parameterization; ``g = m * N + r``)."""
        self._check(g)
        return divmod(g, self.rotations) if self.order > 1 else (0, 0)

    def element(self, m: int, r: int) -> int:
        """Index of ``M^m R^r``."""
        if m and not self.mirror:
            raise ValueError(f"group {self.name!r} has no mirror elements (asked for m={m})")
        if self.order == 1:
            return 0
        n = self.rotations
        return (m % 2) * n + (r % n)

    def angle(self, g: int) -> float:
        """The rotation angle of ``g = M^m R^r`` in radians: ``2 pi r / N``."""
        return 2 * math.pi * self.decompose(g)[1] / self.rotations

    def is_grid_element(self, g: int) -> bool:
        """Whether ``g`` maps the pixel grid to itself (its rotation is a multiple of 90 degrees): its action on
        planes is then an exact index permutation; otherwise it is resampled (see :func:`rotate_plane`)."""
        return (4 * self.decompose(g)[1]) % self.rotations == 0

    def grid_elements(self) -> List[int]:
        """The elements that act exactly on the pixel grid (all of them for z2, p4, p4m; the quarter turns and
        their mirrors for ``cN`` / ``dN`` with ``4 | N``; ``{e, R^(N/2)}`` and mirrors for even ``N``...)."""
        return [g for g in range(self.order) if self.is_grid_element(g)]

    def mul(self, a: int, b: int) -> int:
        """Index of the product ``a * b`` (apply ``b`` first, then ``a``)."""
        return self._table[a][b]

    def inv(self, a: int) -> int:
        """Index of ``a^{-1}``."""
        row = self._table[a]
        return row.index(0)

    def elements(self) -> List[int]:
        return list(range(self.order))

    def _check(self, g: int) -> None:
        if not 0 <= g < self.order:
            raise ValueError(f"group {self.name!r} has elements 0..{self.order - 1}, got {g}")

    # ----- action on the plane ------------------------------------------------------------------------------
    def transform_plane(self, x: torch.Tensor, g: int, mode: str = 'bilinear') -> torch.Tensor:
        """Apply ``g = M^m R^r`` to the last two (spatial) axes of ``x`` (any rank >= 2): the rotation by
        ``2 pi r / N``, then, if ``m``, the up-down mirror (``flip`` of the row axis).

        For p4 / p4m (and every grid element of ``cN`` / ``dN``) the rotation is ``r`` quarter turns (``rot90``),
        exact. Otherwise the largest multiple of 90 degrees is done by ``rot90`` and the rest (under 90 degrees) is
        resampled about the image centre with ``grid_sample`` in ``mode`` (``'bilinear'``, ``'bicubic'`` or
        ``'nearest'``), zeros outside: see :func:`rotate_plane`.
        """
        m, r = self.decompose(g)
        if r:
            n = self.rotations
            q = (4 * r) // n  # whole quarter turns; the rest is under 90 degrees (0 for a grid element)
            rest = 2 * math.pi * r / n - q * math.pi / 2 if (4 * r) % n else 0.0
            if rest:
                x = rotate_plane(x, rest, mode)
            if q:
                x = torch.rot90(x, q, dims=(-2, -1))
        if m:
            x = torch.flip(x, dims=(-2,))
        return x

    def transform_group_map(self, x: torch.Tensor, g: int, mode: str = 'bilinear') -> torch.Tensor:
        """Apply ``g`` to a function on the group stored as ``[..., |G|, H, W]``.

        The spatial axes are transformed by ``g`` (:meth:`transform_plane`, ``mode`` for resampled rotations) and
        the group axis is permuted: ``out[..., h] = y[..., g^-1 h]``.
        """
        if x.dim() < 3 or x.shape[-3] != self.order:
            raise ValueError(
                f"expected a tensor [..., |G|={self.order}, H, W] for group {self.name!r}, got shape {tuple(x.shape)}")
        y = self.transform_plane(x, g, mode)
        return y[..., self.permutation(g), :, :]

    def permutation(self, g: int) -> List[int]:
        """``perm`` with ``(g . f)[..., h] = f[..., perm[h]]`` on a group axis: ``perm[h] = g^-1 h``."""
        gi = self.inv(g)
        return [self.mul(gi, h) for h in range(self.order)]


def _matmul(a, b):
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(2)) for j in range(2)) for i in range(2))


def _mat(m: int, r: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """2x2 integer matrix of ``M^m R^r`` acting on (row, col) offsets; used only to build the Cayley table."""
    R = ((0, -1), (1, 0))
    M = ((-1, 0), (0, 1))
    out = ((1, 0), (0, 1))
    for _ in range(r):
        out = _matmul(R, out)
    return _matmul(M, out) if m else out


def rotate_plane(x: torch.Tensor, angle: float, mode: str = 'bilinear') -> torch.Tensor:
    """Rotate the last two axes of ``x`` (any rank >= 2) by ``angle`` radians about the image centre, resampled.

    ``out(p) = x(R^-1 p)`` with ``R = [[cos, -sin], [sin, cos]]`` acting on ``(row, col)`` offsets from the centre
    ``((H - 1) / 2, (W - 1) / 2)`` in pixel units (so ``angle = pi / 2`` is ``torch.rot90(x, 1, dims=(-2, -1))`` on a
    square image, up to rounding). Values are read with ``F.grid_sample`` (``mode`` ``'bilinear'``, ``'bicubic'``
    or ``'nearest'``, ``align_corners=False`` with the pixel-centre coordinates computed here, zeros outside). The
    shape is kept; content rotated beyond the borders is lost, so compare rotated maps inside the inscribed disc.
    """
    if mode not in ('bilinear', 'bicubic', 'nearest'):
        raise ValueError(f"rotate_plane: mode must be 'bilinear', 'bicubic' or 'nearest', got {mode!r}")
    if x.dim() < 2:
        raise ValueError(f"rotate_plane: expected a tensor [..., H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    rows = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    cols = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    u, v = torch.meshgrid(rows, cols, indexing='ij')
    c, s = math.cos(angle), math.sin(angle)
    su, sv = c * u + s * v + (h - 1) / 2, -s * u + c * v + (w - 1) / 2  # R^-1 p, back in pixel indices
    grid = torch.stack([(2 * sv + 1) / w - 1, (2 * su + 1) / h - 1], -1).to(device=x.device, dtype=dtype)
    flat = x.reshape(-1, 1, h, w).to(dtype)
    out = F.grid_sample(flat, grid.expand(flat.shape[0], h, w, 2), mode=mode, padding_mode='zeros',
                        align_corners=False)
    return out.reshape(x.shape).to(x.dtype)


def _build(name: str, order: int, mirror: bool) -> Group:
    if order == 1:
        return Group(name, 1, False, ((0,),))
    mats = [_mat(*divmod(i, 4)) for i in range(order)]
    index = {m: i for i, m in enumerate(mats)}
    table = tuple(tuple(index[_matmul(mats[a], mats[b])] for b in range(order)) for a in range(order))
    return Group(name, order, mirror, table)


GROUPS = {
    'z2': _build('z2', 1, False),
    'p4': _build('p4', 4, False),
    'p4m': _build('p4m', 8, True),
}


def _build_cn_dn(name: str, n: int, mirror: bool) -> Group:
    """C_N / D_N with element ``h = m * N + r`` for ``M^m R^r``. The Cayley table follows from ``R M = M R^-1``
    (a reflection conjugates a rotation to its inverse): ``(M^a R^b)(M^c R^d) = M^(a+c) R^((-1)^c b + d)``, the
    rule the 2x2 matrices of p4m obey as well (``tests/layers/test_cn_groups.py`` checks both against each other)."""
    order = 2 * n if mirror else n

    def mul(a: int, b: int) -> int:
        (ma, ra), (mb, rb) = divmod(a, n), divmod(b, n)
        return ((ma + mb) % 2) * n + ((-ra if mb else ra) + rb) % n
    table = tuple(tuple(mul(a, b) for b in range(order)) for a in range(order))
    return Group(name, order, mirror, table)


_CN_DN = {}
_CN_DN_NAME = re.compile(r'^([cd])(\d+)$')


def get_group(group) -> Group:
    """Return the :class:`Group` named ``group``, or ``group`` itself.

    Names: ``'z2'``, ``'p4'``, ``'p4m'`` (GrouPy's), and ``'cN'`` / ``'dN'`` for any ``N >= 1`` (``'c8'``, ``'d16'``).
    ``'c4'`` and ``'d4'`` return the ``'p4'`` and ``'p4m'`` groups themselves, ``'c1'`` returns ``'z2'``.
    """
    if isinstance(group, Group):
        return group
    key = str(group).lower()
    if key in GROUPS:
        return GROUPS[key]
    m = _CN_DN_NAME.match(key)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(f"unknown group {group!r}; expected one of {sorted(GROUPS)} or 'cN' / 'dN' with N >= 1 "
                         f"(rotations by 2*pi/N, and mirrors for 'dN'), e.g. 'c8' or 'd16'")
    kind, n = m.group(1), int(m.group(2))
    if n == 4:
        return GROUPS['p4m' if kind == 'd' else 'p4']
    if n == 1 and kind == 'c':
        return GROUPS['z2']
    name = f"{kind}{n}"
    if name not in _CN_DN:
        _CN_DN[name] = _build_cn_dn(name, n, kind == 'd')
    return _CN_DN[name]


def transform_plane(x: torch.Tensor, g: int, group='p4m', mode: str = 'bilinear') -> torch.Tensor:
    """Functional form of :meth:`Group.transform_plane`."""
    return get_group(group).transform_plane(x, g, mode)


def transform_group_map(x: torch.Tensor, g: int, group='p4', mode: str = 'bilinear') -> torch.Tensor:
    """Functional form of :meth:`Group.transform_group_map`."""
    return get_group(group).transform_group_map(x, g, mode)


def p4m_legacy_permutation() -> List[int]:
    """``perm`` with ``new[..., perm[i], ...] == old[..., i, ...]`` for a p4m group axis written before 0.1.0.

    Those releases labelled element ``(m, r)`` as ``R^r M'^m`` with a left-right mirror ``M' = R^2 M``; as GrouPy
    labels them, ``R^r M' = M R^{-r-2}``, so old index ``4 + r`` is new index ``4 + (-r - 2) % 4`` (4 and 6 swap,
    5 and 7 stay). The permutation is its own inverse. Relabelling every p4m group axis of a network's weights
    (the ``|G_in|`` axis of ``[C_out, C_in, 8, k, k]``) gives the same network in GrouPy's labels.
    """
    return [r for r in range(4)] + [4 + (-r - 2) % 4 for r in range(4)]


@lru_cache(maxsize=None)
def _filter_indices(in_group: str, out_group: str, kernel_size: int) -> torch.Tensor:
    gi, go = get_group(in_group), get_group(out_group)
    base = torch.arange(gi.order * kernel_size * kernel_size, device='cpu').view(gi.order, kernel_size, kernel_size)
    rows = []
    for h in range(go.order):
        if gi.order == 1:
            t = go.transform_plane(base, h)
        else:
            if gi.name != go.name:
                raise ValueError(f"a group convolution maps {in_group}->{out_group}: expected the same group")
            t = go.transform_group_map(base, h)
        rows.append(t.reshape(-1))
    return torch.stack(rows)


def filter_indices(in_group, out_group, kernel_size: int) -> torch.Tensor:
    """Index table ``[|G_out|, |G_in| * k * k]`` that expands a base filter into its transformed copies.

    Row ``h`` lists, for every entry of the transformed filter ``h . psi`` (flattened ``[|G_in|, k, k]``), the
    flat position in the base filter ``psi`` it is read from. ``in_group`` is ``'z2'`` for a lifting layer.

    Only for groups whose every element maps the pixel grid to itself (:attr:`Group.exact`: z2, p4, p4m, c2, d1,
    d2); the others need an interpolating linear map instead (:func:`~gequiv_timm.layers.filter_basis.expansion_map`).
    """
    go = get_group(out_group)
    if not go.exact:
        raise ValueError(f"filter_indices: group {go.name!r} rotates by {360 / go.rotations:g} degrees, which does not "
                         f"map the pixel grid to itself, so its filters cannot be gathered by index; use "
                         f"gequiv_timm.layers.filter_basis.expansion_map (filter_basis='harmonic' or 'bilinear')")
    return _filter_indices(get_group(in_group).name, get_group(out_group).name, int(kernel_size)).clone()
