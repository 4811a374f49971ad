"""Full G-CNN families: p4m ResNet44 / ResNet18 and p4 / p4m All-CNN-C as timm models."""
import pytest
import timm
import torch
import torch.nn.functional as F

import gequiv_timm  # noqa: F401  (registers)
from gequiv_timm.data import load_mnist
from gequiv_timm.layers import unfold_group
from gequiv_timm.models.gresnet import GroupAllCNN, GroupResNet

FULL = ['gequiv_p4m_resnet44', 'gequiv_p4m_resnet18', 'gequiv_p4_allcnnc', 'gequiv_p4m_allcnnc']


def _digits(size, n=2):
    x, _ = load_mnist()
    x = F.interpolate(x[:n], size=(size, size), mode='bilinear', align_corners=False)
    return ((x - 0.1307) / 0.3081).repeat(1, 3, 1, 1)


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('name, size', [('gequiv_p4m_resnet44', 16), ('gequiv_p4m_resnet18', 32),
                                        ('gequiv_p4_allcnnc', 32), ('gequiv_p4m_allcnnc', 32)])
def test_logits_invariant_on_real_digits(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _digits(size, n=1)  # sides: multiples of the total reduction (4, or 32 for ResNet18)
    g = model.group
    with torch.no_grad():
        ref = model(x)
        for e in g.elements()[1:]:
            out = model(g.transform_plane(x, e))
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5, (name, e)
        # and the intermediate feature maps move (equivariant, not trivially constant)
        f = model.forward_intermediates(x, intermediates_only=True)[-1]
        fr = model.forward_intermediates(g.transform_plane(x, 1), intermediates_only=True)[-1]
        assert (fr - f).abs().max() > 1e-3
        u, ur = unfold_group(f, g.order), unfold_group(fr, g.order)
        assert torch.allclose(ur, g.transform_group_map(u, 1), atol=1e-4 * u.abs().max().item())


def test_strided_reference_is_not_invariant():
    """The invariance test can fail: a stride-2 conv on an even-sized map breaks it (why we pool, then conv)."""
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4_allcnnc').eval()
    model.stages[1][0].pool = torch.nn.Identity()
    model.stages[1][0].conv.stride = 2
    x = _digits(32)
    with torch.no_grad():
        ref = model(x)
        d = (model(torch.rot90(x, 1, dims=(-2, -1))) - ref).abs().max() / ref.abs().max()
    assert d.item() > 1e-3


def test_parameters_match_planar_counterparts():
    """Widths chosen as in Cohen & Welling: parameter counts close to the planar nets'."""
    res44 = _nparams(timm.create_model('gequiv_p4m_resnet44'))
    planar44 = _nparams(GroupResNet('z2', (7, 7, 7), (32, 64, 128), num_classes=10))
    assert abs(res44 / planar44 - 1) < 0.05, (res44, planar44)
    res18 = _nparams(timm.create_model('gequiv_p4m_resnet18'))
    planar18 = _nparams(GroupResNet('z2', (2, 2, 2, 2), (64, 128, 256, 512), stem_type='imagenet', num_classes=1000))
    assert abs(res18 / planar18 - 1) < 0.05, (res18, planar18)
    for name, widths in (('gequiv_p4_allcnnc', (48, 96)), ('gequiv_p4m_allcnnc', (34, 68))):
        n = _nparams(timm.create_model(name))
        planar = _nparams(GroupAllCNN('z2', (96, 192)))
        assert abs(n / planar - 1) < 0.02, (name, n, planar)


@pytest.mark.parametrize('name', FULL)
def test_feature_maps_are_folded(name):
    m = timm.create_model(name, features_only=True)
    size = 16 if 'resnet44' in name else 32
    outs = m(torch.randn(1, 3, size, size))
    order = 8 if 'p4m' in name else 4
    for o, info in zip(outs, m.feature_info.get_dicts()):
        assert o.dim() == 4 and o.shape[1] == info['num_chs']
        assert info['layout'] == 'folded' and info['num_chs'] % order == 0


def test_timm_api_resnet44():
    m = timm.create_model('gequiv_p4m_resnet44', num_classes=7, drop_rate=0.1, global_pool='max')
    x = torch.randn(2, 3, 16, 16)
    feats = m.forward_features(x)
    assert feats.shape == (2, 45, 4, 4)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 45)
    assert m(x).shape == (2, 7)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    with pytest.raises(ValueError, match='layers'):
        GroupResNet('p4m', (7, 7), (11, 23, 45))
