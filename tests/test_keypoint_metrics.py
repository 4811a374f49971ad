"""NME, failure rate and AUC of the CED curve on hand-computed cases."""
import math

import pytest
import torch

from gequiv_timm.metrics import auc, ced_curve, failure_rate, keypoint_metrics, nme, per_sample_nme


def test_per_sample_nme_hand_case():
    gt = torch.zeros(2, 2, 2)
    pred = torch.tensor([[[3.0, 4.0], [0.0, 1.0]],    # errors 5 and 1 -> mean 3, / norm 10 -> 0.3
                         [[0.0, 0.0], [6.0, 8.0]]])   # errors 0 and 10 -> mean 5, / norm 50 -> 0.1
    e = per_sample_nme(pred, gt, torch.tensor([10.0, 50.0]))
    assert e.tolist() == pytest.approx([0.3, 0.1])
    # masking: only visible keypoints count, in numerator and denominator
    e = per_sample_nme(pred, gt, torch.tensor([10.0, 50.0]), visible=torch.tensor([[True, False], [False, True]]))
    assert e.tolist() == pytest.approx([0.5, 0.2])
    # a sample with nothing visible is NaN and left out of the means
    e = per_sample_nme(pred, gt, 10.0, visible=torch.tensor([[False, False], [True, True]]))
    assert math.isnan(e[0]) and e[1].item() == pytest.approx(0.5)
    assert nme(e) == pytest.approx(0.5)


def test_failure_rate_and_auc_hand_case():
    errors = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.3], dtype=torch.float64)  # float32 0.1 is > 0.1 in float64
    assert nme(errors) == pytest.approx(0.094)
    # failure is strictly above the threshold: 0.1 is not a failure
    assert failure_rate(errors, 0.1) == pytest.approx(1 / 5)
    assert failure_rate(errors, 0.04) == pytest.approx(3 / 5)
    # AUC@0.1 = mean(max(0, 1 - e / 0.1)) = (1 + 0.8 + 0.5 + 0 + 0) / 5
    assert auc(errors, 0.1) == pytest.approx(2.3 / 5)


def test_auc_equals_the_integral_of_the_sampled_ced():
    g = torch.Generator().manual_seed(0)
    errors = torch.rand(500, generator=g, dtype=torch.float64) * 0.15
    t, ced = ced_curve(errors, 0.1, steps=20001)
    trapz = torch.trapezoid(ced, t).item() / 0.1
    assert auc(errors, 0.1) == pytest.approx(trapz, abs=1e-3)
    assert ced[0] == 0 and ced[-1] == pytest.approx((errors <= 0.1).double().mean().item())
    assert (ced[1:] >= ced[:-1]).all()


def test_extremes():
    assert auc(torch.zeros(10)) == 1.0 and failure_rate(torch.zeros(10)) == 0.0
    big = torch.full((10,), 0.5)
    assert auc(big) == 0.0 and failure_rate(big) == 1.0


def test_keypoint_metrics_bundle():
    gt = torch.zeros(4, 3, 2)
    pred = torch.zeros(4, 3, 2)
    pred[1, :, 0] = 2.0      # error 2 on every point, norm 40 -> 0.05
    pred[2, 0, 1] = 30.0     # error 30 on one of three, norm 40 -> 0.25
    vis = torch.ones(4, 3, dtype=torch.bool)
    vis[3] = False           # skipped
    m = keypoint_metrics(pred, gt, torch.full((4,), 40.0), vis, threshold=0.1)
    assert m.n == 3 and m.n_skipped == 1
    assert m.nme == pytest.approx((0 + 0.05 + 0.25) / 3)
    assert m.failure_rate == pytest.approx(1 / 3)
    assert m.auc == pytest.approx((1 + 0.5 + 0) / 3)
    assert set(m.as_dict()) == {'nme', 'failure_rate', 'auc', 'threshold', 'n', 'n_skipped'}


def test_metric_errors_are_clear():
    with pytest.raises(ValueError, match=r'\[N, K, 2\]'):
        per_sample_nme(torch.zeros(2, 3), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match='> 0'):
        per_sample_nme(torch.zeros(2, 1, 2), torch.zeros(2, 1, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match='no sample'):
        nme(torch.tensor([float('nan')]))
    with pytest.raises(ValueError, match=r'visible must be \[N=2, K=1\]'):
        per_sample_nme(torch.zeros(2, 1, 2), torch.zeros(2, 1, 2), 1.0, visible=torch.ones(2, 2))
