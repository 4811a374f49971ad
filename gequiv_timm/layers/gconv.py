"""Group convolutions on p4 / p4m (Cohen & Welling, "Group Equivariant Convolutional Networks", ICML 2016), and on
the cyclic and dihedral groups C_N / D_N of any order (``'c8'``, ``'d8'``, ``'c12'``, ``'d16'``...).

Tensor layout (the GrouPy / pytorch-gconv layout): a feature map on the group is ``[B, C, |G|, H, W]``; a planar
input is ``[B, C, H, W]``. Weights are stored as ``[C_out, C_in, |G_in|, k, k]`` (``|G_in| = 1`` for a lifting
layer), so weights trained with GrouPy's ``P4ConvZ2``/``P4ConvP4``/``P4MConvZ2``/``P4MConvP4M`` have the same
shapes.

The correlation computed is (eq. 10 of the paper)

.. math:: [f \\star \\psi^i](g) = \\sum_{y \\in Z^2} \\sum_{k \\in G_{in}} \\sum_j f_j(y, k)\\, \\psi^i_j(g^{-1}(y, k)),

implemented as one ``F.conv2d`` with the filter bank ``[C_out * |G|, C_in * |G_in|, k, k]`` gathered from the
base weights through index buffers made once at construction (GrouPy's filter-index trick). In eager mode the
gather is a single ``index_select`` on the flattened weights with an index whose output is already the bank's
layout (for the ``'harmonic'`` / ``'bilinear'`` bases, after one small matmul), so autograd differentiates it with
one serial ``index_add``: no transposed copies, no small multi-threaded kernels (which stall when another process
holds a core). TorchScript and ``torch.compile`` run the reference construction, :meth:`GroupConv2d._expand`, which
gives the same bank bitwise.

The bank is expanded from the current weights on every training call, and on every call that wants gradients. In
eval mode without gradients, on the CPU, a bank is reused only while the weights hold bit for bit the values it was
made from: every call compares the weights with a copy kept beside the bank (:meth:`GroupConv2d._bank`), so no write
(through ``.data``, ``load_state_dict``, an optimizer, EMA or pruning code) can be outlived by a stale bank; the
check costs about 2% of a batch-1 conv (``benchmarks/bench_gconv.py --part profile``).
On a GPU nothing is reused (reading the comparison would synchronise the device). For deployment,
:meth:`GroupConv2d.export` returns a plain ``nn.Conv2d`` holding the expanded bank.

p4 and p4m follow GrouPy exactly (the element order of :mod:`.groups`, the weight layout and GrouPy's index
construction), so GrouPy-trained weights load unchanged and give GrouPy's outputs; ``tests/layers/test_groupy_reference.py``
checks this against a reference written from GrouPy's definitions.

Exactness: with an odd kernel, symmetric padding and stride 1, ``f(g . x) = g . f(x)`` holds exactly (to float
rounding) for every input size. With stride ``s > 1`` it holds when the sampled grid is symmetric, i.e. when
``(H + 2p - d(k-1) - 1) % s == 0`` and likewise for ``W``; :func:`stride_is_exact` tells. Even kernels have no
centre pixel, so their rotations are off by half a pixel: they are rejected.

C_N and D_N (issue 16): the same layout, the same one ``conv2d``; the filter at a rotation by ``2 pi r / N`` is made
from the base weights by a fixed linear map (:mod:`.filter_basis`; by default a band-limited ``'harmonic'`` basis,
steerable to any angle) with one small matmul that rotates every base filter to every output element, then the
gather that permutes the input group axis (:func:`~.filter_basis.expansion_map` with ``dense=False``). Quarter turns (when 4 divides ``N``) and
mirrors are exact to float rounding (the map of ``R^(r + N/4)`` is the exact ``rot90`` of the map of ``R^r``). At the
other elements the pixel grid cannot rotate exactly; the error, measured by ``benchmarks/bench_cn.py`` (float64, He-random weights, mean of 3 seeds; inputs:
random band-limited fields with wavelengths >= 8 pixels rotated exactly, outputs compared at the rotation centre;
relative error ``max |f(g x) - g f(x)| / max |f(x)|``) at the rotation ``2 pi / N``:

=================================================  =========  =========  =========  =========  =========  =========
layer                                              c8         d8         c12        d12        c16        d16
=================================================  =========  =========  =========  =========  =========  =========
lifting ``z2 -> G``, 3x3 / 5x5                     .010/.005  .010/.006  .010/.005  .009/.005  .008/.004  .008/.004
group conv ``G -> G``, 3x3 / 5x5                   .012/.007  .009/.006  .007/.006  .007/.005  .007/.005  .006/.005
:class:`GroupMaxPool2d` (2)                        .059       .075       .075       .058       .064       .048
:class:`GroupAvgPool2d` (2)                        .0002      .0003      .0003      .0002      .0002      .0002
:class:`GroupBatchNorm` (eval), :class:`GroupPool` exact      exact      exact      exact      exact      exact
lift-BN-ReLU-gconv-ReLU-maxpool-gconv-GroupPool    .080       .125       .079       .061       .131       .081
the same stack with :class:`GroupAvgPool2d`        .041       .080       .041       .050       .074       .049
=================================================  =========  =========  =========  =========  =========  =========

(The largest over all elements is at most 1.7x these.) Spatial max pooling dominates a stack's error: with average
pooling the same stack measures about half.

TorchScript: every layer here scripts (``torch.jit.script``). The scripted forward computes the same numbers as the
eager one but skips what only Python can do: the input checks with their messages.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import EquivarianceError, check_equivariance, check_float_tensor
from .fields import RandomField, centre
from .filter_basis import basis_size, expansion_map, resolve_filter_basis
from .groups import filter_indices, get_group

__all__ = [
    'GroupConv2d', 'P4ConvZ2', 'P4ConvP4', 'P4MConvZ2', 'P4MConvP4M',
    'GroupPool', 'GroupBatchNorm', 'GroupMaxPool2d', 'GroupAvgPool2d', 'fold_group', 'unfold_group',
    'stride_is_exact', 'EquivariantMixin', 'check_group_input', 'set_finite_check', 'finite_check',
    'check_finite', 'ExportedGroupConv2d', 'export_group_convs',
]


def fold_group(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, |G|, H, W] -> [B, C*|G|, H, W]`` (channel-major, the layout handed to timm as 'folded')."""
    if not torch.jit.is_scripting():
        if x.dim() != 5:
            raise ValueError(f"fold_group expects a 5-D tensor [B, C, |G|, H, W], got shape {tuple(x.shape)}")
    return x.flatten(1, 2)


def unfold_group(x: torch.Tensor, order: int) -> torch.Tensor:
    """``[B, C*|G|, H, W] -> [B, C, |G|, H, W]``; the inverse of :func:`fold_group`."""
    if not torch.jit.is_scripting():
        if x.dim() != 4 or x.shape[1] % order:
            raise ValueError(
                f"unfold_group expects [B, C*|G|, H, W] with channels divisible by |G|={order}, got {tuple(x.shape)}")
    return x.unflatten(1, (x.shape[1] // order, order))


FLAT_INDEX_LIMIT = 1 << 21  # bank entries up to which the eager expansion is one flat gather (its index: 8 MiB)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _load_memcmp():
    """libc's ``memcmp`` through ctypes (a bytewise comparison without allocating), or ``None`` where there is
    none to load; then :func:`_same_bytes` compares with ``torch.equal`` on integer views instead."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library('c') or None)
        fn = libc.memcmp
        fn.restype = ctypes.c_int
        fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        a, b = torch.arange(4, dtype=torch.int32), torch.arange(4, dtype=torch.int32)
        if fn(a.data_ptr(), b.data_ptr(), 16) != 0 or fn(a.data_ptr(), b.flip(0).data_ptr(), 16) == 0:
            return None
        return fn
    except (OSError, AttributeError, TypeError):  # pragma: no cover - platforms without a loadable libc
        return None


_MEMCMP = _load_memcmp()


def _snapshot(t: Optional[torch.Tensor]):
    """A copy of a contiguous CPU tensor's bits (``None`` for ``None``; ``False`` when ``t`` is not such a tensor,
    which then is never reused)."""
    if t is None:
        return None
    d = t.detach()
    if d.device.type != 'cpu' or not d.is_contiguous() or d.element_size() not in _INT_OF_SIZE:
        return False
    return d.clone()


def _same_bytes(t: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether contiguous ``t`` holds exactly the bytes of ``saved`` (same shape and strides already checked): bit
    for bit, so ``-0.0`` differs from ``0.0`` and a NaN equals itself. ``torch.equal`` on integer views: the
    comparison where libc's ``memcmp`` is not there (:meth:`_EvalBank.same_bits` calls ``memcmp`` itself)."""
    it = _INT_OF_SIZE[saved.element_size()]
    return torch.equal(t.detach().view(it), saved.view(it))


class _EvalBank:
    """A bank made in eval mode, and what it was made from: the weight and bias objects, where their data lies,
    their shapes and strides, copies of the bits they held, and the fixed maps with their versions.
    :meth:`GroupConv2d._bank` serves it only while all of these still hold."""

    __slots__ = ('w', 'b', 'fm', 'fi', 'fmv', 'fiv', 'wptr', 'wshape', 'wstride', 'wsaved', 'bptr', 'bshape',
                 'bsaved', 'bank', 'bias', 'wcmp', 'bcmp')

    def __init__(self, w, b, fm, fi, wsaved, bsaved, bank, bias):
        self.w, self.b, self.fm, self.fi = w, b, fm, fi
        self.fmv = -1 if fm is None else fm._version
        self.fiv = -1 if fi is None else fi._version
        self.wptr, self.wshape, self.wstride, self.wsaved = w.data_ptr(), w.shape, w.stride(), wsaved
        self.bptr, self.bshape = (-1, None) if b is None else (b.data_ptr(), b.shape)
        self.bsaved = bsaved
        self.bank, self.bias = bank, bias
        # memcmp's arguments, converted once: valid while the data pointers are the ones recorded (checked first)
        self.wcmp = _cmp_args(self.wptr, wsaved)
        self.bcmp = None if b is None else _cmp_args(self.bptr, bsaved)

    def __reduce__(self):
        # a copy or a pickle of the layer does not carry the bank (its ctypes pointers cannot be pickled, and they
        # point at this layer's memory): it is made again at the copy's first eval call
        return _no_bank, ()

    def same_bits(self, w, b) -> bool:
        """Whether ``w`` / ``b`` (at the recorded data pointers, shapes and strides: checked by the caller) hold
        the recorded bits."""
        if self.wcmp is not None:
            if _MEMCMP(*self.wcmp) != 0:
                return False
        elif not _same_bytes(w, self.wsaved):
            return False
        if b is None:
            return True
        return _MEMCMP(*self.bcmp) == 0 if self.bcmp is not None else _same_bytes(b, self.bsaved)


def _no_bank() -> None:
    return None


def _cmp_args(ptr: int, saved: Optional[torch.Tensor]):
    """``memcmp``'s three arguments as ctypes values (``None`` without libc's memcmp)."""
    if _MEMCMP is None or saved is None or saved is False:
        return None
    import ctypes
    return (ctypes.c_void_p(ptr), ctypes.c_void_p(saved.data_ptr()),
            ctypes.c_size_t(saved.numel() * saved.element_size()))


def _compiling() -> bool:
    """True while ``torch.compile`` traces: then the bank is built by the plain expansion, with no Python state."""
    return torch.compiler.is_compiling()


def stride_is_exact(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> bool:
    """True when a strided convolution samples a grid symmetric about the centre of a ``size`` axis.

    Only then do rotations/flips of the input map the sampled grid onto itself, so that equivariance is exact.
    """
    span = size + 2 * padding - dilation * (kernel_size - 1) - 1
    return span >= 0 and span % stride == 0


_FINITE_CHECK = os.environ.get('GEQUIV_TIMM_CHECK_FINITE', '').strip().lower() not in ('', '0', 'false', 'no')


def set_finite_check(enabled: bool = True) -> bool:
    """Turn on (or off) the check that rejects NaN / Inf inputs in every group layer; returns the old setting.

    Off by default: the check costs a reduction and a device-to-host sync per layer (and a graph break under
    ``torch.compile``). Turn it on while debugging a run whose loss turned NaN, to learn which layer saw it first;
    the environment variable ``GEQUIV_TIMM_CHECK_FINITE=1`` turns it on at import.
    """
    global _FINITE_CHECK
    old, _FINITE_CHECK = _FINITE_CHECK, bool(enabled)
    return old


@contextmanager
def finite_check(enabled: bool = True) -> Iterator[None]:
    """``with finite_check(): ...`` runs the block with the NaN / Inf input check on (see :func:`set_finite_check`)."""
    old = set_finite_check(enabled)
    try:
        yield
    finally:
        set_finite_check(old)


def check_finite(x: torch.Tensor, name: str) -> None:
    """When the finite check is on, raise a ValueError naming the layer if ``x`` holds NaN or Inf."""
    if not _FINITE_CHECK or not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if bad.any():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{name}: input holds {n_nan} NaN and {n_inf} Inf values (shape {tuple(x.shape)}); they "
                         f"would poison training. Check the data and the previous layer, or lower the learning rate.")


def _check_float(x: torch.Tensor, name: str) -> None:
    check_float_tensor(x, name)  # TypeError: not a tensor, or not floating point (layers/checks.py's policy)
    check_finite(x, name)


def check_group_input(x: torch.Tensor, channels: int, order: int, name: str, min_size: int = 1) -> None:
    """Raise a ValueError naming the layer when ``x`` is not ``[B, channels, order, H, W]`` (or ``[B, C, H, W]``
    for ``order == 1`` planar input)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if order == 0:  # planar
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a planar input [B, C={channels}, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{name}: expected {channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    else:
        if x.dim() != 5:
            hint = ''
            if x.dim() == 4 and x.shape[1] == channels * order:
                hint = ' (it looks folded: use gequiv_timm.layers.unfold_group(x, |G|) first)'
            raise ValueError(
                f"{name}: expected a group feature map [B, C={channels}, |G|={order}, H, W], "
                f"got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != channels:
            raise ValueError(f"{name}: expected {channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2] != order:
            raise ValueError(
                f"{name}: expected group axis of size |G|={order}, got {x.shape[2]} (shape {tuple(x.shape)}); "
                f"is this feature map from another group?")
    check_float_tensor(x, name)
    check_finite(x, name)
    if min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"{name}: input of spatial size {tuple(x.shape[-2:])} is too small: this layer needs at least "
            f"{min_size}x{min_size}")


def _square(v, name: str, owner: str):
    """An int, or a pair of equal ints as GrouPy accepts (returned as the int); anything else is returned unchanged
    for the caller's type check, except an unequal pair, which is refused here."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in v):
            raise ValueError(f"{owner}: {name} must be an int or a pair of ints, got {v!r}")
        if v[0] != v[1]:
            raise ValueError(f"{owner}: {name}={tuple(v)!r} differs between the axes; a rotation exchanges the "
                             f"axes, so the layer would not be equivariant. Use equal values, e.g. {name}={v[0]}.")
        return v[0]
    return v


class EquivariantMixin:
    """Adds :meth:`check_equivariance` to a module with ``in_group``/``out_group``.

    ``in_group`` / ``out_group`` / ``act_group`` (the group whose action is checked) are :class:`Group` s;
    ``None`` as out_group means invariant (planar, untouched by the group: used by group pooling). A planar input
    (``in_group.order == 1`` and ``in_planar``) is ``[B, C, H, W]``; otherwise ``[B, C, |G|, H, W]``.

    The group attributes are plain Python objects that TorchScript cannot type: they are deliberately not class
    annotations, and are listed in ``__jit_ignored_attributes__``; the scripted forward passes read the group
    orders from int attributes instead.
    """

    __jit_ignored_attributes__ = ['in_group', 'out_group', 'act_group', 'group']
    in_planar = False
    out_planar = False

    def _example_input(self, size: Tuple[int, int] = (13, 13), batch: int = 2, **kw) -> torch.Tensor:
        p = next(iter(self.parameters()), None) if isinstance(self, nn.Module) else None
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        device = p.device if p is not None else None
        if self.in_planar:
            return torch.randn(batch, self.in_channels, *size, dtype=dtype, device=device)
        return torch.randn(batch, self.in_channels, self.in_group.order, *size, dtype=dtype, device=device)

    def _act(self, x: torch.Tensor, g: int, planar: bool, mode: str = 'bilinear') -> torch.Tensor:
        if planar:
            return self.act_group.transform_plane(x, g, mode)
        return self.act_group.transform_group_map(x, g, mode)

    def _out_side(self, n: int) -> Optional[int]:
        """The output side for an input side ``n`` when the output grid is centred on the input's centre (so the
        rotation centre stays a sample point), else ``None``. Shape-preserving modules return ``n``."""
        return n

    @torch.no_grad()
    def check_equivariance(self, x: Optional[torch.Tensor] = None, size: Tuple[int, int] = (13, 13),
                           atol: Optional[float] = None, rtol: Optional[float] = None,
                           elements: Optional[Sequence[int]] = None,
                           wavelength: float = 8.0) -> EquivarianceError:
        """Rotate/flip a random (or the given) input by every group element (or ``elements``) and return the
        error ``max_g |f(g.x) - g.f(x)|`` (:func:`~gequiv_timm.layers.checks.check_equivariance`: a float, the
        absolute error, with ``.relative``); raise an AssertionError when ``atol`` / ``rtol`` is exceeded.

        Elements that map the pixel grid to itself (all of p4 / p4m; the quarter turns and mirrors of ``cN`` /
        ``dN``) are checked on a Gaussian random input over the whole output: exact, to float rounding. When an
        element rotates by another angle (45 degrees in C8), pixels cannot be rotated exactly, so the check is
        made on smooth inputs (:class:`~gequiv_timm.layers.fields.RandomField`, wavelengths >= ``wavelength``
        pixels, sampled exactly at the rotated coordinates) and compared at the rotation centre, where no output
        pixel moves (:func:`~gequiv_timm.layers.fields.centre`); every element in ``elements`` is then checked this
        way. The input side is the smallest at or above ``size`` whose output has a centre pixel. A given ``x``
        (it must be smooth for the figure to mean anything) is rotated with bicubic ``grid_sample``.
        """
        els = list(self.act_group.elements() if elements is None else elements)
        if all(self.act_group.is_grid_element(g) for g in els):
            if x is None:
                x = self._example_input(size)
            return check_equivariance(self, x, lambda t, g: self._act(t, g, self.in_planar),
                                      lambda t, g: self._act(t, g, self.out_planar), els,
                                      atol=atol, rtol=rtol, name=type(self).__name__)
        group = self.act_group
        if x is None:
            n = next((m for m in range(max(size), max(size) + 256) if (self._out_side(m) or 0) % 2 == 1), None)
            if n is None:
                raise ValueError(f"{type(self).__name__}.check_equivariance: found no input size >= {max(size)} "
                                 f"whose output has a centre pixel")
            p = next(iter(self.parameters()), None) if isinstance(self, nn.Module) else None
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float64
            # a batch of 8 planar fields; a map on the group has |G| fields per channel already: 2 suffice
            lead = (8, self.in_channels) if self.in_planar else (2, self.in_channels, self.in_group.order)
            field = RandomField(lead, (n, n), wavelength, seed=0, dtype=dtype,
                                device=p.device if p is not None else None)
            x = field.sample()

            def act_in(t, g):
                return field.sample(group, g, group_axis=not self.in_planar)
        else:
            def act_in(t, g):
                return self._act(t, g, self.in_planar, mode='bicubic')

        def act_out(y, g):
            return y if self.out_planar else y[..., group.permutation(g)]
        return check_equivariance(lambda t: centre(self(t)), x, act_in, act_out, els, atol=atol, rtol=rtol,
                                  name=type(self).__name__)


class GroupConv2d(EquivariantMixin, nn.Module):
    """Group convolution ``in_group -> out_group`` (``z2 -> G`` lifting, or ``G -> G``).

    Args:
        in_channels: input channels ``C_in`` (fields, each of size ``|G_in|``).
        out_channels: output channels ``C_out`` (each of size ``|G_out|``).
        kernel_size: odd spatial kernel size ``k``.
        in_group: ``'z2'`` for a lifting layer (input ``[B, C_in, H, W]``), else the output group.
        out_group: ``'p4'`` or ``'p4m'``.
        stride, padding: an int or a pair of equal ints (GrouPy takes pairs; unequal ones would break the symmetry
            between the axes that rotations exchange, so they are refused). See the module docstring on stride.
        dilation: an int, as in ``nn.Conv2d``.
        bias: one bias per output channel, shared over the group.
        planar_input: whether the input is planar ``[B, C, H, W]``. Defaults to ``in_group == 'z2'``; pass
            ``False`` for a ``z2 -> z2`` layer inside a network that keeps the (trivial) group axis.
        filter_basis: how the filter at each group element is made from the weights (:mod:`.filter_basis`):
            ``'pixel'`` (index permutation, exact; the default for z2, p4, p4m), ``'harmonic'`` (a band-limited
            steerable basis; the default for ``cN`` / ``dN`` with rotations by other than multiples of 90 degrees)
            or ``'bilinear'`` (the pixel grid resampled; for comparison).
        max_frequency: highest circular harmonic of the ``'harmonic'`` basis (default 2; 1 is more equivariant
            with fewer weights, 3 adds detail on rings of radius >= 2).

    Equivariance: exact (to float rounding) for every element of z2, p4, p4m and for the quarter turns and mirrors of
    ``cN`` / ``dN``; at the other rotations of ``cN`` / ``dN`` approximate: relative error about 0.01 (3x3) and 0.005
    (5x5) per layer at ``2 pi / N`` on smooth inputs (the module docstring's table; :meth:`check_equivariance`
    measures it).

    Shapes:
        input ``[B, C_in, H, W]`` (lifting) or ``[B, C_in, |G|, H, W]``; output ``[B, C_out, |G|, H', W']``.
        weight ``[C_out, C_in, |G_in|, k, k]`` (``'pixel'``, ``'bilinear'``) or ``[C_out, C_in, |G_in|, n_basis]``
        (``'harmonic'``: ``n_basis`` = 6, 11, 16 for k = 3, 5, 7; :func:`~.filter_basis.basis_size`).

    Example:
        >>> conv = P4ConvP4(8, 16, 3, padding=1)
        >>> conv(torch.randn(2, 8, 4, 32, 32)).shape
        torch.Size([2, 16, 4, 32, 32])
        >>> lift = GroupConv2d(1, 8, 3, 'z2', 'c8', padding=1)  # C8: rotations by 45 degrees, harmonic basis
        >>> lift(torch.randn(2, 1, 28, 28)).shape, tuple(lift.weight.shape)
        (torch.Size([2, 8, 8, 28, 28]), (8, 1, 1, 6))
    """

    __jit_ignored_attributes__ = EquivariantMixin.__jit_ignored_attributes__ + ['_flat', '_eval_cache']

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, in_group='z2', out_group='p4',
                 stride: int = 1, padding: int = 0, dilation: int = 1, bias: bool = True,
                 planar_input: Optional[bool] = None, filter_basis: Optional[str] = None,
                 max_frequency: Optional[int] = None):
        super().__init__()
        kernel_size = _square(kernel_size, 'kernel_size', type(self).__name__)
        stride = _square(stride, 'stride', type(self).__name__)
        padding = _square(padding, 'padding', type(self).__name__)
        for n, v in (('in_channels', in_channels), ('out_channels', out_channels), ('kernel_size', kernel_size),
                     ('stride', stride), ('dilation', dilation)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{type(self).__name__}: {n} must be a positive int, got {v!r}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"{type(self).__name__}: padding must be a non-negative int, got {padding!r}")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"{type(self).__name__}: kernel_size must be odd for exact equivariance (an even kernel has no "
                f"centre pixel, so its rotations are off by half a pixel); got {kernel_size}. Use {kernel_size + 1} "
                f"or {kernel_size - 1}.")
        self.in_group = get_group(in_group)
        self.out_group = get_group(out_group)
        if self.in_group.order > 1 and self.in_group.name != self.out_group.name:
            raise ValueError(f"{type(self).__name__}: cannot convolve {self.in_group.name} -> {self.out_group.name}; "
                             f"use in_group='z2' (lifting) or the same group in and out")
        self.act_group = self.out_group
        self.in_order = self.in_group.order  # plain ints: what the TorchScript forward reads
        self.out_order = self.out_group.order
        self.in_planar = self.in_group.order == 1 if planar_input is None else bool(planar_input)
        if self.in_planar and self.in_group.order != 1:
            raise ValueError(f"{type(self).__name__}: planar_input=True needs in_group='z2' (a lifting layer)")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.filter_basis, self.max_frequency = resolve_filter_basis(filter_basis, self.out_group, max_frequency,
                                                                     type(self).__name__)
        self.basis_size = basis_size(kernel_size, self.filter_basis, self.max_frequency)
        gi = self.in_group.order
        if self.filter_basis == 'harmonic':
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, gi, self.basis_size))
        else:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, gi, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if self.filter_basis == 'pixel':  # GrouPy's index gather
            self.register_buffer('filter_idx', filter_indices(self.in_group, self.out_group, kernel_size),
                                 persistent=False)
            self.register_buffer('filter_map', None, persistent=False)
        else:  # one matmul with the fixed map (rotating each base filter to every output element), then a gather
            fmap, idx = expansion_map(self.in_group, self.out_group, kernel_size, self.filter_basis,
                                      self.max_frequency, dense=False)
            self.register_buffer('filter_map', fmap.to(torch.get_default_dtype()), persistent=False)
            self.register_buffer('filter_idx', idx, persistent=False)
        self._flat = None  # (key, flat gather index) of _expand_fast, derived from the fixed maps only
        self._eval_cache = None  # see _bank: (weights it was made from, maps, bank, bias), checked on every use
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) normal init; fan-in counts ``C_in * |G_in| * k * k`` (the true number of summed terms), or
        ``C_in * |G_in| * n_basis`` for the orthonormal ``'harmonic'`` basis (the same filter energy)."""
        nn.init.kaiming_normal_(self.weight, mode='fan_in', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"{self.in_group.name}->{self.out_group.name}, stride={self.stride}, padding={self.padding}")
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.filter_basis != 'pixel':
            s += f", filter_basis={self.filter_basis!r}"
        if self.max_frequency is not None and self.max_frequency != 2:
            s += f", max_frequency={self.max_frequency}"
        return s + ('' if self.bias is not None else ', bias=False')

    # ----- filter bank ----------------------------------------------------------------------------------
    def _rotate(self, weight: torch.Tensor) -> torch.Tensor:
        """Step 1 of the expansion, 2-D: the weights themselves (``'pixel'``: ``[C_out*C_in, |G_in|*k*k]``) or the
        matmul with the fixed map (``[C_out*C_in, |G_out|*|G_in|*k*k]``, or ``[C_out*C_in*|G_in|, |G_out|*k*k]``
        for the large maps that are gathered after the matmul)."""
        fmap = self.filter_map
        if fmap is None:
            return weight.reshape(weight.shape[0] * weight.shape[1], -1)
        return weight.reshape(-1, fmap.shape[0]).matmul(fmap)

    def _arrange(self, r: torch.Tensor, co: int, ci: int, gi: int) -> torch.Tensor:
        """Step 2: the output of :meth:`_rotate` gathered and laid out as the bank ``[C_out*|G_out|, C_in*|G_in|,
        k, k]`` (an index_select, a transpose and a copy). Only data movement: applied to an integer
        ``arange`` it gives, for every bank entry, the flat position in ``r`` it is read from (:meth:`_flat_index`)."""
        k, go = self.kernel_size, self.out_order
        idx = self.filter_idx
        if self.filter_map is None:  # 'pixel': GrouPy's index gather -> [Co*Ci, Go*Gi*k*k]
            assert idx is not None
            r = r.index_select(1, idx.flatten())
        elif idx is not None:  # (h, k) reads the base filter of h^-1 k rotated by h
            r = r.reshape(co * ci, gi * go * k * k).index_select(1, idx)
        return r.reshape(co, ci, go, gi * k * k).transpose(1, 2).reshape(co * go, ci * gi, k, k)

    def _expand(self, weight: torch.Tensor) -> torch.Tensor:
        """The bank ``[C_out*|G_out|, C_in*|G_in|, k, k]`` of any ``weight`` shaped like ``self.weight``: the
        reference construction (:meth:`_rotate`, then :meth:`_arrange`), scriptable. The eager forward gets the same
        numbers, bitwise, from :meth:`_expand_fast`."""
        return self._arrange(self._rotate(weight), weight.shape[0], weight.shape[1], weight.shape[2])

    def _flat_index(self, r: torch.Tensor, co: int, ci: int, gi: int) -> Optional[torch.Tensor]:
        """The bank's entries as flat positions in ``r`` (int32, on ``r``'s device), or ``None`` above
        :data:`FLAT_INDEX_LIMIT` entries. Derived from the fixed maps, never from the weights; rebuilt when
        ``filter_map`` / ``filter_idx`` are replaced or written in place, or the weight's shape or device changes."""
        n = co * self.out_order * ci * gi * self.kernel_size ** 2
        if n > FLAT_INDEX_LIMIT:
            return None
        fm, fi = self.filter_map, self.filter_idx
        key = (fm, -1 if fm is None else fm._version, fi, -1 if fi is None else fi._version, tuple(r.shape),
               co, ci, gi, r.device)
        cached = self._flat
        if cached is not None and len(cached[0]) == len(key) and all(a is b or (not isinstance(a, torch.Tensor) and
                                                                               a == b)
                                                                    for a, b in zip(cached[0], key)):
            return cached[1]
        src = torch.arange(r.numel(), device=r.device).view(r.shape)
        flat = self._arrange(src, co, ci, gi).reshape(-1).to(torch.int32)
        self._flat = (key, flat)
        return flat

    def _expand_fast(self, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`_expand` in two operations at most: the matmul (not for ``'pixel'``) and one ``index_select`` on
        the flat tensor with a precomputed index, whose output is already the bank's layout. Its backward is one
        serial ``index_add`` into a flat buffer (and the matmul's): no transposed copies, and no small
        multi-threaded kernels, which stall whenever another process holds a core (measured:
        ``benchmarks/bench_gconv.py --part profile``). Same numbers as :meth:`_expand`, bitwise (a gather)."""
        co, ci, gi = weight.shape[0], weight.shape[1], weight.shape[2]
        r = self._rotate(weight)
        flat = self._flat_index(r, co, ci, gi)
        if flat is None:
            return self._arrange(r, co, ci, gi)
        k = self.kernel_size
        return r.reshape(-1).index_select(0, flat).view(co * self.out_order, ci * gi, k, k)

    def expanded_weight(self) -> torch.Tensor:
        """The full filter bank ``[C_out*|G_out|, C_in*|G_in|, k, k]`` used by the single ``conv2d``, expanded from
        the current weights (never cached)."""
        if torch.jit.is_scripting() or _compiling():
            return self._expand(self.weight)
        return self._expand_fast(self.weight)

    def _expand_bias(self, b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if b is None else b.repeat_interleave(self.out_order)

    def expanded_bias(self) -> Optional[torch.Tensor]:
        """The bias ``[C_out*|G_out|]`` (each channel's bias repeated over the group), from the current bias."""
        return self._expand_bias(self.bias)

    def _bank(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The bank and bias of this call (eager only). Expanded from the current weights, except in the one case
        where a bank is reused: eval mode, no gradient wanted for the weights, weights on the CPU. Then the bank made
        at an earlier call is served only if the current ``weight`` and ``bias`` hold *bit for bit* the values it was
        made from (compared with a copy kept beside it, every call) and the fixed maps are the same objects at the
        same version. Any write (``.data``, ``load_state_dict``, an optimizer or EMA step, ``to()``, a new
        Parameter) changes the values, and the bank is expanded again: nothing can be served stale. The comparison
        reads the weights twice, ``|G_out| / 2`` times less than the conv reads the bank, with libc's ``memcmp``
        (its arguments converted once per bank; ``torch.equal`` on integer views where there is no libc). The whole
        check, measured for a 16 -> 16 field c8 layer: about 3.5 us (``timeit``), 0.1% of its batch-1 conv at 32x32
        (``benchmarks/bench_gconv.py --part profile`` times it beside the conv).
        Not on GPUs, where reading the comparison's result would synchronise the device at every layer; there the
        bank is expanded every call (one small kernel). Memory: one bank and one copy of the weights per layer,
        while in eval mode on the CPU (what :meth:`export` holds too); ``train()`` frees it."""
        c = self._eval_cache
        if c is not None and not self.training and not _compiling():  # the reuse check, kept lean (it runs per call)
            params, bufs = self._parameters, self._buffers
            w, b = params.get('weight'), params.get('bias')
            fm, fi = bufs.get('filter_map'), bufs.get('filter_idx')
            if (w is c.w and b is c.b and fm is c.fm and fi is c.fi
                    and (not torch.is_grad_enabled() or not (w.requires_grad or (b is not None and b.requires_grad)))
                    and w.data_ptr() == c.wptr and w.shape == c.wshape and w.stride() == c.wstride
                    and (b is None or (b.data_ptr() == c.bptr and b.shape == c.bshape and b.is_contiguous()))
                    and (fm is None or fm._version == c.fmv) and (fi is None or fi._version == c.fiv)
                    and c.same_bits(w, b)):
                return c.bank, c.bias
        w, b = self.weight, self.bias
        if _compiling():
            return self._expand(w), self._expand_bias(b)
        if self.training or (torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad))):
            self._eval_cache = None
            return self._expand_fast(w), self._expand_bias(b)
        with torch.no_grad():
            bank, bias = self._expand_fast(w), self._expand_bias(b)
        wsaved, bsaved = _snapshot(w), _snapshot(b)
        fm, fi = self._buffers.get('filter_map'), self._buffers.get('filter_idx')
        reusable = (wsaved is not False and bsaved is not False and w is self._parameters.get('weight')
                    and b is self._parameters.get('bias') and fm is self.filter_map and fi is self.filter_idx)
        self._eval_cache = _EvalBank(w, b, fm, fi, wsaved, bsaved, bank, bias) if reusable else None
        return bank, bias

    def train(self, mode: bool = True):
        self._eval_cache = None  # frees the eval bank (it would be checked and refused anyway)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._eval_cache = self._flat = None  # made on the old device / dtype; rebuilt on the next call
        try:
            out = super()._apply(fn, *args, **kwargs)
        except RuntimeError as e:
            if 'channels_last' not in str(e):
                raise

            def fn4(t):  # Module.to(memory_format=channels_last) refuses 5-D weights: convert their 4-D view
                return fn(t.flatten(1, 2)).unflatten(1, t.shape[1:3]) if t.dim() == 5 else fn(t)
            out = super()._apply(fn4, *args, **kwargs)
        self._round_map_once()
        return out

    def _round_map_once(self) -> None:
        """After a dtype change, take the rotation map again from its float64 original (rounded once to the new
        dtype), so that ``.float().double()`` does not leave float32-rounded interpolation weights behind."""
        fmap = self.filter_map
        if fmap is None or not fmap.is_floating_point():
            return
        exact, _ = expansion_map(self.in_group, self.out_group, self.kernel_size, self.filter_basis,
                                 self.max_frequency, dense=self.filter_idx is None and self.in_order > 1)
        if fmap.device.type != 'meta':
            self.filter_map = exact.to(device=fmap.device, dtype=fmap.dtype)

    def _min_size(self) -> int:
        return max(1, self.dilation * (self.kernel_size - 1) + 1 - 2 * self.padding)

    def _out_side(self, n: int) -> Optional[int]:
        if n < self._min_size() or not stride_is_exact(n, self.kernel_size, self.stride, self.padding, self.dilation):
            return None
        return (n + 2 * self.padding - self.dilation * (self.kernel_size - 1) - 1) // self.stride + 1

    # ----- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript cannot run the Python input checks
            check_group_input(x, self.in_channels, 0 if self.in_planar else self.in_order, type(self).__name__,
                              self._min_size())
            w, b = self._bank()
        else:
            w, b = self._expand(self.weight), self._expand_bias(self.bias)
        if not self.in_planar:
            x = x.flatten(1, 2)
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation)
        return y.unflatten(1, (self.out_channels, self.out_order))

    def export(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same map on folded tensors.

        ``conv(x.flatten(1, 2))`` (or ``conv(x)`` for a lifting layer) equals ``self(x).flatten(1, 2)``.
        """
        gi, go = self.in_group.order, self.out_group.order
        conv = nn.Conv2d(self.in_channels * gi, self.out_channels * go, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None)
        conv = conv.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self._expand(self.weight))
            if self.bias is not None:
                conv.bias.copy_(self._expand_bias(self.bias))
        return conv


class ExportedGroupConv2d(nn.Conv2d):
    """A group convolution frozen into a plain ``nn.Conv2d`` that keeps the group layout of its input and output.

    Made by :func:`export_group_convs` (or :meth:`from_group_conv`): it holds a *copy* of the expanded filter bank
    ``[C_out*|G_out|, C_in*|G_in|, k, k]``, so it computes exactly what the group convolution computed when it was
    exported, at the cost of one ``conv2d``, and never follows later changes of the original layer. It is the
    inference speed path; train the group layers, not this.

    Shapes: input ``[B, C_in, |G_in|, H, W]`` (``[B, C_in, H, W]`` for a lifting layer), output
    ``[B, C_out, |G_out|, H', W']``, as the layer it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_order: int, out_order: int,
                 in_planar: bool, stride: int = 1, padding: int = 0, dilation: int = 1, bias: bool = True):
        super().__init__(in_channels * in_order, out_channels * out_order, kernel_size, stride, padding, dilation,
                         bias=bias)
        self.group_in_channels = in_channels
        self.group_out_channels = out_channels
        self.in_order = in_order
        self.out_order = out_order
        self.in_planar = in_planar

    @classmethod
    def from_group_conv(cls, conv: GroupConv2d) -> 'ExportedGroupConv2d':
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.in_order, conv.out_order,
                  conv.in_planar, conv.stride, conv.padding, conv.dilation, conv.bias is not None)
        out = out.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(conv.expanded_weight())
            if conv.bias is not None:
                out.bias.copy_(conv.expanded_bias())
        return out.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_group_input(x, self.group_in_channels, 0 if self.in_planar else self.in_order,
                              type(self).__name__)
        if not self.in_planar:
            x = x.flatten(1, 2)
        return super().forward(x).unflatten(1, (self.group_out_channels, self.out_order))


def export_group_convs(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`GroupConv2d` in ``model`` by its :class:`ExportedGroupConv2d` (a frozen plain conv).

    Returns a copy (or ``model`` itself with ``inplace=True``) that computes the same outputs with one ``conv2d``
    per layer and no filter expansion: the batch-1 inference path (``benchmarks/bench_gconv.py`` measures it).
    The copy does not follow later writes to the original's weights; export again after changing them.

    Example:
        >>> net = nn.Sequential(P4ConvZ2(1, 4, 3, padding=1), P4ConvP4(4, 2, 3)).eval()
        >>> fast = export_group_convs(net)
        >>> x = torch.randn(1, 1, 9, 9)
        >>> bool(torch.allclose(fast(x), net(x), atol=1e-6))
        True
    """
    import copy
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, GroupConv2d):
        return ExportedGroupConv2d.from_group_conv(model)
    for name, child in list(model.named_children()):
        if isinstance(child, GroupConv2d):
            setattr(model, name, ExportedGroupConv2d.from_group_conv(child))
        else:
            export_group_convs(child, inplace=True)
    return model


class P4ConvZ2(GroupConv2d):
    """Lifting convolution ``Z2 -> p4`` (GrouPy's name). Input ``[B, C_in, H, W]``, output ``[B, C_out, 4, H', W']``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, 'z2', 'p4', stride, padding, dilation, bias)


class P4ConvP4(GroupConv2d):
    """Group convolution ``p4 -> p4``. Input ``[B, C_in, 4, H, W]``, output ``[B, C_out, 4, H', W']``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, 'p4', 'p4', stride, padding, dilation, bias)


class P4MConvZ2(GroupConv2d):
    """Lifting convolution ``Z2 -> p4m``. Input ``[B, C_in, H, W]``, output ``[B, C_out, 8, H', W']``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, 'z2', 'p4m', stride, padding, dilation, bias)


class P4MConvP4M(GroupConv2d):
    """Group convolution ``p4m -> p4m``. Input ``[B, C_in, 8, H, W]``, output ``[B, C_out, 8, H', W']``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, 'p4m', 'p4m', stride, padding, dilation, bias)


class GroupPool(EquivariantMixin, nn.Module):
    """Pool over the group axis: ``[B, C, |G|, H, W] -> [B, C, H, W]`` by ``'max'`` or ``'mean'``.

    The output is *invariant* in the group axis: ``pool(g . f) = g . pool(f)`` with ``g`` acting on the plane only.
    Pointwise in space, so it commutes with every element of every group, resampled rotations included (measured:
    0 at the rotation centre).
    """

    def __init__(self, group='p4', mode: str = 'max', channels: Optional[int] = None):
        super().__init__()
        if mode not in ('max', 'mean', 'avg'):
            raise ValueError(f"GroupPool: mode must be 'max' or 'mean', got {mode!r}")
        self.mode = 'mean' if mode == 'avg' else mode
        self.in_group = self.act_group = get_group(group)
        self.out_group = None
        self.out_planar = True
        self.in_channels = channels or 1

    def extra_repr(self) -> str:
        return f"{self.in_group.name}, mode={self.mode!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_float(x, 'GroupPool')
            if x.dim() != 5 or x.shape[2] != self.in_group.order:
                raise ValueError(f"GroupPool: expected [B, C, |G|={self.in_group.order}, H, W], got "
                                 f"{tuple(x.shape)}")
        return x.amax(dim=2) if self.mode == 'max' else x.mean(dim=2)


class GroupBatchNorm(nn.BatchNorm3d):
    """Batch norm for ``[B, C, |G|, H, W]`` with statistics and affine parameters shared over the group axis.

    Sharing over ``|G|`` is what keeps it equivariant (a per-(C, g) statistic would break the symmetry); pointwise in
    space, it commutes in eval mode with every element of ``cN`` / ``dN`` too (measured 1e-16 at 45 degrees). This is
    ``nn.BatchNorm3d`` viewed over ``(|G|, H, W)``, with a shape check. Under TorchScript (which cannot call
    ``super().forward``) the same batch norm is written out with ``F.batch_norm``, without the Python checks.
    """

    __jit_ignored_attributes__ = ['group']

    def __init__(self, num_features: int, group='p4', eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = get_group(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"GroupBatchNorm: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != self.num_features or x.shape[2] != self.group.order:
            raise ValueError(f"GroupBatchNorm: expected [B, C={self.num_features}, |G|={self.group.order}, H, W], "
                             f"got {tuple(x.shape)}")
        _check_float(x, 'GroupBatchNorm')
        return super().forward(x)

    def _forward_scripted(self, x: torch.Tensor) -> torch.Tensor:
        """``nn.BatchNorm3d``'s forward in TorchScript-compatible form (same statistics, same running updates)."""
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.training and self.track_running_stats:
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if keep_running else None,
                            self.running_var if keep_running else None, self.weight, self.bias,
                            use_batch_stats, factor, self.eps)


class _GroupSpatialPool(EquivariantMixin, nn.Module):
    def __init__(self, kernel_size: int = 2, stride: Optional[int] = None, padding: int = 0, group='p4'):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride or kernel_size
        self.padding = padding
        self.in_group = self.out_group = self.act_group = get_group(group)
        self.in_channels = 1

    def is_exact(self, h: int, w: int) -> bool:
        """Whether pooling an ``h x w`` map commutes exactly with the group (symmetric window grid)."""
        return all(stride_is_exact(s, self.kernel_size, self.stride, self.padding) for s in (h, w))

    def _out_side(self, n: int) -> Optional[int]:
        if n + 2 * self.padding < self.kernel_size or not stride_is_exact(n, self.kernel_size, self.stride,
                                                                            self.padding):
            return None
        return (n + 2 * self.padding - self.kernel_size) // self.stride + 1

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{type(self).__name__}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 5 or x.shape[2] != self.in_group.order:
                raise ValueError(f"{type(self).__name__}: expected [B, C, |G|={self.in_group.order}, H, W], got "
                                 f"{tuple(x.shape)}")
            _check_float(x, type(self).__name__)
            if min(x.shape[-2:]) + 2 * self.padding < self.kernel_size:
                raise ValueError(f"{type(self).__name__}: input {tuple(x.shape[-2:])} is smaller than the window "
                                 f"{self.kernel_size}")
        y = self._pool(x.flatten(1, 2))
        return y.unflatten(1, (x.shape[1], x.shape[2]))


class GroupMaxPool2d(_GroupSpatialPool):
    """Spatial max pooling of a group feature map ``[B, C, |G|, H, W]`` (each group channel separately).

    Equivariant exactly when the window grid is symmetric (``(H + 2p - k) % stride == 0``, same for W, e.g. 2x2
    pooling of an even-sized map); :meth:`is_exact` tells. Otherwise the result is only approximately equivariant.
    That holds for the quarter turns and mirrors of every group; at the other rotations of ``cN`` / ``dN`` a 2x2 max
    of a subsampled grid is not rotation invariant: measured relative error 0.05-0.08 at ``2 pi / N`` on smooth
    inputs (C8: 0.059; module docstring), against 0.0003 for :class:`GroupAvgPool2d`.
    """

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class GroupAvgPool2d(_GroupSpatialPool):
    """Spatial average pooling of a group feature map; the same exactness rule as :class:`GroupMaxPool2d`. At the
    non-quarter rotations of ``cN`` / ``dN``: relative error 0.0002-0.0003 at ``2 pi / N`` on smooth inputs."""

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
