"""Keypoint models through timm: registration, the timm model API, num_keypoints, decoding, features_only."""
import importlib.util

import pytest
import timm
import torch

import gequiv_timm  # noqa: F401
from gequiv_timm.layers.rcn import decode_heatmaps, heatmap_cross_entropy
from gequiv_timm.models.rcn import KeypointNet

HEATMAP_MODELS = ['gequiv_rcn_paper', 'gequiv_rcn_resnet18', 'gequiv_sumnet_resnet18', 'gequiv_kpsingle_resnet18']
NAMES = ['top', 'bottom', 'left', 'right', 'centroid']
HAS_STEMS = importlib.util.find_spec('gequiv_timm.models.stems') is not None


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


_CACHE = {}


def _model(name):
    """One eval-mode instance per registered name, shared by the read-only tests."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = timm.create_model(name).eval()
    return _CACHE[name]


@pytest.mark.parametrize('name', HEATMAP_MODELS)
def test_heatmap_models_build_and_decode(name, x):
    assert name in timm.list_models('gequiv_*')
    m = _model(name)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, 5, 64, 64)
    assert m.keypoint_names == NAMES and m.num_keypoints == 5
    xy, conf = m.predict_keypoints(x)
    assert xy.shape == (2, 5, 2) and conf.shape == (2, 5)
    assert torch.allclose(xy, decode_heatmaps(out, 'soft_argmax', 1, 5)[0])
    assert torch.equal(m.predict_keypoints(x, method='argmax')[0], decode_heatmaps(out, 'argmax')[0])
    assert ((xy >= -0.5) & (xy <= 63.5)).all() and ((conf > 0) & (conf <= 1)).all()
    # keypoint names are model config, not timm's PretrainedCfg
    assert 'keypoint_names' not in m.pretrained_cfg
    assert m.pretrained_cfg['input_size'] == (1, 64, 64)


def test_paper_model_is_grayscale_five_levels():
    m = _model('gequiv_rcn_paper')
    assert m.in_chans == 1 and len(m.feature_info) == 5
    assert [f['reduction'] for f in m.feature_info] == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match='in_chans=3'):
        m(torch.randn(1, 3, 64, 64))


def test_regression_model(x):
    m = _model('gequiv_kpreg_resnet18')
    out = m(x)
    assert out.shape == (2, 5, 2)
    xy, conf = m.predict_keypoints(x)
    # forward gives pixels; the linear layer starts at zero: every keypoint at the image centre
    assert torch.allclose(xy, torch.full_like(xy, 31.5)) and torch.allclose(out, xy) and torch.isnan(conf).all()
    assert torch.allclose(m.forward_head(m.forward_features(x)), torch.zeros(2, 5, 2))  # raw: normalised
    kp = torch.full((2, 5, 2), 31.5)
    assert m.loss(out, kp, image_size=(64, 64)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match='image_size'):
        m.loss(out, kp)


def test_num_keypoints_kwarg_and_names(x):
    m = timm.create_model('gequiv_rcn_resnet18', num_keypoints=7)
    assert m(x).shape[1] == 7 and m.keypoint_names == [f'kp{i}' for i in range(7)] and m.num_classes == 7
    m = timm.create_model('gequiv_sumnet_resnet18', num_keypoints=3, keypoint_names=['a', 'b', 'c'])
    assert m(x).shape[1] == 3 and m.keypoint_names == ['a', 'b', 'c']
    m = timm.create_model('gequiv_rcn_resnet18', num_classes=2)  # timm's name, an alias
    assert m(x).shape[1] == 2
    with pytest.raises(ValueError, match='disagree'):
        timm.create_model('gequiv_rcn_resnet18', num_keypoints=3, num_classes=4)
    with pytest.raises(ValueError, match='keypoint_names'):
        timm.create_model('gequiv_rcn_resnet18', num_keypoints=3, keypoint_names=['a', 'b'])


def test_output_stride_and_coordinates(x):
    m = timm.create_model('gequiv_rcn_resnet18', output_stride=4).eval()
    out = m(x)
    assert out.shape == (2, 5, 16, 16)
    xy, _ = m.predict_keypoints(x, method='argmax')
    # cell centres of a stride-4 map, in input pixels
    assert torch.allclose((xy - 1.5) / 4, ((xy - 1.5) / 4).round())
    kp = torch.rand(2, 5, 2) * 63
    assert m.loss(out, kp).item() == pytest.approx(heatmap_cross_entropy(out, kp, stride=4).item())


def test_loss_is_masked_spatial_cross_entropy(x):
    m = _model('gequiv_rcn_resnet18')
    out = m(x)
    kp = torch.rand(2, 5, 2) * 63
    vis = torch.tensor([[True, False, True, True, True], [True] * 5])
    assert m.loss(out, kp, vis).item() == pytest.approx(heatmap_cross_entropy(out, kp, vis).item())
    m.loss(out, kp, vis).backward()
    assert m.head.classifier.weight.grad.abs().sum() > 0


def test_features_only_and_intermediates(x):
    f = timm.create_model('gequiv_rcn_resnet18', features_only=True)
    feats = f(x)
    assert [t.shape[1] for t in feats] == f.feature_info.channels() == [64, 64, 128, 256, 512]
    assert f.feature_info.reduction() == [2, 4, 8, 16, 32]
    m = _model('gequiv_rcn_resnet18')
    last, inter = m.forward_intermediates(x, indices=2)
    assert len(inter) == 2 and inter[-1].shape == last.shape == (2, 512, 2, 2)
    assert len(m.forward_intermediates(x, intermediates_only=True)) == 5


def test_classifier_api(x):
    m = timm.create_model('gequiv_rcn_resnet18')
    assert m.get_classifier() is m.head.classifier
    m.reset_classifier(3)
    assert m(x).shape == (2, 3, 64, 64) and m.keypoint_names == ['kp0', 'kp1', 'kp2']
    m.reset_classifier(0)
    assert isinstance(m(x), list)
    s = timm.create_model('gequiv_sumnet_resnet18')
    names = {n for n, _ in s.named_parameters()}
    assert s.no_weight_decay() <= names and 'head.level_weight' in s.no_weight_decay()
    s.reset_classifier(4)
    assert s(x).shape == (2, 4, 64, 64)
    with pytest.raises(ValueError, match='pre_logits'):
        s.forward_head(s.forward_features(x), pre_logits=True)
    r = timm.create_model('gequiv_rcn_resnet18')
    pre = r.forward_head(r.forward_features(x), pre_logits=True, out_size=(64, 64))
    assert pre.shape[0] == 2 and pre.shape[-2:] == (64, 64) and pre.shape[1] == r.head.out_channels
    r.set_grad_checkpointing(True)
    assert r.grad_checkpointing
    gm = r.group_matcher()
    assert 'stem' in gm and 'blocks' in gm


def test_input_errors():
    m = _model('gequiv_rcn_resnet18')
    with pytest.raises(ValueError, match='divisible by 32'):
        m(torch.randn(1, 1, 48, 48))
    with pytest.raises(ValueError, match='head must be one of'):
        KeypointNet(head='fancy')
    with pytest.raises(ValueError, match="upsample='bilinear'"):
        timm.create_model('gequiv_sumnet_resnet18', upsample='learned')


def test_other_timm_backbones(x):
    m = KeypointNet(backbone='resnet10t', head='rcn', num_keypoints=2, branch_channels=16,
                    upsample='learned').eval()
    assert m(x).shape == (2, 2, 64, 64)
    m = KeypointNet(backbone='mobilenetv3_small_050', head='sumnet', num_keypoints=2, branch_channels=8,
                    in_chans=1).eval()
    assert m(x).shape == (2, 2, 64, 64)


@pytest.mark.skipif(not HAS_STEMS, reason='the equivariant stem (issue 3) is not in this checkout')
def test_rcn_p4_resnet18(x):
    m = timm.create_model('gequiv_rcn_p4_resnet18').eval()
    assert m(x).shape == (2, 5, 64, 64)
    rec = m.backbone._gequiv_stem
    assert rec['stem_type'] == 'EquivariantStem' and rec['replaced'] == ['conv1', 'bn1', 'act1']
    stem = m.backbone.get_submodule(rec['path'])
    assert stem.group_name == 'p4' and stem.check_equivariance() < 1e-4
    # the stem's rotation equivariance shows in the finest pyramid level: rotating the input rotates it
    with torch.no_grad():
        f = m.forward_features(x)[0]
        fr = m.forward_features(torch.rot90(x, 1, (-2, -1)))[0]
    assert torch.allclose(fr, torch.rot90(f, 1, (-2, -1)), atol=1e-4)
