"""Training losses of the three tasks and the per-batch statistics the loop reports.

* ``classify``: cross-entropy (optional label smoothing); statistic: top-1 errors.
* ``keypoints``: heatmap models ``[B, K, h, w]`` train with the spatial-softmax cross-entropy
  (:func:`gequiv_timm.layers.rcn.heatmap_cross_entropy`), coordinate models (``[B, K, 2]`` pixels or ``[B, 2K]``
  normalised) with a smooth-L1 loss on visible keypoints; statistic: the NME of :mod:`gequiv_timm.metrics`
  (per sample first, then over samples), summed over the batch with the number of samples scored.
* ``segment``: dense class logits ``[B, C, H, W]`` against class-index masks ``[B, H, W]`` train with the soft Dice
  loss (:func:`dice_loss`, as LieTorch's DRIVE experiments do); statistic: ``[2 TP, 2 TP + FP + FN]`` of the
  arg-max prediction over the foreground classes, whose sums over batches divide into the Dice of the whole set.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..layers.rcn import decode_heatmaps, heatmap_cross_entropy
from ..metrics import per_sample_nme

__all__ = ['keypoint_outputs', 'batch_loss', 'nme_sums', 'dice_loss', 'dice_sums']


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


def _check_segment(logits: torch.Tensor, target: torch.Tensor, owner: str) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0] or \
            logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"{owner}: expected class logits [B, C, H, W] and a mask [B, H, W] of the same B, H, W, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}; use a dense-prediction model (output at "
                         f"input resolution, e.g. gequiv_pde_seg6)")
    if logits.shape[1] < 2:
        raise ValueError(f"{owner}: need at least 2 classes (background and a foreground), got {logits.shape[1]}; "
                         f"create the model with num_classes=2")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of class logits ``[B, C, H, W]`` against class indices ``[B, H, W]``.

    With ``p_c = softmax(logits)_c`` and ``t_c = [target == c]``, summed over the batch and the pixels:
    ``1 - mean_{c >= 1} (2 sum p_c t_c + smooth) / (sum p_c + sum t_c + smooth)`` (the foreground classes only: for
    two classes, the binary Dice loss of the foreground probability, as ``lietorch.nn.loss.DiceLoss`` applies it to a
    sigmoid output). ``smooth`` keeps an empty foreground finite.

    Example:
        >>> t = torch.tensor([[[1, 0], [0, 0]]])
        >>> perfect = torch.stack([(t == 0).float(), (t == 1).float()], 1) * 50
        >>> round(float(dice_loss(perfect, t, smooth=0.0)), 4)
        0.0
    """
    _check_segment(logits, target, 'dice_loss')
    p = logits.float().softmax(1)[:, 1:]
    t = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(p.dtype)
    inter = (p * t).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + t.sum((0, 2, 3))
    return 1 - ((2 * inter + smooth) / (denom + smooth)).mean()


def dice_sums(logits: torch.Tensor, target: torch.Tensor) -> List[float]:
    """``[2 TP, 2 TP + FP + FN]`` of the arg-max prediction, summed over the foreground classes (sums over batches
    divide into the pooled Dice; the ratio is the mean Dice over classes only for one foreground class)."""
    pred = logits.detach().argmax(1)
    num = den = 0.0
    for c in range(1, logits.shape[1]):
        p, t = pred == c, target == c
        num += 2.0 * float((p & t).sum())
        den += float(p.sum()) + float(t.sum())
    return [num, den]


def batch_loss(task: str, model_out: torch.Tensor, batch: Sequence[torch.Tensor], k: int = 0,
               smoothing: float = 0.0):
    """``(loss, [statistic sum, count])``: top-1 errors and samples (classify), summed per-sample NME and
    samples scored (keypoints; ``batch = (x, keypoints, visible, norm)``), or the Dice sums of :func:`dice_sums`
    (segment; ``batch = (x, mask)``, loss :func:`dice_loss`)."""
    if task == 'classify':
        y = batch[1]
        loss = F.cross_entropy(model_out.float(), y, label_smoothing=smoothing)
        return loss, [float((model_out.argmax(1) != y).sum()), float(len(y))]
    if task == 'keypoints':
        return _keypoint_loss(model_out, batch, k)
    if task == 'segment':
        y = batch[1]
        return dice_loss(model_out, y), dice_sums(model_out, y)
    raise ValueError(f"task must be 'classify', 'keypoints' or 'segment', got {task!r}")
