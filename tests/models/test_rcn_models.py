"""Keypoint models through timm: registration, the timm model API, num_keypoints, decoding, features_only, and the
input defaults (a model named after a timm backbone takes the backbone's; gequiv_rcn_paper takes MNIST landmarks').

Most tests here run the MNIST-landmark setting (64x64 grayscale, ``in_chans=1``), as ``gequiv-timm train`` does."""
import importlib.util

import pytest
import timm
import torch

import gequiv_timm  # noqa: F401
from gequiv_timm import registry
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
    """One eval-mode instance per registered name (grayscale, as for MNIST landmarks), shared by the read-only
    tests."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = timm.create_model(name, in_chans=1).eval()
    return _CACHE[name]


# ----- input defaults --------------------------------------------------------------------------------------------
# every keypoint model but the one named for the paper (and its 64x64 grayscale data) is named after its backbone
BACKBONE_NAMED = sorted(n for n, e in registry.catalog().items() if e.family == 'rcn' and n != 'gequiv_rcn_paper')


def test_backbone_named_models_are_listed():
    assert {'gequiv_rcn_resnet18', 'gequiv_sumnet_resnet18', 'gequiv_kpsingle_resnet18', 'gequiv_kpreg_resnet18',
            'gequiv_rcn_p4_resnet18'} <= set(BACKBONE_NAMED)


@pytest.mark.parametrize('name', BACKBONE_NAMED)
def test_backbone_named_model_takes_the_backbone_defaults(name):
    """``create_model('gequiv_rcn_resnet18')`` is an RGB model with resnet18's input cfg; in_chans=1 still works."""
    backbone = name.rsplit('_', 1)[-1]
    ours, theirs = timm.get_pretrained_cfg(name).to_dict(), timm.get_pretrained_cfg(backbone).to_dict()
    for key in ('input_size', 'mean', 'std', 'interpolation'):
        assert ours[key] == theirs[key], f'{name}: cfg {key} {ours[key]} is not {backbone}\'s {theirs[key]}'
    assert ours['crop_pct'] == 1.0  # a centre crop would cut keypoints near the border away
    m = timm.create_model(name).eval()
    assert m.backbone_name == backbone and m.in_chans == 3 and m.num_keypoints == 5
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
        assert out.shape[:2] == (1, 5)
        with pytest.raises(ValueError, match='in_chans=1'):
            m(torch.randn(1, 1, 64, 64))
        assert timm.create_model(name, in_chans=1).eval()(torch.randn(1, 1, 64, 64)).shape == out.shape


def test_paper_model_is_named_for_its_data():
    """gequiv_rcn_paper (and its shipped tag, landmarks) keeps the MNIST-landmark input: 64x64 grayscale."""
    for name in ('gequiv_rcn_paper', 'gequiv_rcn_paper.landmarks'):
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg['input_size'] == (1, 64, 64) and cfg['mean'] == (0.1307,) and cfg['std'] == (0.3081,)
    assert timm.create_model('gequiv_rcn_paper').in_chans == 1


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
    feats = m.forward_features(x)
    assert feats.shape == (2, 512, 2, 2) and torch.equal(m.forward_head(feats), out)
    assert torch.equal(m.head.forward_head(feats), torch.zeros(2, 5, 2))  # the linear layer: normalised coordinates
    kp = torch.full((2, 5, 2), 31.5)
    assert m.loss(out, kp, image_size=(64, 64)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match='image_size'):
        m.loss(out, kp)


def test_num_keypoints_kwarg_and_names(x):
    m = timm.create_model('gequiv_rcn_resnet18', num_keypoints=7, in_chans=1)
    assert m(x).shape[1] == 7 and m.keypoint_names == [f'kp{i}' for i in range(7)] and m.num_classes == 7
    m = timm.create_model('gequiv_sumnet_resnet18', num_keypoints=3, keypoint_names=['a', 'b', 'c'], in_chans=1)
    assert m(x).shape[1] == 3 and m.keypoint_names == ['a', 'b', 'c']
    m = timm.create_model('gequiv_rcn_resnet18', num_classes=2, in_chans=1)  # timm's name, an alias
    assert m(x).shape[1] == 2
    with pytest.raises(ValueError, match='disagree'):
        timm.create_model('gequiv_rcn_resnet18', num_keypoints=3, num_classes=4)
    with pytest.raises(ValueError, match='keypoint_names'):
        timm.create_model('gequiv_rcn_resnet18', num_keypoints=3, keypoint_names=['a', 'b'])


def test_output_stride_and_coordinates(x):
    m = timm.create_model('gequiv_rcn_resnet18', output_stride=4, in_chans=1).eval()
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
    f = timm.create_model('gequiv_rcn_resnet18', features_only=True, in_chans=1)
    feats = f(x)
    assert [t.shape[1] for t in feats] == f.feature_info.channels() == [64, 64, 128, 256, 512]
    assert f.feature_info.reduction() == [2, 4, 8, 16, 32]
    m = _model('gequiv_rcn_resnet18')
    final, inter = m.forward_intermediates(x, indices=2)
    assert [t.shape for t in inter] == [(2, 256, 4, 4), (2, 512, 2, 2)]
    # the final features are forward_features' (the recombined finest map), not a pyramid level
    assert torch.equal(final, m.forward_features(x)) and final.shape == (2, m.num_features, 64, 64)
    taps = m.forward_intermediates(x, intermediates_only=True)
    assert [t.shape[1] for t in taps] == [64, 64, 128, 256, 512]
    sel = m.forward_intermediates(x, indices=[0, 3], intermediates_only=True, stop_early=True)
    assert torch.equal(sel[0], taps[0]) and torch.equal(sel[1], taps[3])
    with pytest.raises(ValueError, match='NCHW'):
        m.forward_intermediates(x, output_fmt='NHWC')


def test_classifier_api(x):
    m = timm.create_model('gequiv_rcn_resnet18', in_chans=1)
    assert m.get_classifier() is m.head.classifier
    m.reset_classifier(3)
    assert m(x).shape == (2, 3, 64, 64) and m.keypoint_names == ['kp0', 'kp1', 'kp2']
    feats = m.forward_features(x)
    m.reset_classifier(0)  # headless: pooled features, as any timm model
    assert m.num_classes == 0 and torch.allclose(m(x), feats.mean((-2, -1)), atol=1e-6)
    m.reset_classifier(0, '')
    assert torch.equal(m(x), feats)
    m.reset_classifier(5)  # the recombination branches are kept, only the 1x1 conv is new
    assert m(x).shape == (2, 5, 64, 64) and torch.equal(m.forward_features(x), feats)
    s = timm.create_model('gequiv_sumnet_resnet18', in_chans=1)
    names = {n for n, _ in s.named_parameters()}
    assert s.no_weight_decay() <= names and 'head.level_weight' in s.no_weight_decay()
    s.reset_classifier(4)
    assert s(x).shape == (2, 4, 64, 64)
    assert s.get_classifier() is s.head.classifiers and len(s.get_classifier()) == 5
    assert s.forward_head(s.forward_features(x), pre_logits=True).shape == (2, s.num_features)
    r = timm.create_model('gequiv_rcn_resnet18', in_chans=1)
    f = r.forward_features(x)
    assert f.shape == (2, r.head.out_channels, 64, 64) == (2, r.num_features, 64, 64)
    assert torch.allclose(r.forward_head(f, pre_logits=True), f.mean((-2, -1)))
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
                    upsample='learned', in_chans=1).eval()
    assert m(x).shape == (2, 2, 64, 64)
    m = KeypointNet(backbone='mobilenetv3_small_050', head='sumnet', num_keypoints=2, branch_channels=8,
                    in_chans=1).eval()
    assert m(x).shape == (2, 2, 64, 64)


@pytest.mark.skipif(not HAS_STEMS, reason='the equivariant stem (issue 3) is not in this checkout')
def test_rcn_p4_resnet18(x):
    m = timm.create_model('gequiv_rcn_p4_resnet18', in_chans=1).eval()
    assert m(x).shape == (2, 5, 64, 64)
    rec = m.backbone._gequiv_stem
    assert rec['stem_type'] == 'EquivariantStem' and rec['replaced'] == ['conv1', 'bn1', 'act1']
    stem = m.backbone.get_submodule(rec['path'])
    assert stem.group_name == 'p4' and stem.check_equivariance() < 1e-4
    # the stem's rotation equivariance shows in the finest pyramid level: rotating the input rotates it
    with torch.no_grad():
        f = m.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        fr = m.forward_intermediates(torch.rot90(x, 1, (-2, -1)), indices=[0], intermediates_only=True)[0]
    assert torch.allclose(fr, torch.rot90(f, 1, (-2, -1)), atol=1e-4)


# ----- timm's model contract, keypoint flavour ------------------------------------------------------------------
ALL_MODELS = HEATMAP_MODELS + ['gequiv_kpreg_resnet18']


@pytest.mark.parametrize('name', ALL_MODELS)
def test_timm_split_and_pool_size(name, x):
    """forward = forward_head(forward_features); forward_features is one 4-D map of num_features channels;
    pre_logits / the headless model pool it. (pool_size at the cfg's input size: timm's test_model_default_cfgs.)"""
    m = _model(name)
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m(x)
        assert torch.allclose(m.forward_head(feats), out, atol=1e-5)  # SumNet's forward sums K-maps instead
        final, inter = m.forward_intermediates(x)
    assert feats.dim() == 4 and feats.shape[1] == m.num_features == m.head_hidden_size
    assert torch.equal(final, feats) and len(inter) == len(m.feature_info)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    sd = m.state_dict()
    clf = m.pretrained_cfg['classifier']
    assert all(c + '.weight' in sd for c in ([clf] if isinstance(clf, str) else clf))
    assert m.pretrained_cfg['first_conv'] + '.weight' in sd


@pytest.mark.parametrize('name', ['gequiv_rcn_paper', 'gequiv_kpreg_resnet18'])
def test_num_classes_is_num_keypoints(name, x):
    m = timm.create_model(name, num_classes=42, in_chans=1).eval()
    assert m.num_keypoints == m.num_classes == 42 and m(x).shape[1] == 42
    h = timm.create_model(name, num_classes=0, in_chans=1).eval()
    assert h.num_keypoints == 0 and h(x).shape == (2, h.num_features)
    h = timm.create_model(name, num_classes=0, global_pool='', in_chans=1).eval()
    assert h(x).shape == h.forward_features(x).shape
    with pytest.raises(RuntimeError, match='num_classes=0'):
        h.predict_keypoints(x)
    with pytest.raises(ValueError, match='global_pool'):
        timm.create_model(name, global_pool='token')


def test_factory_device_and_dtype(x):
    m = timm.create_model('gequiv_rcn_resnet18', device='meta')
    assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {'meta'}
    m = timm.create_model('gequiv_rcn_paper', dtype=torch.float64).eval()
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert m(x.double()).dtype == torch.float64
    m.reset_classifier(3)
    assert m.get_classifier().weight.dtype == torch.float64


@pytest.mark.parametrize('name', ALL_MODELS + ['gequiv_rcn_p4_resnet18'])
def test_integer_input_is_rejected(name):
    if name == 'gequiv_rcn_p4_resnet18' and not HAS_STEMS:
        pytest.skip('the equivariant stem (issue 3) is not in this checkout')
    m = _model(name) if name != 'gequiv_rcn_p4_resnet18' else timm.create_model(name, in_chans=1).eval()
    with pytest.raises(TypeError, match='floating point'):
        m(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'\[B, 1, H, W\]'):
        m(torch.zeros(1, 64, 64))


@pytest.mark.parametrize('name', ['gequiv_rcn_paper', 'gequiv_sumnet_resnet18', 'gequiv_kpreg_resnet18'])
def test_fx_trace_matches_eager_and_eager_checks_stay(name, x):
    pytest.importorskip('torchvision')
    from timm.models import create_feature_extractor, get_graph_node_names
    m = _model(name)
    nodes = get_graph_node_names(m)[1]
    fx = create_feature_extractor(m, return_nodes=[nodes[-1]])
    with torch.no_grad():
        out = list(fx(x).values())[0]
        assert torch.allclose(out, m(x), atol=1e-5)
    with pytest.raises(ValueError, match='in_chans=3'):
        m(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize('name', ['gequiv_rcn_paper', 'gequiv_rcn_resnet18'])
def test_prune_intermediate_layers_cuts_the_backbone(name, x):
    import copy
    m = _model(name)
    with torch.no_grad():
        taps = m.forward_intermediates(x, intermediates_only=True)
    p = copy.deepcopy(m)
    assert p.prune_intermediate_layers([1, 2]) == [1, 2]
    assert p.head is None and p.num_classes == 0 and len(p.feature_info) == 3
    assert p.num_features == taps[2].shape[1]
    with torch.no_grad():
        assert torch.equal(p.forward_features(x), taps[2]) and torch.equal(p(x), taps[2])
        assert all(torch.equal(a, b) for a, b in zip(p.forward_intermediates(x, intermediates_only=True), taps))
    n_kept = sum(q.numel() for q in p.parameters())
    p.train()
    p.forward_features(x).sum().backward()
    assert all(q.grad is not None for q in p.parameters()) and n_kept < sum(q.numel() for q in m.parameters())
    with pytest.raises(RuntimeError, match='prune_intermediate_layers'):
        p.reset_classifier(5)
    with pytest.raises(ValueError, match='prune_head=False'):
        copy.deepcopy(m).prune_intermediate_layers([1], prune_head=False)
