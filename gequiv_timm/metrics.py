"""Keypoint metrics as the landmark field reports them (HRNet's facial-landmark definitions).

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

__all__ = ['per_sample_nme', 'nme', 'failure_rate', 'auc', 'ced_curve', 'KeypointMetrics', 'keypoint_metrics']


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
