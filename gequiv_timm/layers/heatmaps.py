"""Keypoint heatmaps, functional: encoding keypoints as cells and one-hot maps, the per-location softmax and its
cross-entropy, decoding (arg-max and soft-arg-max), and the corruption and joint scoring of the denoising model.

The heads that produce the heatmaps are in :mod:`gequiv_timm.layers.rcn` (which re-exports everything here); the
maths of the heads and of the denoising / joint models is in its docstring.

Coordinates: a keypoint is ``(x, y)`` in input pixels, ``x`` to the right and ``y`` down, with the *centre* of
pixel ``(row i, col j)`` at ``(x, y) = (j, i)``; an ``H x W`` image covers ``[-0.5, W - 0.5) x [-0.5, H - 0.5)``.
A heatmap at stride ``s`` has cell ``(i, j)`` covering input pixels ``[s j, s j + s)`` horizontally, so its centre
is at ``x = s j + (s - 1) / 2``; a keypoint falls into cell ``floor((x + 0.5) / s)``.

"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .checks import check_float_tensor

__all__ = [
    'spatial_softmax', 'spatial_log_softmax', 'keypoints_to_cells', 'keypoints_to_onehot', 'heatmap_cross_entropy',
    'argmax_keypoints', 'soft_argmax_keypoints', 'decode_heatmaps', 'corrupt_keypoints', 'joint_log_probs',
]


def _check_heatmaps(logits: torch.Tensor, name: str) -> None:
    check_float_tensor(logits, name, 'heatmap logits [B, K, H, W]')
    if logits.dim() != 4:
        raise ValueError(f"{name}: expected heatmap logits [B, K, H, W], got {tuple(logits.shape)}")


def _check_keypoints(keypoints: torch.Tensor, logits_shape, name: str) -> None:
    b, k = logits_shape[:2]
    if not isinstance(keypoints, torch.Tensor) or tuple(keypoints.shape) != (b, k, 2):
        shape = tuple(keypoints.shape) if isinstance(keypoints, torch.Tensor) else type(keypoints).__name__
        raise ValueError(f"{name}: expected keypoints [B={b}, K={k}, 2] as (x, y) pixel coordinates, got {shape}")


def _check_stride(stride: int, name: str) -> None:
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"{name}: stride must be a positive int (input pixels per heatmap cell), got {stride!r}")


# ----------------------------------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------------------------------
def spatial_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the ``H*W`` locations of each keypoint map: ``[B, K, H, W] -> [B, K, H, W]``, each map sums to 1.

    Example:
        >>> p = spatial_softmax(torch.randn(2, 5, 8, 8))
        >>> torch.allclose(p.sum((-2, -1)), torch.ones(2, 5))
        True
    """
    _check_heatmaps(logits, 'spatial_softmax')
    return logits.flatten(2).softmax(-1).view_as(logits)


def spatial_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log`` of :func:`spatial_softmax`, computed stably: ``[B, K, H, W] -> [B, K, H, W]``."""
    _check_heatmaps(logits, 'spatial_log_softmax')
    return logits.flatten(2).log_softmax(-1).view_as(logits)


def keypoints_to_cells(keypoints: torch.Tensor, size: Tuple[int, int], stride: int = 1,
                       visible: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Discretise ``(x, y)`` pixel keypoints ``[B, K, 2]`` onto an ``H x W`` heatmap at ``stride``.

    Returns ``(index [B, K] long, valid [B, K] bool)``: ``index = row * W + col`` of the cell holding each keypoint
    (0 where invalid), ``valid`` is False where ``visible`` is False, a coordinate is not finite, or the keypoint
    falls outside the ``H*stride x W*stride`` image.
    """
    _check_stride(stride, 'keypoints_to_cells')
    h, w = int(size[0]), int(size[1])
    if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints_to_cells: expected keypoints [B, K, 2] (x, y), got {tuple(keypoints.shape)}")
    finite = torch.isfinite(keypoints).all(-1)
    kp = torch.where(finite[..., None], keypoints, torch.zeros_like(keypoints))
    col = torch.floor((kp[..., 0] + 0.5) / stride).long()
    row = torch.floor((kp[..., 1] + 0.5) / stride).long()
    valid = finite & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    if visible is not None:
        if tuple(visible.shape) != tuple(keypoints.shape[:2]):
            raise ValueError(f"keypoints_to_cells: visible must be [B, K] = {tuple(keypoints.shape[:2])}, "
                             f"got {tuple(visible.shape)}")
        valid = valid & visible.bool()
    index = torch.where(valid, row * w + col, torch.zeros_like(col))
    return index, valid


def keypoints_to_onehot(keypoints: torch.Tensor, size: Tuple[int, int], stride: int = 1,
                        visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-hot keypoint maps ``[B, K, H, W]`` (1 at each valid keypoint's cell, all-zero maps for invalid ones):
    the input of the denoising keypoint model."""
    index, valid = keypoints_to_cells(keypoints, size, stride, visible)
    b, k = index.shape
    out = torch.zeros(b, k, int(size[0]) * int(size[1]), dtype=torch.float32, device=keypoints.device)
    out.scatter_(2, index[..., None], valid[..., None].float())
    return out.view(b, k, int(size[0]), int(size[1]))


def heatmap_cross_entropy(logits: torch.Tensor, keypoints: torch.Tensor, visible: Optional[torch.Tensor] = None,
                          stride: int = 1, reduction: str = 'mean') -> torch.Tensor:
    """Cross-entropy of the true (discretised) keypoint location under the spatial softmax of ``logits``.

    .. math:: \\mathcal{L} = -\\frac{1}{|V|} \\sum_{(b, k) \\in V} \\log p_{bk}(c_{bk})

    over the valid keypoints ``V`` (visible and inside the image, see :func:`keypoints_to_cells`).

    Args:
        logits: ``[B, K, H, W]`` heatmap logits at ``stride`` input pixels per cell.
        keypoints: ``[B, K, 2]`` true ``(x, y)`` in input pixels.
        visible: optional ``[B, K]`` bool; False masks a keypoint out.
        reduction: ``'mean'`` (over valid keypoints; 0 with a live graph when there are none), ``'sum'``, or
            ``'none'`` (``[B, K]``, zeros where invalid).
    """
    _check_heatmaps(logits, 'heatmap_cross_entropy')
    _check_keypoints(keypoints, logits.shape, 'heatmap_cross_entropy')
    if reduction not in ('mean', 'sum', 'none'):
        raise ValueError(f"heatmap_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    index, valid = keypoints_to_cells(keypoints, logits.shape[-2:], stride, visible)
    logp = logits.flatten(2).log_softmax(-1)
    nll = -logp.gather(2, index[..., None]).squeeze(-1) * valid.to(logp.dtype)
    if reduction == 'none':
        return nll
    if reduction == 'sum':
        return nll.sum()
    return nll.sum() / valid.sum().clamp_min(1).to(logp.dtype)


def _cell_centres(n: int, stride: int, dtype, device) -> torch.Tensor:
    return torch.arange(n, dtype=dtype, device=device) * stride + (stride - 1) / 2.0


def argmax_keypoints(logits: torch.Tensor, stride: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode by argmax: ``[B, K, H, W] -> (coords [B, K, 2] (x, y) input pixels, confidence [B, K])``.

    The coordinate is the centre of the most probable cell; the confidence is its softmax probability.
    """
    _check_heatmaps(logits, 'argmax_keypoints')
    _check_stride(stride, 'argmax_keypoints')
    w = logits.shape[-1]
    p = logits.flatten(2).softmax(-1)
    conf, idx = p.max(-1)
    row, col = idx // w, idx % w
    coords = torch.stack([col, row], -1).to(logits.dtype) * stride + (stride - 1) / 2.0
    return coords, conf


def soft_argmax_keypoints(logits: torch.Tensor, stride: int = 1, window: Optional[int] = 5,
                          temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel decoding by the expected location under the spatial softmax.

    With ``window=None`` the expectation runs over the whole map (differentiable, but pulled towards the centre
    when the distribution is broad or multi-modal). With an odd ``window = w`` it runs over the ``w x w`` cells
    around the argmax, renormalised (the usual local soft-argmax; robust to a second mode far away).

    Returns ``(coords [B, K, 2] (x, y) in input pixels, confidence [B, K])``; the confidence is the probability
    of the argmax cell, as in :func:`argmax_keypoints`.
    """
    _check_heatmaps(logits, 'soft_argmax_keypoints')
    _check_stride(stride, 'soft_argmax_keypoints')
    if not temperature > 0:
        raise ValueError(f"soft_argmax_keypoints: temperature must be > 0, got {temperature!r}")
    b, k, h, w = logits.shape
    p = (logits / temperature).flatten(2).softmax(-1).view(b, k, h, w)
    ys = _cell_centres(h, stride, logits.dtype, logits.device)
    xs = _cell_centres(w, stride, logits.dtype, logits.device)
    conf = logits.flatten(2).softmax(-1).max(-1).values
    if window is None:
        x = (p.sum(-2) * xs).sum(-1)
        y = (p.sum(-1) * ys).sum(-1)
        return torch.stack([x, y], -1), conf
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"soft_argmax_keypoints: window must be None or an odd positive int, got {window!r}")
    idx = p.flatten(2).argmax(-1)
    r0, c0 = idx // w, idx % w
    off = torch.arange(window, device=logits.device) - window // 2
    rows = r0[..., None] + off  # [B, K, win]
    cols = c0[..., None] + off
    rin = (rows >= 0) & (rows < h)
    cin = (cols >= 0) & (cols < w)
    rows_c, cols_c = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    flat = rows_c[..., :, None] * w + cols_c[..., None, :]  # [B, K, win, win]
    mass = p.flatten(2).gather(2, flat.flatten(2)).view(b, k, window, window)
    mass = mass * (rin[..., :, None] & cin[..., None, :]).to(mass.dtype)
    mass = mass / mass.sum((-2, -1), keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    x = (mass.sum(-2) * (cols_c.to(logits.dtype) * stride + (stride - 1) / 2.0)).sum(-1)
    y = (mass.sum(-1) * (rows_c.to(logits.dtype) * stride + (stride - 1) / 2.0)).sum(-1)
    return torch.stack([x, y], -1), conf


def decode_heatmaps(logits: torch.Tensor, method: str = 'soft_argmax', stride: int = 1,
                    window: Optional[int] = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``method='argmax'`` (:func:`argmax_keypoints`) or ``'soft_argmax'`` (:func:`soft_argmax_keypoints`)."""
    if method == 'argmax':
        return argmax_keypoints(logits, stride)
    if method == 'soft_argmax':
        return soft_argmax_keypoints(logits, stride, window)
    raise ValueError(f"decode_heatmaps: method must be 'argmax' or 'soft_argmax', got {method!r}")


def corrupt_keypoints(keypoints: torch.Tensor, image_size: Tuple[int, int], fraction: float = 0.35,
                      visible: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Move a random ``fraction`` of the keypoints to uniformly random pixel centres of an ``H x W`` image.

    The training input of the denoising keypoint model. Each (sample, keypoint) is moved independently with
    probability ``fraction``. Returns ``(corrupted [B, K, 2], moved [B, K] bool)``; invalid keypoints (not
    ``visible``) are left as they are and never counted as moved.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corrupt_keypoints: fraction must be in [0, 1], got {fraction!r}")
    if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"corrupt_keypoints: expected keypoints [B, K, 2] (x, y), got {tuple(keypoints.shape)}")
    b, k, _ = keypoints.shape
    h, w = int(image_size[0]), int(image_size[1])
    dev = keypoints.device
    moved = torch.rand(b, k, generator=generator) < fraction
    rx = torch.randint(0, w, (b, k), generator=generator).to(keypoints.dtype)
    ry = torch.randint(0, h, (b, k), generator=generator).to(keypoints.dtype)
    moved = moved.to(dev)
    if visible is not None:
        moved = moved & visible.bool().to(dev)
    rnd = torch.stack([rx, ry], -1).to(dev)
    return torch.where(moved[..., None], rnd, keypoints), moved


def joint_log_probs(rcn_logits: torch.Tensor, denoiser_logits: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The joint model's log-distribution ``log_softmax(z_rcn + weight * z_den)`` per keypoint map.

    Equal to the renormalised product ``p_rcn * p_den ** weight``; ``weight=1`` is the paper's sum of pre-softmax
    values. Both inputs ``[B, K, H, W]`` of the same shape.
    """
    _check_heatmaps(rcn_logits, 'joint_log_probs')
    _check_heatmaps(denoiser_logits, 'joint_log_probs')
    if rcn_logits.shape != denoiser_logits.shape:
        raise ValueError(f"joint_log_probs: the RCN and denoiser maps must have the same shape, got "
                         f"{tuple(rcn_logits.shape)} and {tuple(denoiser_logits.shape)}; run the denoiser at the "
                         f"RCN's output resolution")
    return spatial_log_softmax(spatial_log_softmax(rcn_logits) + weight * spatial_log_softmax(denoiser_logits))
