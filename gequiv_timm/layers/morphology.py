"""The max-plus / min-plus (morphological) convolution on M2 = R^2 x S^1: the engine under
:class:`~gequiv_timm.layers.pde.DilationM2` and :class:`~gequiv_timm.layers.pde.ErosionM2`.

A feature map on M2 is ``[B, C, Or, H, W]`` (``Or`` orientations, periodic); the kernel is ``[C, Or, kOr, kH, kW]``,
one kernel per channel as seen from each output orientation's own frame (:func:`~gequiv_timm.layers.pde.
m2_morphological_kernel` samples the PDE's kernel). Conventions and the maths are in :mod:`gequiv_timm.layers.pde`.

The morphological convolution (:func:`morphological_convolution_m2`) never unfolds the whole input. Both of its
paths copy the input (a few samples at a time) into a padded flat layout where every kernel offset is a constant
shift, so the candidates of an offset for a block of planes are one strided *view*:

* inference (no autograd): a running ``torch.maximum`` (``minimum``) over the offsets, one ``add`` of the kernel
  value and one in-place reduction per offset on cache-sized blocks (:func:`_morph_forward_loop`);
* training: one subtraction writes a block's candidates for all offsets and one ``amax`` reduces them; the winning
  offset is kept in a ``uint8`` index through which the backward pass routes the gradient (``index_add_``).

Memory is O(output) -- the output, the padded copy, its index and one block's candidates, capped at the output's
size -- not O(output x kernel). The spatial support is restricted to the image (points outside do not compete),
the orientation axis is periodic.

Public functions: :func:`morphological_convolution_m2` (picks the path: autograd or inference),
:func:`morphological_convolution_m2_blocks` (the training path's vectorised forward, without the arg-max index)
and :func:`morphological_convolution_m2_reference` (brute force, O(output x kernel) memory, for tests and
benchmarks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .checks import check_float_tensor
from .pde_native import native_morph_backward, native_morph_forward, use_native

__all__ = ['morphological_convolution_m2', 'morphological_convolution_m2_blocks',
           'morphological_convolution_m2_reference', 'morphological_convolution_r2']


# the M2 feature-map check, shared with layers/pde.py
def _check_m2(x: torch.Tensor, name: str, channels: Optional[int] = None, min_size: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{name}: expected an M2 feature map [B, C, Or, H, W], got shape {tuple(x.shape)}"
                         + (" (a planar image? lift it first with LiftM2Cartesian)" if x.dim() == 4 else ''))
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    check_float_tensor(x, name)
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name}: spatial size {tuple(x.shape[-2:])} is too small; need at least "
                         f"{min_size}x{min_size}")


_CANDIDATE_BUDGET = 1 << 18  # candidate values per block (1 MiB in float32), or the output's size if larger


def _morph_blocks(b: int, c: int, per_channel: int, n_off: int, budget: int):
    """``(b0, b1, c0, c1)`` blocks whose candidates (``n_off`` per padded output element) fit in ``budget``."""
    per_block = max(1, budget // n_off)
    if c * per_channel <= per_block:
        nb = max(1, per_block // (c * per_channel))
        return [(b0, min(b, b0 + nb), 0, c) for b0 in range(0, b, nb)]
    nc = max(1, per_block // per_channel)
    return [(b0, b0 + 1, c0, min(c, c0 + nc)) for b0 in range(b) for c0 in range(0, c, nc)]


def _morph_forward(x: torch.Tensor, kernel: torch.Tensor, erosion: bool, need_index: bool):
    """Max-plus (min-plus) convolution block by block, with every kernel offset as a *constant flat shift*.

    Each block of the input is copied once into a padded buffer ``[b, c, (Or + 2 rOr) * Hp * Wp + tail]``
    (orientations padded periodically, the plane with -inf / +inf), so that the candidate of offset ``(a, i, j)``
    is the slice starting at ``a*Hp*Wp + i*Wp + j``. All offsets together are then one strided *view*
    ``[kOr, kH, kW, b, c, Or, Hp*Wp]`` of that buffer; one subtraction of the kernel writes the block's candidates
    and one ``amax`` over the offsets reduces them (both vectorised). The arg-max, when autograd needs it, is
    found without index reductions (slow on CPUs): the candidates equal to the max are weighted by
    ``K - offset`` and reduced with ``amax`` again, which picks the lowest winning offset. The valid ``H x W``
    part of the padded grid is copied out. Memory: the output, its ``uint8`` index, and one block's candidates
    (at most ``max(output size, _CANDIDATE_BUDGET)`` values) -- never the whole unfold.
    """
    b, c, orientations, h, w = x.shape
    ko, kh, kw = kernel.shape[-3:]
    ro, rh, rw = ko // 2, kh // 2, kw // 2
    hp, wp = h + 2 * rh, w + 2 * rw
    plane = hp * wp
    n_off = ko * kh * kw
    length = (orientations + 2 * ro) * plane + 2 * rh * wp + 2 * rw  # + tail so that every shift fits
    fill = float('inf') if erosion else float('-inf')
    kb_all = kernel.permute(2, 3, 4, 0, 1).reshape(ko, kh, kw, 1, c, orientations, 1)
    out = torch.empty_like(x)
    idx = torch.empty(x.shape, dtype=torch.uint8 if n_off <= 256 else torch.int16,
                      device=x.device) if need_index else None
    weights = torch.arange(n_off, 0, -1, dtype=x.dtype, device=x.device).view(n_off, 1) if need_index else None
    budget = max(_CANDIDATE_BUDGET, x.numel())
    buf = None
    for b0, b1, c0, c1 in _morph_blocks(b, c, orientations * plane, n_off, budget):
        nb, nc = b1 - b0, c1 - c0
        xp = torch.full((nb, nc, length), fill, dtype=x.dtype, device=x.device)
        body = xp[:, :, :(orientations + 2 * ro) * plane].view(nb, nc, orientations + 2 * ro, hp, wp)
        xb = x[b0:b1, c0:c1]
        body[:, :, ro:ro + orientations, rh:rh + h, rw:rw + w] = xb
        if ro:
            body[:, :, :ro, rh:rh + h, rw:rw + w] = xb[:, :, orientations - ro:]
            body[:, :, ro + orientations:, rh:rh + h, rw:rw + w] = xb[:, :, :ro]
        windows = xp.as_strided((ko, kh, kw, nb, nc, orientations, plane),
                                (plane, wp, 1, nc * length, length, plane, 1), xp.storage_offset())
        if buf is None or buf.numel() < windows.numel():  # one buffer for all blocks (fresh pages are slow)
            buf = torch.empty(windows.numel(), dtype=x.dtype, device=x.device)
        cand = buf[:windows.numel()].view(windows.shape)  # contiguous: offsets outermost
        (torch.add if erosion else torch.sub)(windows, kb_all[:, :, :, :, c0:c1], out=cand)
        del xp, body, windows
        cand = cand.view(n_off, -1)
        best = cand.amin(dim=0) if erosion else cand.amax(dim=0)
        m = nb * nc * orientations
        out[b0:b1, c0:c1] = best.view(nb, nc, orientations, hp, wp)[..., :h, :w]
        if need_index:
            torch.eq(cand, best, out=cand)  # 1.0 where an offset attains the max
            cand.mul_(weights)              # K - offset there, 0 elsewhere
            first = cand.amax(dim=0)        # K - (lowest winning offset)
            first = first.view(nb, nc, orientations, hp, wp)[..., :h, :w]
            idx[b0:b1, c0:c1] = (n_off - first).clamp_(0, n_off - 1)  # (the clamp only matters for NaN input)
        del cand, best, m
    return out, idx


_LOOP_BLOCK = 1 << 17  # output values per block of the inference loop (acc + one temporary: 1 MiB in float32)


def _unit_blocks(b: int, c: int, orientations: int, unit: int, target: int):
    """``(b0, b1, c0, c1, o0, o1)`` blocks of about ``target`` values, in whole units of ``unit`` values (one unit =
    one ``(sample, channel, orientation)`` plane): whole samples when a sample fits, else channel chunks of one
    sample, else orientation chunks of one channel."""
    if b * c * orientations * unit <= target:
        return [(0, b, 0, c, 0, orientations)]
    if c * orientations * unit <= target:
        nb = target // (c * orientations * unit)
        return [(b0, min(b, b0 + nb), 0, c, 0, orientations) for b0 in range(0, b, nb)]
    if orientations * unit <= target:
        nc = target // (orientations * unit)
        return [(b0, b0 + 1, c0, min(c, c0 + nc), 0, orientations) for b0 in range(b) for c0 in range(0, c, nc)]
    no = max(1, target // unit)
    return [(b0, b0 + 1, c0, c0 + 1, o0, min(orientations, o0 + no))
            for b0 in range(b) for c0 in range(c) for o0 in range(0, orientations, no)]


def _morph_forward_loop(x: torch.Tensor, kernel: torch.Tensor, erosion: bool,
                        block: int = _LOOP_BLOCK) -> torch.Tensor:
    """Inference path (no arg-max index): a running ``torch.maximum`` over the kernel offsets, cache-sized blocks.

    The padded flat layout is the one of :func:`_morph_forward`, so offset ``(a, i, j)`` is the constant shift
    ``a*Hp*Wp + i*Wp + j`` and its candidates for a block of ``(sample, channel, orientation)`` planes are one
    strided view (``as_strided``, no copy). Only the ``H`` valid rows of each padded plane are computed (``H*Wp``
    values: the ``Wp - W`` wrap-around columns are the only waste). Per offset: one ``add`` of the negated kernel
    value (``[C, Or]``, broadcast over the plane) into a temporary, one in-place ``maximum`` into the accumulator;
    both stay in cache. Memory: the output, the padded copy (made a few samples at a time, at most about the
    output's size), and two block buffers of ``block`` values.
    """
    b, c, orientations, h, w = x.shape
    ko, kh, kw = kernel.shape[-3:]
    ro, rh, rw = ko // 2, kh // 2, kw // 2
    hp, wp = h + 2 * rh, w + 2 * rw
    plane = hp * wp
    unit = h * wp  # the valid rows of a padded plane
    n_off = ko * kh * kw
    length = (orientations + 2 * ro) * plane + 2 * rw  # the last valid row's widest shift stays inside
    fill = float('inf') if erosion else float('-inf')
    kv = kernel.permute(2, 3, 4, 0, 1).reshape(n_off, c, orientations, 1)
    kv = kv.contiguous() if erosion else kv.neg()  # out = max_f (x_f - k_f) = max_f (x_f + kv_f)
    shifts = [a * plane + i * wp + j for a in range(ko) for i in range(kh) for j in range(kw)]
    reduce = torch.minimum if erosion else torch.maximum
    out = torch.empty_like(x)
    per_sample = c * length
    n_pad = max(1, min(b, max(x.numel(), block) // per_sample))  # samples per padded copy
    scratch = None
    for p0 in range(0, b, n_pad):
        p1 = min(b, p0 + n_pad)
        xp = torch.empty((p1 - p0, c, length), dtype=x.dtype, device=x.device)
        body = xp[:, :, :(orientations + 2 * ro) * plane].view(p1 - p0, c, orientations + 2 * ro, hp, wp)
        # only the border is filled (a whole-buffer fill would write every value twice)
        if rh:
            body[..., :rh, :].fill_(fill)
            body[..., rh + h:, :].fill_(fill)
        if rw:
            body[..., rh:rh + h, :rw].fill_(fill)
            body[..., rh:rh + h, rw + w:].fill_(fill)
            xp[:, :, (orientations + 2 * ro) * plane:].fill_(fill)
        xb = x[p0:p1]
        body[:, :, ro:ro + orientations, rh:rh + h, rw:rw + w] = xb
        if ro:
            body[:, :, :ro, rh:rh + h, rw:rw + w] = xb[:, :, orientations - ro:]
            body[:, :, ro + orientations:, rh:rh + h, rw:rw + w] = xb[:, :, :ro]
        stride = (c * length, length, plane, 1)
        for b0, b1, c0, c1, o0, o1 in _unit_blocks(p1 - p0, c, orientations, unit, block):
            size = (b1 - b0, c1 - c0, o1 - o0, unit)
            n = size[0] * size[1] * size[2] * unit
            if scratch is None or scratch.numel() < 2 * n:
                scratch = torch.empty(2 * n, dtype=x.dtype, device=x.device)
            acc, tmp = scratch[:n].view(size), scratch[n:2 * n].view(size)
            base = xp.storage_offset() + (b0 * c + c0) * length + o0 * plane
            kvb = kv[:, c0:c1, o0:o1].unbind(0)
            torch.add(xp.as_strided(size, stride, base + shifts[0]), kvb[0], out=acc)
            for f in range(1, n_off):
                torch.add(xp.as_strided(size, stride, base + shifts[f]), kvb[f], out=tmp)
                reduce(acc, tmp, out=acc)
            out[p0 + b0:p0 + b1, c0:c1, o0:o1] = acc.view(size[:3] + (h, wp))[..., :w]
        del xp, body
    return out


def _morph_backward(grad_out, idx, x_shape, k_shape, erosion, need_x, need_k):
    """Route ``grad_out`` to the winning offsets with ``index_add_`` (one for the input, one for the kernel).

    As in the forward pass, the input gradient is accumulated in the padded flat layout, where offset ``f`` is a
    constant shift ``shift[f]`` (looked up with ``index_select``); the periodic orientation padding is then folded
    back onto the orientations it copies and the plane padding is dropped.
    """
    b, c, orientations, h, w = x_shape
    ko, kh, kw = k_shape[-3:]
    ro, rh, rw = ko // 2, kh // 2, kw // 2
    hp, wp = h + 2 * rh, w + 2 * rw
    plane = hp * wp
    n_off = ko * kh * kw
    length = (orientations + 2 * ro) * plane + 2 * rh * wp + 2 * rw
    dev = grad_out.device
    flat = torch.arange(n_off, device=dev)
    shift = (flat // (kh * kw)) * plane + ((flat // kw) % kh) * wp + flat % kw
    q = (torch.arange(orientations, device=dev).view(-1, 1, 1) * plane
         + torch.arange(h, device=dev).view(1, -1, 1) * wp + torch.arange(w, device=dev).view(1, 1, -1))
    grad_x = torch.empty(x_shape, dtype=grad_out.dtype, device=dev) if need_x else None
    grad_k = torch.zeros(c * orientations * n_off, dtype=grad_out.dtype, device=dev) if need_k else None
    ck = (torch.arange(c * orientations, device=dev) * n_off).view(1, c, orientations, 1, 1)
    per_block = max(1, max(_CANDIDATE_BUDGET, b * c * orientations * h * w) // 8)
    for b0, b1, c0, c1 in _morph_blocks(b, c, orientations * plane, 1, per_block):
        nb, nc = b1 - b0, c1 - c0
        ib = idx[b0:b1, c0:c1].reshape(-1).long()
        gb = grad_out[b0:b1, c0:c1].reshape(-1)
        if need_x:
            rows = (torch.arange(nb * nc, device=dev) * length).view(nb, nc, 1, 1, 1)
            src = shift.index_select(0, ib).view(nb, nc, orientations, h, w) + (q + rows)
            gp = torch.zeros(nb * nc * length, dtype=grad_out.dtype, device=dev)
            gp.index_add_(0, src.view(-1), gb)
            body = gp.view(nb, nc, length)[:, :, :(orientations + 2 * ro) * plane].view(
                nb, nc, orientations + 2 * ro, hp, wp)[..., rh:rh + h, rw:rw + w]
            gx = grad_x[b0:b1, c0:c1]
            gx.copy_(body[:, :, ro:ro + orientations])
            if ro:
                gx[:, :, orientations - ro:] += body[:, :, :ro]
                gx[:, :, :ro] += body[:, :, ro + orientations:]
        if need_k:
            key = (ck[:, c0:c1] + ib.view(nb, nc, orientations, h, w)).view(-1)
            grad_k.index_add_(0, key, gb)
    if need_k:
        grad_k = grad_k.view(c, orientations, ko, kh, kw)
        if not erosion:
            grad_k = grad_k.neg_()
    return grad_x, grad_k


class _MorphConvM2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, erosion: bool, native: bool):
        with torch.no_grad():
            res = native_morph_forward(x, kernel, erosion, need_index=True) if native else None
            native = res is not None  # (None: NaN in x, the PyTorch path propagates it)
            out, idx = res if native else _morph_forward(x, kernel, erosion, need_index=True)
        ctx.erosion = erosion
        ctx.native = native
        ctx.x_shape = x.shape
        ctx.k_shape = kernel.shape
        ctx.save_for_backward(idx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        if ctx.native:
            grad_x, grad_k = native_morph_backward(grad_out, idx, ctx.k_shape, ctx.erosion,
                                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        else:
            grad_x, grad_k = _morph_backward(grad_out.contiguous(), idx, ctx.x_shape, ctx.k_shape, ctx.erosion,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_k, None, None


def morphological_convolution_m2(x: torch.Tensor, kernel: torch.Tensor, erosion: bool = False) -> torch.Tensor:
    """Max-plus (``erosion=False``) or min-plus (``erosion=True``) convolution on M2, per channel.

    ``dilation:  out[b,c,o,y,x] = max_{a,i,j} x[b, c, (o + a - kOr//2) mod Or, y + i - kH//2, x + j - kW//2]
    - kernel[c, o, a, i, j]``; erosion: ``min`` of ``x + kernel``. Offsets that fall outside the image are
    skipped (they do not compete); the orientation axis is periodic.

    Args:
        x: ``[B, C, Or, H, W]``.
        kernel: ``[C, Or, kOr, kH, kW]`` (odd sizes, ``kOr <= Or``): the kernel seen from each output orientation's
            own frame (see :func:`m2_morphological_kernel`).

    Without autograd (inference) a running maximum over the offsets on cache-sized blocks; with autograd one block
    of candidates at a time plus a ``uint8`` arg-max index for the backward pass (see the module docstring).
    Memory: the output, the padded copy (at most about the output's size), the index (autograd only) and block
    buffers (at most ``max(output size, 2^18)`` values); no unfold of the whole input. Gradients (w.r.t. ``x`` and
    ``kernel``) go to the winning offset (the lowest flat offset ``(a * kH + i) * kW + j`` on exact ties).
    Not twice differentiable.
    """
    _check_m2(x, 'morphological_convolution_m2')
    b, c, orientations, h, w = x.shape
    if kernel.dim() != 5 or kernel.shape[0] != c or kernel.shape[1] != orientations:
        raise ValueError(f"morphological_convolution_m2: kernel must be [C={c}, Or={orientations}, kOr, kH, kW], "
                         f"got {tuple(kernel.shape)}")
    ko, kh, kw = kernel.shape[-3:]
    if not (ko % 2 and kh % 2 and kw % 2):
        raise ValueError(f"morphological_convolution_m2: kernel sizes must be odd, got {(ko, kh, kw)}")
    if ko > orientations:
        raise ValueError(f"morphological_convolution_m2: the orientation kernel size {ko} exceeds Or={orientations}; "
                         f"offsets would wrap onto each other. Use kOr <= Or.")
    kernel = kernel.to(x.dtype)
    native = use_native(x, kernel)
    if torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad):
        return _MorphConvM2.apply(x, kernel, bool(erosion), native)
    res = native_morph_forward(x, kernel, bool(erosion), need_index=False) if native else None
    if res is not None:
        return res[0]
    return _morph_forward_loop(x, kernel, bool(erosion))


def morphological_convolution_m2_blocks(x: torch.Tensor, kernel: torch.Tensor, erosion: bool = False
                                        ) -> torch.Tensor:
    """The same values as :func:`morphological_convolution_m2`, computed the way its autograd path's forward does
    (one block of all offsets' candidates, then one ``amax``), without keeping the arg-max index and without
    autograd. Shapes as there. Kept public to measure it against the inference path (``benchmarks/bench_pde.py``).
    """
    _check_m2(x, 'morphological_convolution_m2_blocks')
    with torch.no_grad():
        return _morph_forward(x, kernel.to(x.dtype), bool(erosion), need_index=False)[0]


def morphological_convolution_m2_reference(x: torch.Tensor, kernel: torch.Tensor, erosion: bool = False
                                           ) -> torch.Tensor:
    """Brute-force reference of :func:`morphological_convolution_m2` (same arguments, same values): every offset's
    candidates stacked, then one ``amax`` (``amin``). O(output x kernel) memory: for tests and benchmarks."""
    b, c, orientations, h, w = x.shape
    ko, kh, kw = kernel.shape[-3:]
    fill = float('inf') if erosion else float('-inf')
    xp = F.pad(x.flatten(1, 2), (kw // 2, kw // 2, kh // 2, kh // 2), value=fill).unflatten(1, (c, orientations))
    cands = []
    for a in range(ko):
        xr = torch.roll(xp, -(a - ko // 2), dims=2)
        for i in range(kh):
            for j in range(kw):
                kv = kernel[:, :, a, i, j].view(1, c, orientations, 1, 1)
                v = xr[..., i:i + h, j:j + w]
                cands.append(v + kv if erosion else v - kv)
    st = torch.stack(cands, 0)
    return st.amin(0) if erosion else st.amax(0)


def morphological_convolution_r2(x: torch.Tensor, kernel: torch.Tensor, erosion: bool = False) -> torch.Tensor:
    """Max-plus (``erosion=False``) or min-plus (``erosion=True``) convolution on R2, per channel.

    ``dilation: out[b,c,y,x] = max_{i,j} x[b, c, y + i - kH//2, x + j - kW//2] - kernel[c, i, j]``; erosion: ``min``
    of ``x + kernel`` (LieTorch's ``morphological_convolution_r2`` is this erosion). Offsets outside the image do
    not compete. ``x [B, C, H, W]``, ``kernel [C, kH, kW]`` (odd sizes) -> ``[B, C, H, W]``.

    The M2 engine with one orientation (:func:`morphological_convolution_m2` on ``[B, C, 1, H, W]``): the same
    compiled operator, memory and gradient rules (to the arg-max, lowest flat offset ``i * kW + j`` on ties).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"morphological_convolution_r2: expected an R2 feature map [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                         + (" (an M2 map? use morphological_convolution_m2)"
                            if isinstance(x, torch.Tensor) and x.dim() == 5 else ''))
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 3 or kernel.shape[0] != x.shape[1]:
        raise ValueError(f"morphological_convolution_r2: kernel must be [C={x.shape[1]}, kH, kW], got "
                         f"{tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__}")
    return morphological_convolution_m2(x.unsqueeze(2), kernel[:, None, None], erosion).squeeze(2)
