"""Keypoint metrics as the landmark field reports them (HRNet's facial-landmark definitions), and segmentation
metrics as the PDE-G-CNN paper reports them for vessel segmentation (Dice, AUC, accuracy; bottom of this module).

For sample ``n`` with predicted / true keypoints ``p_nk, g_nk`` (pixels), a visibility mask ``V_n`` and a
normalising distance ``d_n`` (inter-ocular distance for faces, box size ``sqrt(w h)`` for AFLW and for our MNIST
landmarks):

.. math::

    \\mathrm{NME}_n = \\frac{1}{|V_n|} \\sum_{k \\in V_n} \\frac{\\lVert p_{nk} - g_{nk} \\rVert_2}{d_n}

The reported **NME** is the mean of ``NME_n`` over samples with at least one visible keypoint (samples with none
are left out, and counted in ``n_skipped``): per image first, then over images, as the Recombinator Networks paper
(Honari et al. 2016, normalised by the inter-ocular distance) and HRNet report it. This is the package's one NME:
training (``gequiv_timm.training.evaluate``, the ``train_nme`` / ``eval_nme`` of the metrics log) and the manifest's
``test_nme`` use it. (Before issue 14 training averaged over all visible keypoints of the set at once, which weighs
an image by its number of visible keypoints; the two agree when every keypoint is visible.) The **failure rate** at ``alpha`` is the fraction of those samples
with ``NME_n > alpha``. The **cumulative error distribution** is ``CED(t) = #{n : NME_n <= t} / N`` and

.. math:: \\mathrm{AUC}_\\alpha = \\frac{1}{\\alpha} \\int_0^\\alpha \\mathrm{CED}(t)\\, dt
          = \\frac{1}{N} \\sum_n \\max\\big(0,\\ 1 - \\mathrm{NME}_n / \\alpha\\big),

the closed form being exact for the step-function CED (common implementations integrate a sampled curve with
Simpson's or the trapezoid rule and agree to the sampling step). Everything is a fraction in [0, 1]; multiply by
100 for the percentages papers print.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch

__all__ = ['per_sample_nme', 'nme', 'failure_rate', 'auc', 'ced_curve', 'KeypointMetrics', 'keypoint_metrics',
           'dice_score', 'roc_auc', 'roc_auc_from_histograms', 'score_histograms', 'AUC_BINS', 'SegmentationMetrics',
           'segmentation_metrics']


def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected real numbers, got dtype {t.dtype}")
    return t.double()


def per_sample_nme(pred, target, norm, visible=None) -> torch.Tensor:
    """``NME_n`` for every sample: ``pred, target [N, K, 2]``, ``norm [N]`` (or a scalar), ``visible [N, K]``.

    Returns ``[N]`` (float64); NaN for a sample with no visible keypoint.
    """
    p, g = _as_tensor(pred, 'pred'), _as_tensor(target, 'target')
    if p.shape != g.shape or p.dim() != 3 or p.shape[-1] != 2:
        raise ValueError(f"per_sample_nme: pred and target must both be [N, K, 2], got {tuple(p.shape)} and "
                         f"{tuple(g.shape)}")
    n, k, _ = p.shape
    d = _as_tensor(norm, 'norm')
    d = d.expand(n) if d.dim() == 0 else d
    if tuple(d.shape) != (n,):
        raise ValueError(f"per_sample_nme: norm must be a scalar or [N={n}], got {tuple(d.shape)}")
    if (d <= 0).any():
        raise ValueError("per_sample_nme: every normalising distance must be > 0 (got "
                         f"{int((d <= 0).sum())} non-positive); check the box sizes / inter-ocular distances")
    v = torch.ones(n, k, dtype=torch.bool) if visible is None else torch.as_tensor(visible).bool()
    if tuple(v.shape) != (n, k):
        raise ValueError(f"per_sample_nme: visible must be [N={n}, K={k}], got {tuple(v.shape)}")
    err = torch.linalg.vector_norm(p - g, dim=-1)
    err = torch.where(v, err, torch.zeros_like(err))
    cnt = v.sum(1)
    out = err.sum(1) / cnt.clamp_min(1) / d
    return torch.where(cnt > 0, out, torch.full_like(out, float('nan')))


def _valid(errors) -> torch.Tensor:
    e = _as_tensor(errors, 'errors').flatten()
    return e[~torch.isnan(e)]


def nme(errors) -> float:
    """Mean of per-sample NMEs (NaNs, i.e. samples with no visible keypoint, left out)."""
    e = _valid(errors)
    if e.numel() == 0:
        raise ValueError("nme: no sample has a visible keypoint")
    return float(e.mean())


def failure_rate(errors, threshold: float = 0.1) -> float:
    """Fraction of samples with ``NME_n > threshold`` (NaNs left out)."""
    e = _valid(errors)
    if e.numel() == 0:
        raise ValueError("failure_rate: no sample has a visible keypoint")
    return float((e > threshold).double().mean())


def auc(errors, threshold: float = 0.1) -> float:
    """Area under the CED curve on ``[0, threshold]``, divided by ``threshold`` (exact for the step CED)."""
    if not threshold > 0:
        raise ValueError(f"auc: threshold must be > 0, got {threshold!r}")
    e = _valid(errors)
    if e.numel() == 0:
        raise ValueError("auc: no sample has a visible keypoint")
    return float((1 - e / threshold).clamp_min(0).mean())


def ced_curve(errors, threshold: float = 0.1, steps: int = 1001) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(t [steps], CED(t) [steps])`` on ``linspace(0, threshold, steps)``, for plotting."""
    e = _valid(errors)
    t = torch.linspace(0, threshold, steps, dtype=torch.float64)
    return t, (e[None, :] <= t[:, None]).double().mean(1)


@dataclass
class KeypointMetrics:
    """NME, FR@alpha and AUC@alpha (fractions), the threshold, the number of samples scored and skipped."""

    nme: float
    failure_rate: float
    auc: float
    threshold: float
    n: int
    n_skipped: int

    def as_dict(self) -> Dict:
        return asdict(self)


def keypoint_metrics(pred, target, norm, visible=None, threshold: float = 0.1) -> KeypointMetrics:
    """All three metrics at once (see the module docstring).

    Example:
        >>> g = torch.zeros(2, 1, 2); p = torch.tensor([[[0.5, 0.0]], [[0.0, 3.0]]])
        >>> m = keypoint_metrics(p, g, norm=torch.tensor([10.0, 10.0]))
        >>> round(m.nme, 3), m.failure_rate, round(m.auc, 3)
        (0.175, 0.5, 0.25)
    """
    e = per_sample_nme(pred, target, norm, visible)
    ok = ~torch.isnan(e)
    return KeypointMetrics(nme(e), failure_rate(e, threshold), auc(e, threshold), threshold, int(ok.sum()),
                           int((~ok).sum()))


# ----------------------------------------------------------------------------------------------------------------
# segmentation (Smets et al. 2022 report Dice, AUC and accuracy for DRIVE)
# ----------------------------------------------------------------------------------------------------------------
# For a binary segmentation with predicted foreground ``P`` and true foreground ``T`` (sets of pixels, pooled over
# every image of the evaluated set):
#
#   Dice     = 2 |P & T| / (|P| + |T|) = 2 TP / (2 TP + FP + FN)        (1 when both are empty)
#   accuracy = (TP + TN) / number of pixels
#   AUC      = P(s_fg > s_bg) + P(s_fg = s_bg) / 2, the area under the ROC curve of the foreground score s over all
#              pixels (the Mann-Whitney statistic; ties count one half), computed exactly by ranks.
#
# With several classes the Dice and AUC are the means over the foreground classes (1..C-1, one-vs-rest).

#: bins of the foreground probability in the training loop's AUC (:func:`roc_auc_from_histograms`), which
#: sums histograms over batches and processes: the AUC of the scores rounded down to multiples of 1 / AUC_BINS
AUC_BINS = 4096


def dice_score(pred, target) -> float:
    """Dice of two binary masks of the same shape (any number of images pooled): ``2 |P & T| / (|P| + |T|)``;
    1.0 when both are empty.

    Example:
        >>> dice_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]))
        0.5
    """
    p, t = torch.as_tensor(pred).bool(), torch.as_tensor(target).bool()
    if p.shape != t.shape:
        raise ValueError(f"dice_score: pred and target must have the same shape, got {tuple(p.shape)} and "
                         f"{tuple(t.shape)}")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def roc_auc(scores, labels) -> float:
    """Exact area under the ROC curve of ``scores`` for binary ``labels`` (same shape, pooled): the probability
    that a random positive scores above a random negative, ties counting one half (average ranks).

    Example:
        >>> roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    s = _as_tensor(scores, 'scores').flatten()
    y = torch.as_tensor(labels).flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: scores and labels must have the same number of elements, got {s.numel()} and "
                         f"{y.numel()}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    # average rank (1-based) of each group of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s)
    ranks[order] = avg[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def score_histograms(scores, labels, bins: int = AUC_BINS) -> torch.Tensor:
    """``[2, bins]`` counts of ``scores`` in ``[0, 1]`` (bin ``floor(s * bins)``, 1.0 in the last bin) for the
    negatives (row 0) and the positives (row 1): additive over batches and processes."""
    s = torch.as_tensor(scores).flatten().double().clamp(0, 1)
    y = torch.as_tensor(labels).flatten().bool()
    idx = (s * bins).long().clamp_max(bins - 1) + y.long() * bins
    return torch.bincount(idx, minlength=2 * bins).view(2, bins).double()


def roc_auc_from_histograms(hist) -> float:
    """The AUC (ties one half) of binned scores from :func:`score_histograms` counts ``[2, bins]``: exact for the
    binned scores, i.e. :func:`roc_auc` of ``floor(s * bins)``."""
    h = torch.as_tensor(hist, dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] != 2:
        raise ValueError(f"roc_auc_from_histograms: expected counts [2, bins], got {tuple(h.shape)}")
    neg, pos = h[0], h[1]
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc_from_histograms: needs both classes, got {n_pos:g} positives and {n_neg:g} "
                         f"negatives")
    below = torch.cumsum(neg, 0) - neg  # negatives in lower bins
    return float((pos * (below + neg / 2)).sum()) / (n_pos * n_neg)


@dataclass
class SegmentationMetrics:
    """Dice, AUC and pixel accuracy (fractions) pooled over the evaluated pixels, and the number of pixels."""

    dice: float
    auc: float
    accuracy: float
    pixels: int

    def as_dict(self) -> Dict:
        return asdict(self)


def segmentation_metrics(probs, target) -> SegmentationMetrics:
    """Metrics of class probabilities ``probs [N, C, H, W]`` (softmax outputs) against ``target [N, H, W]`` class
    indices: Dice of the arg-max prediction and exact AUC of the class probability, both averaged over the
    foreground classes ``1..C-1``, and pixel accuracy of the arg-max (see the comment above).

    Example:
        >>> p1 = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])            # P(stroke) of one 2x2 image
        >>> m = segmentation_metrics(torch.stack([1 - p1, p1], 1), torch.tensor([[[1, 0], [0, 0]]]))
        >>> round(m.dice, 3), m.auc, m.accuracy
        (0.667, 1.0, 0.75)
    """
    p = torch.as_tensor(probs)
    t = torch.as_tensor(target).long()
    if p.dim() != 4 or t.shape != (p.shape[0],) + tuple(p.shape[2:]):
        raise ValueError(f"segmentation_metrics: expected probs [N, C, H, W] and target [N, H, W], got "
                         f"{tuple(p.shape)} and {tuple(t.shape)}")
    if p.shape[1] < 2:
        raise ValueError(f"segmentation_metrics: need at least 2 classes (background and a foreground), got "
                         f"{p.shape[1]}")
    pred = p.argmax(1)
    fg = range(1, p.shape[1])
    dice = sum(dice_score(pred == c, t == c) for c in fg) / len(fg)
    auc_v = sum(roc_auc(p[:, c], t == c) for c in fg) / len(fg)
    return SegmentationMetrics(dice, auc_v, float((pred == t).double().mean()), int(t.numel()))
