"""Training losses of the two tasks and the per-batch statistics the loop reports.

* ``classify``: cross-entropy (optional label smoothing); statistic: top-1 errors.
* ``keypoints``: heatmap models ``[B, K, h, w]`` train with the spatial-softmax cross-entropy
  (:func:`gequiv_timm.layers.rcn.heatmap_cross_entropy`), coordinate models (``[B, K, 2]`` pixels or ``[B, 2K]``
  normalised) with a smooth-L1 loss on visible keypoints; statistic: the NME of :mod:`gequiv_timm.metrics`
  (per sample first, then over samples), summed over the batch with the number of samples scored.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..layers.rcn import decode_heatmaps, heatmap_cross_entropy
from ..metrics import per_sample_nme

__all__ = ['keypoint_outputs', 'batch_loss', 'nme_sums']


def keypoint_outputs(out: torch.Tensor, size: int, k: int) -> Tuple[str, torch.Tensor, int]:
    """``(kind, pred_pixels [B, K, 2], stride)`` from a model output on ``size x size`` images: heatmaps
    ``[B, K, h, w]``, pixels ``[B, K, 2]`` or normalised coordinates ``[B, 2K]`` in ``[-1, 1]`` (a classifier
    created with ``num_classes = 2K``)."""
    if out.dim() == 4 and out.shape[1] == k:
        stride = max(1, size // out.shape[-1])
        return 'heatmap', decode_heatmaps(out.float(), 'soft_argmax', stride)[0], stride
    if out.dim() == 3 and out.shape[1:] == (k, 2):
        return 'pixels', out.float(), 1
    if out.dim() == 2 and out.shape[1] == 2 * k:
        return 'normalised', (out.float().view(-1, k, 2) + 1) * (size / 2) - 0.5, 1
    raise ValueError(f"keypoint task: the model output has shape {tuple(out.shape)}; expected heatmaps "
                     f"[B, {k}, h, w], pixel coordinates [B, {k}, 2] or normalised coordinates [B, {2 * k}] "
                     f"(create the model with num_classes={2 * k})")


def nme_sums(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, norm: torch.Tensor) -> List[float]:
    """``[sum of NME_n, number of samples scored]`` (samples without a visible keypoint are not scored), so that
    sums over batches and processes divide into :func:`gequiv_timm.metrics.nme` of the whole set."""
    e = per_sample_nme(pred.detach(), target, norm.reshape(-1), visible)
    ok = ~torch.isnan(e)
    return [float(e[ok].sum()), float(ok.sum())]


def _keypoint_loss(model_out: torch.Tensor, batch: Sequence[torch.Tensor], k: int):
    x, kp, vis, norm = batch
    size = x.shape[-1]
    kind, pred, stride = keypoint_outputs(model_out, size, k)
    if kind == 'heatmap':
        loss = heatmap_cross_entropy(model_out.float(), kp, vis, stride)
    else:
        w = vis.float().unsqueeze(-1)
        loss = (F.smooth_l1_loss(pred / size, kp / size, reduction='none', beta=0.02) * w).sum() / \
            w.sum().clamp_min(1) / 2
    return loss, nme_sums(pred, kp, vis, norm)


def batch_loss(task: str, model_out: torch.Tensor, batch: Sequence[torch.Tensor], k: int = 0,
               smoothing: float = 0.0):
    """``(loss, [statistic sum, count])``: top-1 errors and samples (classify), or summed per-sample NME and
    samples scored (keypoints; ``batch = (x, keypoints, visible, norm)``)."""
    if task == 'classify':
        y = batch[1]
        loss = F.cross_entropy(model_out.float(), y, label_smoothing=smoothing)
        return loss, [float((model_out.argmax(1) != y).sum()), float(len(y))]
    if task == 'keypoints':
        return _keypoint_loss(model_out, batch, k)
    raise ValueError(f"task must be 'classify' or 'keypoints', got {task!r}")
