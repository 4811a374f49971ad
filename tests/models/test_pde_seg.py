"""Segmentation models (gequiv_timm/models/pde_seg.py), the Dice loss and the segmentation metrics: output shapes,
translation and rotation equivariance, parameter counts, the timm API bits, hand-computed Dice / AUC, the evaluation
of the 'segment' task, and a short training that lowers the Dice loss."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import gequiv_timm  # noqa: F401
from gequiv_timm.metrics import (
    AUC_BINS,
    dice_score,
    roc_auc,
    roc_auc_from_histograms,
    score_histograms,
    segmentation_metrics,
)
from gequiv_timm.training.loop import evaluate
from gequiv_timm.training.losses import batch_loss, dice_loss, dice_sums

SEG = ('gequiv_pde_seg6', 'gequiv_pde_seg12', 'gequiv_cnn_seg6', 'gequiv_p4_seg6')
EQUIVARIANT = ('gequiv_pde_seg6', 'gequiv_pde_seg12', 'gequiv_p4_seg6')
SMALL = dict(gequiv_pde_seg6=dict(widths=(3, 3, 3)), gequiv_pde_seg12=dict(widths=(3,) * 4),
             gequiv_cnn_seg6=dict(widths=(4, 4, 4), kernel_sizes=(7, 5, 1)),
             gequiv_p4_seg6=dict(widths=(2, 2, 2), kernel_sizes=(7, 5, 1)))


def _model(name, small=True, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **(dict(SMALL[name], **kw) if small else kw))


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', SEG)
@pytest.mark.parametrize('size', [(20, 20), (18, 24)])
def test_output_is_per_pixel_at_input_resolution(name, size):
    m = _model(name).eval()
    out = m(torch.randn(2, 1, *size))
    assert out.shape == (2, 2, *size)
    assert _model(name, num_classes=5)(torch.randn(1, 1, *size)).shape == (1, 5, *size)


@pytest.mark.parametrize('name', SEG)
def test_translation_equivariance_away_from_the_border(name):
    """Shifting the input by whole pixels shifts the logits, exactly, wherever the receptive field stays inside
    the image (eval mode: batch norm is per pixel)."""
    m = _model(name).eval()
    x = torch.randn(1, 1, 48, 48, dtype=torch.float64)
    m = m.double()
    with torch.no_grad():
        a = m(torch.roll(x, (3, -2), (-2, -1)))
        b = torch.roll(m(x), (3, -2), (-2, -1))
    margin = 18
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    assert torch.allclose(a[inner], b[inner], atol=1e-10)
    assert not torch.allclose(a, b, atol=1e-6)  # the borders do differ: the comparison can fail


@pytest.mark.parametrize('name', EQUIVARIANT)
@pytest.mark.parametrize('train', [False, True])
def test_quarter_turns_turn_the_logits(name, train):
    """PDE nets (8 orientations) and the p4 net: f(rot90^k x) = rot90^k f(x) exactly, in train and eval mode."""
    m = _model(name).double().train(train)
    x = torch.randn(2, 1, 21, 21, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        for k in (1, 2, 3):
            torch.testing.assert_close(m(torch.rot90(x, k, (-2, -1))), torch.rot90(y, k, (-2, -1)), rtol=1e-9,
                                       atol=1e-9)


def test_the_cnn_does_not_turn_with_the_input():
    m = _model('gequiv_cnn_seg6').double().eval()
    x = torch.randn(2, 1, 21, 21, dtype=torch.float64)
    with torch.no_grad():
        err = (m(torch.rot90(x, 1, (-2, -1))) - torch.rot90(m(x), 1, (-2, -1))).abs().max()
    assert err > 1e-3


def _params(name):
    return sum(p.numel() for p in timm.create_model(name).parameters())


def test_pde_nets_have_at_most_a_quarter_of_the_baselines_parameters():
    counts = {n: _params(n) for n in SEG}
    for p in ('gequiv_pde_seg6', 'gequiv_pde_seg12'):
        for b in ('gequiv_cnn_seg6', 'gequiv_p4_seg6'):
            assert counts[p] <= counts[b] / 4, (p, b, counts)
    # the baselines match each other (within 5%)
    assert abs(counts['gequiv_cnn_seg6'] / counts['gequiv_p4_seg6'] - 1) < 0.05


def test_the_catalog_states_the_parameter_counts():
    from gequiv_timm._resources import registry_dir
    text = (registry_dir() / 'pde_seg.toml').read_text()
    for n in SEG:
        assert f'{n} {_params(n):,}' in text, n


@pytest.mark.parametrize('name', SEG)
def test_timm_api(name):
    m = _model(name).eval()
    x = torch.randn(2, 1, 16, 16)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_features, 16, 16)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    final, inter = m.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1] for t in inter] == [f['num_chs'] for f in m.feature_info]
    assert all(t.shape[-2:] == (16, 16) for t in inter)
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    m.reset_classifier(0, '')
    assert m(x).shape == (2, m.num_features, 16, 16)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3, 16, 16) and m.get_classifier().out_channels == 3
    f = timm.create_model(name, features_only=True, out_indices=(0, 1, 2), **SMALL[name]).eval()
    assert [o.shape[1] for o in f(x)] == f.feature_info.channels()


def test_pde_coefficients_get_their_own_rate_and_no_decay():
    m = _model('gequiv_pde_seg6')
    groups = m.param_groups(lr=1e-3, weight_decay=1e-4)
    coef = [g for g in groups if g['lr'] == pytest.approx(1e-2)]
    assert len(coef) == 1 and all(p.shape[-1] == 3 for p in coef[0]['params'])
    assert m.no_weight_decay() and all(n.endswith(('.g0', '.metric_params')) for n in m.no_weight_decay())


@pytest.mark.parametrize('kw, msg', [
    (dict(kind='mlp'), 'kind must be one of'),
    (dict(widths=(8,)), 'at least 2 layers'),
    (dict(kind='cnn', widths=(4, 4), kernel_sizes=(7,)), 'kernel_sizes must hold 2'),
    (dict(kind='cnn', widths=(4, 4), kernel_sizes=(7, 4)), 'kernel_sizes must hold 2'),
    (dict(pde_kernel_size=(3, 4, 5)), 'pde_kernel_size'),
    (dict(global_pool='sum'), 'global_pool must be one of'),
])
def test_bad_arguments_are_refused(kw, msg):
    from gequiv_timm.models.pde_seg import SegmentationNet
    with pytest.raises(ValueError, match=msg):
        SegmentationNet(**kw)


def test_too_small_input_is_refused_before_work():
    with pytest.raises(ValueError, match='too small'):
        _model('gequiv_pde_seg6')(torch.randn(1, 1, 3, 3))


# ----------------------------------------------------------------------------------------------------------------
# Dice loss and metrics, by hand
# ----------------------------------------------------------------------------------------------------------------
def _logits(p_fg):
    """2-class logits whose softmax gives foreground probability ``p_fg``."""
    p = torch.as_tensor(p_fg, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)


def test_dice_loss_by_hand():
    t = torch.tensor([[[1, 0], [0, 0]]])
    logits = _logits([[[0.9, 0.2], [0.6, 0.1]]])
    # inter = 0.9, sum p = 1.8, sum t = 1
    assert float(dice_loss(logits, t, smooth=0.0)) == pytest.approx(1 - 1.8 / 2.8)
    assert float(dice_loss(logits, t, smooth=1.0)) == pytest.approx(1 - 2.8 / 3.8)
    assert float(dice_loss(_logits([[[1 - 1e-9, 1e-9], [1e-9, 1e-9]]]), t, smooth=0.0)) == pytest.approx(0, abs=1e-6)
    # three classes: the mean over the two foreground classes
    t3 = torch.tensor([[[1, 2]]])
    l3 = torch.log(torch.tensor([[[0.2, 0.1]], [[0.5, 0.3]], [[0.3, 0.6]]])).unsqueeze(0)
    d1, d2 = 2 * 0.5 / (0.8 + 1), 2 * 0.6 / (0.9 + 1)
    assert float(dice_loss(l3, t3, smooth=0.0)) == pytest.approx(1 - (d1 + d2) / 2, rel=1e-6)


def test_dice_loss_is_differentiable_and_checks_shapes():
    logits = torch.randn(2, 2, 5, 5, requires_grad=True)
    dice_loss(logits, torch.randint(0, 2, (2, 5, 5))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match='same B, H, W'):
        dice_loss(torch.randn(2, 2, 5, 5), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match='at least 2 classes'):
        dice_loss(torch.randn(2, 1, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="'classify', 'keypoints' or 'segment'"):
        batch_loss('detect', torch.randn(2, 2, 5, 5), [None, None])


def test_dice_score_and_sums_by_hand():
    assert dice_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == 0.5
    assert dice_score(torch.zeros(4), torch.zeros(4)) == 1.0
    assert dice_score(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.8)
    logits = _logits([[[0.9, 0.2], [0.6, 0.1]]])  # predicts {0, 2}; truth {0}
    assert dice_sums(logits, torch.tensor([[[1, 0], [0, 0]]])) == [2.0, 3.0]


def test_roc_auc_by_hand():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5  # a tie counts one half
    assert roc_auc(torch.tensor([0.3, 0.3, 0.9, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.875)
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1])) == 0.0
    with pytest.raises(ValueError, match='both classes'):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_binned_auc_is_the_exact_auc_of_the_binned_scores():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(5000, generator=g, dtype=torch.float64)
    y = torch.rand(5000, generator=g, dtype=torch.float64) < s
    binned = torch.floor(s * AUC_BINS) / AUC_BINS
    assert roc_auc_from_histograms(score_histograms(s, y)) == pytest.approx(roc_auc(binned, y), abs=1e-12)
    assert roc_auc_from_histograms(score_histograms(s, y)) == pytest.approx(roc_auc(s, y), abs=2e-3)
    assert roc_auc_from_histograms(score_histograms(torch.tensor([0.1, 0.4, 0.35, 0.8]),
                                                    torch.tensor([0, 0, 1, 1]))) == 0.75


def test_segmentation_metrics_by_hand():
    p1 = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]], dtype=torch.float64)
    m = segmentation_metrics(torch.stack([1 - p1, p1], 1), torch.tensor([[[1, 0], [0, 0]]]))
    assert m.dice == pytest.approx(2 / 3) and m.auc == 1.0 and m.accuracy == 0.75 and m.pixels == 4


class _Fixed(nn.Module):
    """A stand-in model returning fixed logits for the images it is given (indexed by their first pixel)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()] + self.w


def test_evaluate_segment_matches_the_metrics_by_hand():
    g = torch.Generator().manual_seed(1)
    n = 7
    logits = torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)
    masks = (torch.rand(n, 6, 6, generator=g) < 0.3).long()
    x = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
    ds = torch.utils.data.TensorDataset(x, masks)
    ev = evaluate(_Fixed(logits), ds, 'segment', batch_size=3)
    ref = segmentation_metrics(logits.softmax(1), masks)
    assert ev['n'] == n
    assert ev['dice'] == pytest.approx(ref.dice, abs=1e-12)
    assert ev['accuracy'] == pytest.approx(ref.accuracy, abs=1e-12)
    p = torch.floor(logits.softmax(1)[:, 1] * AUC_BINS) / AUC_BINS
    assert ev['auc'] == pytest.approx(roc_auc(p, masks), abs=1e-12)
    per_batch = [float(dice_loss(logits[i:i + 3], masks[i:i + 3])) * len(masks[i:i + 3]) for i in range(0, n, 3)]
    assert ev['loss'] == pytest.approx(sum(per_batch) / n)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def strokes():
    from gequiv_timm.data import mnist_strokes, standardize
    d = mnist_strokes(seed=0, n_train=64, n_test=8)
    return standardize(d.train.images), d.train.masks


@pytest.mark.parametrize('name, steps', [('gequiv_cnn_seg6', 40), ('gequiv_pde_seg6', 25)])
def test_short_training_lowers_the_dice_loss(strokes, name, steps):
    x, y = strokes
    m = _model(name).train()
    opt = torch.optim.AdamW(m.param_groups(lr=1e-2, weight_decay=0.0), lr=1e-2)
    xb, yb = x[:16, :, 16:48, 16:48], y[:16, 16:48, 16:48]
    with torch.no_grad():
        before = float(dice_loss(m.eval()(xb), yb))
    m.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(64, (8,), generator=g)
        loss = dice_loss(m(x[i, :, 16:48, 16:48]), y[i, 16:48, 16:48])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(dice_loss(m.eval()(xb), yb))
    assert math.isfinite(after) and after < before - 0.1, (before, after)


def test_train_job_reports_and_remeasures_the_segmentation_metrics(tmp_path):
    """gequiv-timm train's engine on the 'strokes' set: test_dice / test_auc / test_accuracy in the metrics, and
    measure_checkpoint (what `gequiv-timm check --metrics` runs) gives them back from the saved weights."""
    from gequiv_timm.training.distributed import DistInfo
    from gequiv_timm.training.recipe import TrainJob, measure_checkpoint, run_job
    from gequiv_timm.training.trainer import TrainConfig
    from gequiv_timm.weights import load_weights
    out = tmp_path / 'm.safetensors'
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, seed=0, max_steps=2, progress=False)
    job = TrainJob('gequiv_cnn_seg6', cfg, data='strokes', model_kwargs=dict(widths=[4, 4, 4], kernel_sizes=[7, 5, 1]),
                   limit_train=8, out=str(out))
    metrics = run_job(job, DistInfo(device=torch.device('cpu')), verbose=False)
    assert {'test_dice', 'test_auc', 'test_accuracy'} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ('test_dice', 'test_auc', 'test_accuracy'))
    model = timm.create_model('gequiv_cnn_seg6', widths=[4, 4, 4], kernel_sizes=[7, 5, 1])
    load_weights(model, str(out))
    again = measure_checkpoint(model.eval(), {'recipe': job.recipe, 'metrics': metrics})
    assert again['n'] == 500
    for k in ('test_dice', 'test_auc', 'test_accuracy'):
        assert again[k] == pytest.approx(metrics[k], abs=6e-5), k


def test_segmentation_card_and_csv_log_say_what_a_segmentation_run_is(tmp_path):
    """The model card of a segmentation checkpoint is tagged image-segmentation (not classification), and a CSV
    metrics log keeps the segment task's Dice / AUC / accuracy columns instead of dropping them."""
    from gequiv_timm.hub import _task
    from gequiv_timm.training.metrics_log import LOG_FIELDS
    assert _task(timm.create_model('gequiv_pde_seg6')) == 'image-segmentation'
    assert _task(timm.create_model('gequiv_p4cnn')) == 'image-classification'
    card = (Path(__file__).parents[2] / 'weights' / 'cards' / 'gequiv_pde_seg6.strokes.md').read_text()
    assert 'pipeline_tag: image-segmentation' in card
    assert {'train_dice', 'eval_dice', 'eval_auc', 'eval_accuracy'} <= set(LOG_FIELDS)
