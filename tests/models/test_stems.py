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
    """The registered models' stem (issue 18): the lift's fields at every group element, folded into the stem's
    channels; a turn of the image turns the map and permutes every block of |G| channels."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    stem = get_stem(model)
    assert isinstance(stem, EquivariantStem) and stem.mode == 'equivariant' and not stem.proj_head
    assert len(stem.convs) == 0 and stem.width * stem.group.order == model._gequiv_stem['out_chs']
    _randomise_bn(stem)
    g = stem.group
    with torch.no_grad():
        y = stem_output(model, image)
        assert y.shape[1] == model._gequiv_stem['out_chs']
        for e in g.elements()[1:]:
            yg = stem_output(model, g.transform_plane(image, e))
            assert _err(yg, stem.transform_output(y, e)) < 1e-5, (name, e)
            assert _err(yg, g.transform_plane(y, e)) > 1e-2  # the channel blocks permute: not a planar turn
            assert _err(yg, y) > 1e-2  # and it does move (a digit is not symmetric)


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (a fresh eval-mode BN is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                for t in (m.running_mean, m.weight, m.bias):
                    t.copy_(torch.randn(t.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def test_stem_models_build_the_fast_stem_exactly(image):
    """The default stem is fold(ReLU(GBN(conv2d(x, w)))) with one strided conv of out_chs channels (the pooled lift's
    bank): checked against that reference, in train mode (batch statistics) and eval mode."""
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4_resnet18')
    stem = get_stem(model)
    _randomise_bn(stem)
    assert set(dict(stem.named_parameters())) == {'lift.weight', 'bn1.weight', 'bn1.bias'}
    w = stem.lift.pooled_weight()
    assert tuple(w.shape) == (64, 3, 8, 8)  # 16 fields x 4 rotations; the 7x7 filter smeared by the 2x2 pool
    bn = stem.bn1
    for train in (True, False):
        stem.train(train)
        z = F.conv2d(image, w.detach(), None, 2, 3)
        if train:
            mean = z.unflatten(1, (16, 4)).mean(dim=(0, 2, 3, 4)).repeat_interleave(4)
            var = z.unflatten(1, (16, 4)).var(dim=(0, 2, 3, 4), unbiased=False).repeat_interleave(4)
        else:
            mean, var = bn.running_mean.repeat_interleave(4), bn.running_var.repeat_interleave(4)
        ref = F.relu((z - mean[:, None, None]) / (var[:, None, None] + bn.eps).sqrt() * bn.weight.repeat_interleave(4)[
            :, None, None] + bn.bias.repeat_interleave(4)[:, None, None])
        with torch.no_grad():
            torch.testing.assert_close(stem(image), ref, atol=1e-5, rtol=1e-5)


def test_old_stem_design_is_an_argument(image):
    """The stem before issue 18 (3x3 group conv after the lift, pooled over the group, 1x1 conv, BN, ReLU) is built by
    mode='invariant', stem_depth=1, stem_proj=True, with its state-dict keys and its planar (invariant) output."""
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4_resnet18', mode='invariant', stem_depth=1, stem_proj=True).eval()
    stem = get_stem(model)
    keys = set(model.state_dict())
    assert {'conv1.lift.weight', 'conv1.convs.0.weight', 'conv1.proj.weight', 'conv1.bn2.weight'} <= keys
    assert stem.mode == 'invariant' and stem.proj_head and stem.width == 16
    _randomise_bn(stem)
    with torch.no_grad():
        y = stem_output(model, image)
        g = stem.group
        for e in g.elements()[1:]:
            assert _err(stem_output(model, g.transform_plane(image, e)), g.transform_plane(y, e)) < 1e-5
    new = set(timm.create_model('gequiv_p4_resnet18').state_dict())
    assert {k for k in new if k.startswith('conv1.')} == {'conv1.lift.weight', 'conv1.bn1.weight', 'conv1.bn1.bias',
                                                           'conv1.bn1.running_mean', 'conv1.bn1.running_var',
                                                           'conv1.bn1.num_batches_tracked'}


@pytest.mark.parametrize('group', ['p4', 'p4m', 'c8'])
@pytest.mark.parametrize('mode', ['invariant', 'equivariant'])
def test_stem_without_projection_is_equivariant(group, mode):
    """proj=False: the group layers' map is the output (pooled or folded); check_equivariance holds at rounding level
    for the elements on the pixel grid (every element of p4 / p4m, the quarter turns of c8), and the check fails for
    a stem whose output is read with the wrong action."""
    torch.manual_seed(0)
    out = 32 if group != 'p4m' else 64
    for depth in (0, 1):
        stem = EquivariantStem(3, out, 2, group=group, mode=mode, depth=depth, proj=False, kernel_size=5).double()
        _randomise_bn(stem)
        assert stem.width == (out if mode == 'invariant' else out // stem.group.order)
        assert stem(torch.randn(2, 3, 16, 16, dtype=torch.float64)).shape == (2, out, 8, 8)
        assert stem.check_equivariance(size=16) < 1e-10
    if mode == 'equivariant':  # read as a planar map, the folded output is not equivariant: the check can fail
        stem.transform_output = lambda y, e: stem.group.transform_plane(y, e)
        assert stem.check_equivariance(size=16) > 1e-2


def test_stem_without_projection_scripts():
    from tests.models.test_script_fx import _script
    torch.manual_seed(0)
    stem = EquivariantStem(3, 32, 2, group='p4', mode='equivariant', depth=0, proj=False).eval()
    _randomise_bn(stem)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_script(stem)(x), stem(x))


def test_stem_without_projection_errors():
    with pytest.raises(ValueError, match=r'with proj=False the equivariant stem.*width must be 16 for out_chs=64; '
                                         r'got width=8\. Leave width=None or use proj=True'):
        EquivariantStem(3, 64, 2, group='p4', mode='equivariant', width=8, proj=False)
    with pytest.raises(ValueError, match=r'with proj=False the invariant stem.*width must be 64'):
        EquivariantStem(3, 64, 2, group='p4', mode='invariant', width=16, proj=False)
    with pytest.raises(ValueError, match='proj must be True or False'):
        EquivariantStem(3, 64, 2, group='p4', proj=1)
    with pytest.raises(ValueError, match=r"stem_proj must be one of \(True, False\), got 'no'"):
        timm.create_model('gequiv_p4_resnet18', stem_proj='no')
    with pytest.raises(ValueError, match='multiple of 8'):
        EquivariantStem(3, 36, 2, group='p4m', mode='equivariant', proj=False)


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
