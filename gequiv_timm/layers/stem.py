"""Equivariant stems in plain PyTorch: a lifting group convolution with a fused average pool (:class:`PooledLift`)
and the stem built on it (:class:`EquivariantStem`: lift, group conv(s), then pooling over the group or a learned
equivariant fold), with the channels and stride of a CNN's stem.

Putting one into a timm backbone (finding the stem, replacing it, loading the backbone's checkpoint) is
:mod:`gequiv_timm.models.stems`' job; nothing here knows timm.

Cohen & Welling, "Group Equivariant Convolutional Networks", ICML 2016 (lifting and group convolutions).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import EquivarianceError, check_equivariance
from .fields import RandomField, centre
from .filter_basis import rotation_maps
from .gconv import GroupBatchNorm, GroupConv2d, GroupPool, _check_float, fold_group, unfold_group
from .groups import get_group

__all__ = ['PooledLift', 'EquivariantStem']


class PooledLift(GroupConv2d):
    """Lifting conv (``k x k``, 'same' padding, stride 1) followed by an ``s x s`` average pool, computed as one
    strided convolution.

    ``avgpool_s(conv_k(x, w))`` equals ``conv(x, w_s, stride=s, padding=k//2)`` with ``w_s = w * box_s`` (the filter
    smeared over ``s x s`` positions, size ``k + s - 1``): the same numbers as the pooled stride-1 conv, at the cost
    of a strided conv and without the full-resolution feature map. Equivariance is exact when ``H, W`` are
    multiples of ``s`` (the pooling windows tile the image symmetrically). Weight and output layout are those of
    :class:`GroupConv2d` (``[C_out, C_in, 1, k, k]``; ``[B, C_out, |G|, H/s, W/s]``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, group: str, pool: int):
        super().__init__(in_channels, out_channels, kernel_size, 'z2', group, padding=kernel_size // 2, bias=False)
        self.pool = pool

    def extra_repr(self) -> str:
        return super().extra_repr() + f', then avg pool {self.pool}x{self.pool} (fused)'

    def pooled_weight(self) -> torch.Tensor:
        """The fused filter bank ``[C_out*|G|, C_in, k+s-1, k+s-1]`` (cached in eval mode like the lift's own)."""
        return self._smear(self.expanded_weight())

    def _smear(self, w: torch.Tensor) -> torch.Tensor:
        s = self.pool
        if s == 1:
            return w
        k = w.shape[-1]
        out = w.new_zeros(w.shape[0], w.shape[1], k + s - 1, k + s - 1)
        for a in range(s):
            for b in range(s):
                out[:, :, a:a + k, b:b + k] += w
        return out / (s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # no Python input checks, no eval cache
            w = self._smear(self._expand(self.weight))
        else:
            _check_float(x, 'PooledLift')  # the kind first (TypeError), then the shape (ValueError)
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"PooledLift: expected a planar input [B, {self.in_channels}, H, W], got "
                                 f"{tuple(x.shape)}")
            w = self.pooled_weight()
        y = F.conv2d(x, w, None, self.pool, self.padding)
        return y.unflatten(1, (self.out_channels, self.out_order))


class EquivariantStem(nn.Module):
    """Lifting group conv + group conv(s), then pooling over the group (invariant) or an equivariant fold.

    ``[B, C_in, H, W] -> lift (k x k, 'same') + avg pool (stride), fused (:class:`PooledLift`) -> GBN -> ReLU ->
    [G-conv 3x3 -> GBN -> ReLU] x depth -> head``, with head

    * ``'invariant'``: max (or mean) over the group -> 1x1 conv -> BN -> ReLU: ``[B, out_chs, H/s, W/s]`` with
      ``f(g x) = g f(x)`` (spatial transform only);
    * ``'equivariant'``: 1x1 group conv to ``out_chs / |G|`` fields -> GBN -> ReLU -> fold:
      ``[B, out_chs, H/s, W/s]`` with ``f(g x) = fold(g . unfold(f(x)))``.

    With ``proj=False`` the head is only the pooling (invariant) or the fold (equivariant): no 1x1 convolution, BN
    or ReLU after the group layers, whose ``width`` must then give ``out_chs`` channels by itself (``width = out_chs``
    invariant, ``width * |G| = out_chs`` equivariant). ``mode='equivariant', depth=0, proj=False`` is the cheapest
    stem: ``fold(ReLU(GBN(lift(x))))``, one strided conv with ``out_chs`` output channels, one batch norm and one
    ReLU, the operations of a plain ``conv -> BN -> ReLU`` stem with the same number of output channels (the
    filter is ``k + s - 1`` wide: 8x8 in place of ResNet's 7x7; ``benchmarks/bench_stem.py`` measures the whole
    model against the plain backbone). Each of its ``out_chs / |G|`` learned filters is applied at every rotation (and
    mirror): fewer free filters than the plain stem's ``out_chs``, exact equivariance in exchange.

    The spatial reduction is a ``stride x stride`` average pool of the lifting conv rather than a plain strided conv:
    a stride-2 conv on an even-sized image samples a grid that a rotation about the centre does not map onto itself,
    whereas the pooling windows tile the image symmetrically, so equivariance is exact whenever ``H`` and ``W`` are
    multiples of ``stride``. Pool and conv are fused into one strided conv with a ``(k + s - 1)`` filter, so the
    lift costs about what the original strided stem conv did.

    Args:
        in_chs, out_chs, stride: planar channels in/out and the spatial reduction (1, 2 or 4).
        group: ``'p4'``, ``'p4m'``, or ``'cN'`` / ``'dN'`` (``'c8'``, ``'d8'``, ...: the group convolutions'
            harmonic filter basis; exact for the quarter turns and mirrors when 4 divides N, approximate at the
            other rotations: :meth:`check_equivariance`).
        mode: ``'invariant'`` or ``'equivariant'`` (needs ``out_chs % |G| == 0``).
        width: fields of the group layers (default ``out_chs // |G|``: as many channels as the original stem;
            ``out_chs`` when ``mode='invariant', proj=False``).
        kernel_size: odd size of the lifting filters. depth: number of group convs after the lift.
        group_pool: ``'max'`` or ``'mean'`` (invariant mode).
        proj: whether the head has its 1x1 (group) conv -> BN -> ReLU (see above).

    Example:
        >>> stem = EquivariantStem(3, 64, 2, group='p4')
        >>> stem(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 64, 16, 16])
        >>> fast = EquivariantStem(3, 64, 2, group='p4', mode='equivariant', depth=0, proj=False)
        >>> fast(torch.randn(1, 3, 32, 32)).shape, fast.width
        (torch.Size([1, 64, 16, 16]), 16)
    """

    first_conv = 'lift'

    def __init__(self, in_chs: int = 3, out_chs: int = 64, stride: int = 2, group: str = 'p4',
                 mode: str = 'invariant', width: Optional[int] = None, kernel_size: int = 7, depth: int = 1,
                 group_pool: str = 'max', proj: bool = True, device=None, dtype=None):
        super().__init__()
        g = get_group(group)
        if g.order == 1:
            raise ValueError(f"EquivariantStem: group must be 'p4', 'p4m' or 'cN' / 'dN' with |G| > 1 (e.g. 'c8'), got "
                             f"{g.name!r} (that is the plain stem)")
        if mode not in ('invariant', 'equivariant'):
            raise ValueError(f"EquivariantStem: mode must be 'invariant' or 'equivariant', got {mode!r}")
        if mode == 'equivariant' and out_chs % g.order:
            raise ValueError(f"EquivariantStem: mode='equivariant' folds |G|={g.order} copies of each field into the "
                             f"output channels, so out_chs must be a multiple of {g.order}; got {out_chs}. Use "
                             f"mode='invariant' or group='p4'.")
        if stride not in (1, 2, 4):
            raise ValueError(f"EquivariantStem: stride must be 1, 2 or 4, got {stride!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"EquivariantStem: kernel_size must be odd (a rotated even filter is off by half a "
                             f"pixel), got {kernel_size}; use {kernel_size + 1}")
        if kernel_size < 1:
            raise ValueError(f"EquivariantStem: kernel_size must be an odd int >= 1, got {kernel_size}")
        if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
            raise ValueError(f"EquivariantStem: width must be an int >= 1 or None (out_chs // |G|), got {width!r}")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"EquivariantStem: depth must be an int >= 0 (group convs after the lift), got {depth!r}")
        if not isinstance(proj, bool):
            raise ValueError(f"EquivariantStem: proj must be True or False, got {proj!r}")
        if not proj:  # the group layers' channels are the output: their width is fixed by out_chs
            need = out_chs if mode == 'invariant' else out_chs // g.order
            if width is not None and width != need:
                raise ValueError(f"EquivariantStem: with proj=False the {mode} stem's output is its group layers' "
                                 f"{'pooled fields' if mode == 'invariant' else 'fields x |G|'}, so width must be "
                                 f"{need} for out_chs={out_chs}; got width={width}. Leave width=None or use "
                                 f"proj=True.")
            width = need
        self.group = g
        self.group_name = g.name
        self.mode = mode
        self.layout = 'invariant' if mode == 'invariant' else 'folded'
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        # nn.Conv2d's names too: modules that wrapped the replaced conv read them (timm's ConvNormAct properties)
        self.in_channels, self.out_channels = in_chs, out_chs
        self.proj_head = proj
        self.width = width = int(width) if width is not None else max(1, out_chs // g.order)
        self.lift = PooledLift(in_chs, width, kernel_size, g.name, stride)
        self.bn1 = GroupBatchNorm(width, g)
        self.act1 = nn.ReLU(inplace=True)
        convs = []
        for _ in range(depth):
            convs += [GroupConv2d(width, width, 3, g.name, g.name, padding=1, bias=False), GroupBatchNorm(width, g),
                      nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        self.gpool = GroupPool(g, group_pool) if mode == 'invariant' else nn.Identity()
        if not proj:  # forward keeps one code path (TorchScript, FX): the missing head layers are identities
            self.proj, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()
        elif mode == 'invariant':
            self.proj = nn.Conv2d(width, out_chs, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_chs)
            self.act2 = nn.ReLU(inplace=True)
        else:
            self.proj = GroupConv2d(width, out_chs // g.order, 1, g.name, g.name, bias=False)
            self.bn2 = GroupBatchNorm(out_chs // g.order, g)
            self.act2 = nn.ReLU(inplace=True)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward_group(self, x: torch.Tensor) -> torch.Tensor:
        """The group feature map ``[B, width, |G|, H/s, W/s]`` before the group pooling / fold."""
        return self.convs(self.act1(self.bn1(self.lift(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn2(self.proj(self.gpool(self.forward_group(x)))))
        if self.mode == 'equivariant':
            y = fold_group(y)
        return y

    def transform_output(self, y: torch.Tensor, g: int) -> torch.Tensor:
        """How the output moves when the input is transformed by group element ``g`` (see the class docstring)."""
        if self.mode == 'invariant':
            return self.group.transform_plane(y, g)
        return fold_group(self.group.transform_group_map(unfold_group(y, self.group.order), g))

    @torch.no_grad()
    def check_equivariance(self, x: Optional[torch.Tensor] = None, size: int = 32, atol: Optional[float] = None,
                           rtol: Optional[float] = None, elements: Optional[Sequence[int]] = None,
                           wavelength: float = 8.0) -> EquivarianceError:
        """``max_g |f(g x) - T_g f(x)|`` on a random (or given) input, in eval mode
        (:func:`~gequiv_timm.layers.checks.check_equivariance`: a float, the absolute error, with ``.relative``).

        ``elements`` defaults to those that map the pixel grid to itself: every element of p4 / p4m, the quarter
        turns and mirrors of ``cN`` / ``dN``; they are exact (float rounding). Asked for another rotation (45 degrees
        in C8), the stem is measured as the group layers are: on smooth inputs
        (:class:`~gequiv_timm.layers.fields.RandomField`, wavelengths >= ``wavelength`` pixels, turned exactly), at
        the output's centre pixel (the input side is ``stride`` times the first odd number at or above
        ``size / stride``); ``x`` is then ignored.
        """
        was = self.training
        self.eval()
        g = self.group
        els = list(g.grid_elements() if elements is None else elements)
        p = self.lift.weight
        try:
            if all(g.is_grid_element(e) for e in els):
                if x is None:
                    x = torch.randn(2, self.in_chs, size, size, device=p.device, dtype=p.dtype)
                return check_equivariance(self, x, g.transform_plane, self.transform_output, els, atol=atol,
                                          rtol=rtol, name='EquivariantStem')
            m = -(-size // self.stride)
            n = self.stride * (m + 1 - m % 2)
            field = RandomField((2, self.in_chs), (n, n), wavelength, seed=0, dtype=p.dtype, device=p.device)

            def act_out(y: torch.Tensor, e: int) -> torch.Tensor:  # at the centre pixel only the group axis moves
                if self.mode == 'invariant':
                    return y
                return fold_group(unfold_group(y[..., None, None], g.order)[..., g.permutation(e), :, :])[..., 0, 0]
            return check_equivariance(lambda t: centre(self(t)), field.sample(),
                                      lambda t, e: field.sample(g, e, group_axis=False), act_out, els, atol=atol,
                                      rtol=rtol, name='EquivariantStem')
        finally:
            self.train(was)

    @torch.no_grad()
    def init_from_conv(self, weight: torch.Tensor) -> None:
        """Warm-start the lifting filters from a planar stem conv weight ``[C, C_in, k0, k0]``.

        The ``width`` filters of largest L2 norm are copied into the lifting weight (one per field; the group
        convolution then applies every rotated / mirrored copy of each). An even ``k0`` is zero-padded at the end
        to the odd size, a larger ``k0`` is centre-cropped, a smaller one centre-padded. With the ``'harmonic'``
        basis (``cN`` / ``dN``) each filter is replaced by its least-squares fit in the basis (its band-limited
        part: the basis cannot hold the rest).
        """
        lw = self.lift.weight  # [width, C_in, 1, k, k], or [width, C_in, 1, n_basis] (harmonic)
        if weight.dim() != 4 or weight.shape[1] != lw.shape[1]:
            raise ValueError(f"EquivariantStem.init_from_conv: expected a conv weight [C, {lw.shape[1]}, k, k], got "
                             f"{tuple(weight.shape)}")
        k = self.lift.kernel_size
        w = weight.to(device=lw.device, dtype=lw.dtype)
        norms = w.flatten(1).norm(dim=1)
        idx = norms.argsort(descending=True)[:lw.shape[0]]
        w = w[idx]
        k0 = w.shape[-1]
        if k0 > k:
            o = (k0 - k) // 2
            w = w[..., o:o + k, o:o + k]
        elif k0 < k:
            lo = (k - k0) // 2
            hi = k - k0 - lo
            w = F.pad(w, (lo, hi, lo, hi))
        if self.lift.filter_basis == 'harmonic':  # [k*k, n_basis] at the identity; least squares per filter
            basis = rotation_maps(self.group, k, 'harmonic', self.lift.max_frequency)[0]
            flat = w.reshape(-1, k * k).to(torch.float64).cpu()
            w = torch.linalg.lstsq(basis, flat.T).solution.T.reshape(w.shape[0], w.shape[1], -1)
            w = w.to(device=lw.device, dtype=lw.dtype)
        out = lw.clone()
        out[:w.shape[0], :, 0] = w
        lw.copy_(out)
