"""TorchScript and torch.fx for the group layers and the G-CNN families: the compiled / traced module computes what
the eager one computes, and the eager module keeps its input checks and its eval-mode filter cache."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn

import gequiv_timm  # noqa: F401  (registers the models)
from gequiv_timm.layers import (
    GroupAvgPool2d, GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool, fold_group, get_group, unfold_group,
)
from gequiv_timm.models._timm_api import TimmApiMixin, check_image_input
from gequiv_timm.models.gcnn import GroupCNN
from gequiv_timm.models.gresnet import GroupAllCNN, GroupResNet
from gequiv_timm.models.stems import EquivariantStem, PooledLift, inject_equivariant_stem



def _script(m):
    with warnings.catch_warnings():  # torch 2.x: "torch.jit.script is deprecated" (timm still tests it)
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.script(m)


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode batch norms are not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('gin, gout, kw', [
    ('z2', 'p4', dict(padding=1)), ('z2', 'p4m', dict(stride=2, bias=False)), ('p4', 'p4', dict(padding=2, dilation=2)),
    ('p4m', 'p4m', dict(kernel_size=1)), ('z2', 'z2', dict(padding=1))])
@pytest.mark.parametrize('training', [False, True])
def test_group_conv_scripted_equals_eager(gin, gout, kw, training):
    torch.manual_seed(0)
    kw = dict(dict(kernel_size=3), **kw)
    conv = GroupConv2d(3, 5, in_group=gin, out_group=gout, **kw).train(training)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    gi = get_group(gin).order
    x = torch.randn(2, 3, 11, 11) if gin == 'z2' else torch.randn(2, 3, gi, 11, 11)
    scripted = _script(conv)
    torch.testing.assert_close(scripted(x), conv(x), rtol=0, atol=0)
    # gradients through the scripted filter expansion reach the base weight as in eager mode
    if training:
        g_eager = torch.autograd.grad(conv(x).square().sum(), conv.weight)[0]
        g_script = torch.autograd.grad(scripted(x).square().sum(), scripted.weight)[0]
        torch.testing.assert_close(g_script, g_eager)


def test_group_conv_scripted_is_equivariant():
    torch.manual_seed(0)
    conv = _script(GroupConv2d(2, 3, 3, 'p4m', 'p4m', padding=1).eval())
    g = get_group('p4m')
    x = torch.randn(1, 2, 8, 9, 9)
    y = conv(x)
    for e in g.elements():
        torch.testing.assert_close(conv(g.transform_group_map(x, e)), g.transform_group_map(y, e), atol=1e-5,
                                   rtol=1e-5)


def test_group_conv_eager_keeps_checks():
    conv = GroupConv2d(3, 4, 3, 'z2', 'p4', padding=1).eval()
    with torch.no_grad():
        w1 = conv.expanded_weight()
        conv.weight.mul_(2)                   # the bank is always expanded from the current weights
        torch.testing.assert_close(conv.expanded_weight(), 2 * w1)
    with pytest.raises(TypeError, match='floating point'):
        conv(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match='expected 3 input channels'):
        conv(torch.randn(1, 2, 8, 8))
    with pytest.raises(TypeError, match='torch.Tensor'):
        conv([[1.0]])
    with pytest.raises(ValueError, match='looks folded'):
        GroupConv2d(2, 4, 3, 'p4', 'p4')(torch.randn(1, 8, 7, 7))


@pytest.mark.parametrize('momentum', [0.1, None])
def test_group_batch_norm_scripted_equals_eager(momentum):
    torch.manual_seed(0)
    eager = GroupBatchNorm(3, 'p4', momentum=momentum)
    _randomise_bn(eager)
    scripted = _script(GroupBatchNorm(3, 'p4', momentum=momentum))
    scripted.load_state_dict(eager.state_dict())
    for step in range(3):  # training: same output, same running statistics and counter after every step
        x = torch.randn(4, 3, 4, 5, 5) * (step + 1) + step
        torch.testing.assert_close(scripted(x), eager(x))
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(scripted.state_dict()[k], v, msg=k)
    eager.eval()
    scripted.eval()
    x = torch.randn(2, 3, 4, 5, 5)
    torch.testing.assert_close(scripted(x), eager(x))
    with pytest.raises(ValueError, match=r'\|G\|=4'):
        eager(torch.randn(2, 3, 8, 5, 5))


def test_pools_and_fold_scripted_equal_eager():
    x = torch.randn(2, 3, 8, 6, 6)
    for m in (GroupPool('p4m', 'max'), GroupPool('p4m', 'mean'), GroupMaxPool2d(2, group='p4m'),
              GroupAvgPool2d(3, 1, 1, group='p4m')):
        torch.testing.assert_close(_script(m)(x), m(x), rtol=0, atol=0)
    f = _script(fold_group)
    u = _script(unfold_group)
    torch.testing.assert_close(f(x), fold_group(x))
    torch.testing.assert_close(u(f(x), 8), x)
    with pytest.raises(ValueError, match='5-D'):
        fold_group(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match='floating point'):
        GroupPool('p4')(torch.zeros(1, 2, 4, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize('pool', [1, 2, 4])
def test_pooled_lift_scripted_equals_eager(pool):
    torch.manual_seed(0)
    lift = PooledLift(3, 4, 5, 'p4', pool).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_script(lift)(x), lift(x))
    with pytest.raises(TypeError, match='floating point'):
        lift(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize('mode', ['invariant', 'equivariant'])
def test_equivariant_stem_scripted_equals_eager_and_is_equivariant(mode):
    torch.manual_seed(0)
    stem = EquivariantStem(3, 16, 2, group='p4m', mode=mode, kernel_size=5).eval()
    _randomise_bn(stem)
    scripted = _script(stem)
    x = torch.randn(2, 3, 16, 16)
    y = scripted(x)
    torch.testing.assert_close(y, stem(x))
    for e in stem.group.elements():
        torch.testing.assert_close(scripted(stem.group.transform_plane(x, e)), stem.transform_output(y, e),
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
def _models():
    torch.manual_seed(0)
    return {
        'gcnn_p4': (GroupCNN('p4', widths=(4, 4, 4), pool_after=(1,)), (2, 1, 14, 14)),
        'gcnn_z2': (GroupCNN('z2', widths=(4, 4), pool_after=()), (2, 1, 9, 9)),
        'resnet_cifar': (GroupResNet('p4m', layers=(1, 1), widths=(2, 3)), (2, 3, 8, 8)),
        'resnet_imagenet': (GroupResNet('p4', layers=(1, 1), widths=(2, 3), stem_type='imagenet'), (2, 3, 16, 16)),
        'allcnn': (GroupAllCNN('p4', widths=(2, 3)), (2, 3, 12, 12)),
    }


@pytest.mark.parametrize('key', list(_models()))
def test_model_scripted_equals_eager_and_invariant(key):
    model, shape = _models()[key]
    model.eval()
    _randomise_bn(model)
    scripted = _script(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = scripted(x)
        torch.testing.assert_close(y, model(x), rtol=1e-6, atol=1e-6)
        g = model.group
        for e in g.elements():  # the scripted network keeps the invariance of the eager one
            torch.testing.assert_close(scripted(g.transform_plane(x, e)), y, atol=1e-5, rtol=1e-5)


def test_stem_injected_backbone_scripted_equals_eager():
    torch.manual_seed(0)
    model = inject_equivariant_stem('resnet10t', 'p4', num_classes=5).eval()
    scripted = _script(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match='floating point'):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_registered_model_scripts_with_timm_scriptable():
    with timm.set_scriptable(True):
        model = timm.create_model('gequiv_p4cnn').eval()
    _randomise_bn(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_script(model)(x), model(x), rtol=1e-6, atol=1e-6)


def test_fx_graph_keeps_the_input_check():
    pytest.importorskip('torchvision')
    from timm.models import create_feature_extractor, get_graph_node_names
    model = timm.create_model('gequiv_p4cnn').eval()
    _randomise_bn(model)
    nodes = get_graph_node_names(model)[1]
    assert any('check_image_input' in n for n in nodes), nodes[:5]
    fx = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)[nodes[-1]], model(x))
    with pytest.raises(TypeError, match='floating point'):
        fx(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match='too small'):
        fx(torch.randn(2, 1, 12, 12))


@pytest.mark.parametrize('name', ['gequiv_p4cnn', 'gequiv_p4m_resnet18', 'gequiv_p4_allcnnc'])
def test_models_reject_integer_images(name):
    model = timm.create_model(name).eval()
    c, h, w = model.pretrained_cfg['input_size']
    with pytest.raises(TypeError, match=r'floating point.*x\.float\(\)'):
        model(torch.zeros(1, c, min(h, 64), min(w, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match='in_chans=2'):
        model(torch.randn(1, 2, min(h, 64), min(w, 64)))
    with pytest.raises(TypeError):
        check_image_input([0.0], c, 1, name)


# ----------------------------------------------------------------------------------------------------------------
# the shared timm API
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('key', list(_models()))
def test_prune_norm_returns_the_folded_tap(key):
    model, shape = _models()[key]
    assert isinstance(model, TimmApiMixin)
    model.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        n = len(taps)
        for i in range(n - 1):
            pruned = _models()[key][0].eval()
            pruned.load_state_dict(model.state_dict())
            pruned.prune_intermediate_layers([i], prune_norm=True, prune_head=False)
            feats = pruned.forward_features(x)
            torch.testing.assert_close(feats, taps[i])
            assert pruned.num_features == pruned.head_hidden_size == feats.shape[1]
            assert pruned(x).shape == (shape[0], model.num_classes)  # the head follows the tap's width
            # without prune_norm the group pooling stays: invariant features of width C
            pruned = _models()[key][0].eval()
            pruned.load_state_dict(model.state_dict())
            pruned.prune_intermediate_layers([i], prune_head=False)
            feats = pruned.forward_features(x)
            assert feats.shape[1] == pruned.num_features == taps[i].shape[1] // model.group.order
            assert pruned(x).shape == (shape[0], model.num_classes)


def test_gcnn_factory_kwargs_meta_device():
    model = timm.create_model('gequiv_p4mcnn', device='meta', dtype=torch.float64)
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.device.type != 'meta' or (t.is_floating_point() and t.dtype != torch.float64)]
    assert not bad, bad
    model.reset_classifier(3)
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in model.get_classifier().parameters())
    # a CPU model made afterwards is unaffected by the meta one (cached tables stay on the CPU)
    cpu = timm.create_model('gequiv_p4mcnn')
    assert cpu(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_fx_traces_an_equivariant_mode_stem():
    """The equivariant stem folds its group axis with the checked fold_group: a notrace (leaf) function for FX."""
    pytest.importorskip('torchvision')
    from timm.models import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    model = inject_equivariant_stem('resnet10t', 'p4', 'equivariant', num_classes=5).eval()
    nodes = get_graph_node_names(model)[1]
    assert any('fold_group' in n for n in nodes)
    fx = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)[nodes[-1]], model(x))
