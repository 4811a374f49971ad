"""Equivariant stems on timm backbones: discovery from timm metadata, injection, equivariance, checkpoint loading."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import gequiv_timm  # noqa: F401  (registers)
from gequiv_timm.data import load_mnist
from gequiv_timm.layers.groups import get_group
from gequiv_timm.models.stems import (
    EquivariantStem, StemError, find_stem, get_stem, inject_equivariant_stem, inject_stem,
    load_backbone_checkpoint, stem_output,
)

STEM_MODELS = ['gequiv_p4_resnet18', 'gequiv_p4m_resnet50', 'gequiv_p4_convnext_tiny', 'gequiv_p4m_efficientnet_b0',
               'gequiv_p4_regnety_016']


@pytest.fixture(scope='module')
def image():
    """A real MNIST digit, resized to 64x64 and repeated to 3 channels, normalised."""
    x, _ = load_mnist()
    x = F.interpolate(x[:2], size=(64, 64), mode='bilinear', align_corners=False)
    return ((x - 0.1307) / 0.3081).repeat(1, 3, 1, 1)


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize('backbone, replaced', [
    ('resnet18', ['conv1', 'bn1', 'act1']),
    ('convnext_tiny', ['stem.0', 'stem.1']),
    ('efficientnet_b0', ['conv_stem', 'bn1']),
    ('regnety_016', ['stem.conv', 'stem.bn']),
])
def test_stem_found_from_timm_metadata(backbone, replaced):
    model = timm.create_model(backbone)
    info = find_stem(model)
    assert info.first_conv == model.pretrained_cfg['first_conv']
    ends = [p for p, _ in info.segment_ends()]
    assert ends[:len(replaced)] == replaced
    inject_equivariant_stem(model, 'p4')
    assert model._gequiv_stem['replaced'] == replaced
    for p in replaced[1:]:
        assert isinstance(model.get_submodule(p), nn.Identity)


@pytest.mark.parametrize('name', STEM_MODELS)
def test_stem_output_transforms_on_real_image(name, image):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    stem = get_stem(model)
    assert isinstance(stem, EquivariantStem) and stem.mode == 'invariant'
    g = stem.group
    with torch.no_grad():
        y = stem_output(model, image)
        assert y.shape[1] == model._gequiv_stem['out_chs']
        for e in g.elements()[1:]:
            yg = stem_output(model, g.transform_plane(image, e))
            # invariant mode: the output only moves spatially, as the image did
            assert _err(yg, g.transform_plane(y, e)) < 1e-5, (name, e)
            assert _err(yg, y) > 1e-2  # and it does move (a digit is not symmetric)


@pytest.mark.parametrize('group', ['p4', 'p4m'])
def test_equivariant_mode_permutes_channel_blocks(group, image):
    torch.manual_seed(0)
    model = inject_equivariant_stem('resnet18', group, 'equivariant').eval()
    stem = get_stem(model)
    G = get_group(group)
    with torch.no_grad():
        y = stem_output(model, image)
        assert y.shape == (2, 64, 32, 32)
        for e in G.elements()[1:]:
            yg = stem_output(model, G.transform_plane(image, e))
            assert _err(yg, stem.transform_output(y, e)) < 1e-5
            assert _err(yg, G.transform_plane(y, e)) > 1e-2  # not merely invariant: the channel blocks permute


def test_plain_stem_is_not_equivariant(image):
    """The property above can fail: resnet18's own stem does not commute with rotations."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18').eval()
    stem = nn.Sequential(model.conv1, model.bn1, model.act1)
    with torch.no_grad():
        y = stem(image)
        yr = stem(torch.rot90(image, 1, dims=(-2, -1)))
    assert _err(yr, torch.rot90(y, 1, dims=(-2, -1))) > 1e-2


def test_later_layers_untouched_and_warm_start():
    torch.manual_seed(0)
    model = timm.create_model('resnet18')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.conv1.weight.detach().clone()
    inject_equivariant_stem(model, 'p4', warm_start=True)
    after = model.state_dict()
    stem_keys = set(model._gequiv_stem['source_keys'])
    for k, v in before.items():
        if k not in stem_keys:
            assert torch.equal(after[k], v), k
    lift = model.conv1.lift.weight[:, :, 0]  # [16, 3, 7, 7]
    top = w[w.flatten(1).norm(dim=1).argsort(descending=True)[:16]]
    assert torch.equal(lift, top)
    assert model.pretrained_cfg['first_conv'] == 'conv1.lift'
    assert model.feature_info[0]['stem'] == 'EquivariantStem' and model.feature_info[0]['layout'] == 'invariant'


def test_generic_inject_stem_matches_output_point():
    """Any module: its output shape picks how much of the stem it replaces (stride 4 swallows the max pool)."""
    model = timm.create_model('resnet18')
    custom = nn.Sequential(nn.Conv2d(3, 64, 3, stride=4, padding=1), nn.BatchNorm2d(64), nn.ReLU())
    inject_stem(model, custom)
    assert model._gequiv_stem['replaced'] == ['conv1', 'bn1', 'act1', 'maxpool']
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)[1].shape[-1] == 16


def test_stem_errors_are_clear():
    with pytest.raises(StemError, match='matches no point'):
        inject_stem(timm.create_model('resnet18'), nn.Conv2d(3, 32, 3, stride=2, padding=1))
    with pytest.raises(StemError, match='patch embedding'):
        inject_equivariant_stem('vit_tiny_patch16_224')
    m = timm.create_model('resnet18')
    inject_equivariant_stem(m)
    with pytest.raises(StemError, match='already replaced'):
        inject_equivariant_stem(m)
    with pytest.raises(ValueError, match='multiple of 8'):
        EquivariantStem(3, 20, 2, group='p4m', mode='equivariant')


def _save_plain(tmp_path, name='resnet18'):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    src = timm.create_model(name)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f'{name}.safetensors'
    save_file(sd, str(path))
    return sd, path


def test_pretrained_loads_plain_backbone_checkpoint(tmp_path):
    sd, path = _save_plain(tmp_path)
    model = timm.create_model('gequiv_p4_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    rep = model.pretrained_load_report
    own = model.state_dict()
    stem_src = {'conv1.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var',
                'bn1.num_batches_tracked'}
    for k, v in sd.items():
        if k not in stem_src:
            assert torch.equal(own[k], v), k
    assert sorted(k.split(':')[0] for k in rep['not_loaded']) == sorted(stem_src)
    assert set(rep['loaded']) == set(sd) - stem_src
    assert rep['initialised'] and all(k.startswith('conv1.') for k in rep['initialised'])
    assert rep['missing'] == []
    # warm start: the lifting filters are the source's largest filters
    w = sd['conv1.weight']
    assert torch.equal(model.conv1.lift.weight[:, :, 0], w[w.flatten(1).norm(dim=1).argsort(descending=True)[:16]])


def test_pretrained_new_head_and_in_chans(tmp_path):
    sd, path = _save_plain(tmp_path)
    model = timm.create_model('gequiv_p4_resnet18', pretrained=True, num_classes=10, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    rep = model.pretrained_load_report
    assert any(k.startswith('fc.weight: shape') for k in rep['not_loaded'])
    assert torch.equal(model.layer4[1].conv2.weight, sd['layer4.1.conv2.weight'])
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_load_backbone_checkpoint_on_instance(tmp_path):
    sd, path = _save_plain(tmp_path, 'efficientnet_b0')
    model = inject_equivariant_stem('efficientnet_b0', 'p4m')
    rep = load_backbone_checkpoint(model, path)
    assert torch.equal(model.blocks[6][0].conv_pw.weight, sd['blocks.6.0.conv_pw.weight'])
    assert any(k.startswith('conv_stem.weight') for k in rep['not_loaded'])
    assert rep['missing'] == []
