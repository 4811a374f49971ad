"""The discrete groups of the G-CNN layers: ``z2`` (trivial), ``p4`` and ``p4m``.

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

import torch

__all__ = ['Group', 'get_group', 'GROUPS', 'transform_plane', 'transform_group_map', 'filter_indices',
           'p4m_legacy_permutation']


@dataclass(frozen=True)
class Group:
    """A finite point group acting on the pixel grid by quarter turns and mirrors.

    Attributes:
        name: ``'z2'``, ``'p4'`` or ``'p4m'``.
        order: number of elements ``|G|``.
        mirror: whether the group contains reflections.
    """

    name: str
    order: int
    mirror: bool
    _table: Tuple[Tuple[int, ...], ...] = field(default=(), repr=False, compare=False)

    # ----- elements ---------------------------------------------------------------------------------------
    def decompose(self, g: int) -> Tuple[int, int]:
        """Return ``(m, r)`` with ``g = M^m R^r`` (GrouPy's int parameterization)."""
        self._check(g)
        return divmod(g, 4) if self.order > 1 else (0, 0)

    def element(self, m: int, r: int) -> int:
        """Index of ``M^m R^r``."""
        if m and not self.mirror:
            raise ValueError(f"group {self.name!r} has no mirror elements (asked for m={m})")
        if self.order == 1:
            return 0
        return (m % 2) * 4 + (r % 4)

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
    def transform_plane(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Apply ``g = M^m R^r`` to the last two (spatial) axes of ``x`` (any rank >= 2): ``r`` quarter turns
        (``rot90``), then, if ``m``, the up-down mirror (``flip`` of the row axis)."""
        m, r = self.decompose(g)
        if r:
            x = torch.rot90(x, r, dims=(-2, -1))
        if m:
            x = torch.flip(x, dims=(-2,))
        return x

    def transform_group_map(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Apply ``g`` to a function on the group stored as ``[..., |G|, H, W]``.

        The spatial axes are transformed by ``g`` and the group axis is permuted: ``out[..., h] = y[..., g^-1 h]``.
        """
        if x.dim() < 3 or x.shape[-3] != self.order:
            raise ValueError(
                f"expected a tensor [..., |G|={self.order}, H, W] for group {self.name!r}, got shape {tuple(x.shape)}")
        y = self.transform_plane(x, g)
        gi = self.inv(g)
        perm = [self.mul(gi, h) for h in range(self.order)]
        return y[..., perm, :, :]


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


def get_group(group) -> Group:
    """Return the :class:`Group` named ``group`` (``'z2'``, ``'p4'``, ``'p4m'``), or ``group`` itself."""
    if isinstance(group, Group):
        return group
    try:
        return GROUPS[str(group).lower()]
    except KeyError:
        raise ValueError(f"unknown group {group!r}; expected one of {sorted(GROUPS)}") from None


def transform_plane(x: torch.Tensor, g: int, group='p4m') -> torch.Tensor:
    """Functional form of :meth:`Group.transform_plane`."""
    return get_group(group).transform_plane(x, g)


def transform_group_map(x: torch.Tensor, g: int, group='p4') -> torch.Tensor:
    """Functional form of :meth:`Group.transform_group_map`."""
    return get_group(group).transform_group_map(x, g)


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
    """
    return _filter_indices(get_group(in_group).name, get_group(out_group).name, int(kernel_size)).clone()
