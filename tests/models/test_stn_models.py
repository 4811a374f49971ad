"""STN front ends as timm models: identity start through the whole model, parallel / stage transformers, the
localisation net's own learning rate, features, inspection."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import gequiv_timm  # noqa: F401  (registers)
from gequiv_timm.layers.stn import TRANSFORMS
from gequiv_timm.models.stn import STNFrontEnd


SMALL_CNN = dict(widths=[8, 8, 8], kernel_size=3, padding=1, pool_after=[0, 1])


def _digits(n=4, size=42):
    from gequiv_timm.data import load_mnist
    x, _ = load_mnist()
    x = F.pad(x[:n], [(size - 28) // 2] * 4)
    return (x - 0.1307) / 0.3081


def test_registered():
    names = timm.list_models('gequiv_stn*')
    for n in ('gequiv_stn_resnet18', 'gequiv_stn_tps_resnet18', 'gequiv_stn_cnn_mnist', 'gequiv_stn2x_resnet50'):
        assert n in names


@pytest.mark.parametrize('transform', TRANSFORMS)
def test_front_end_is_transparent_at_init(transform):
    """At initialisation the wrapped model computes exactly what its backbone computes (for every family)."""
    torch.manual_seed(0)
    backbone = timm.create_model('gequiv_z2cnn', num_classes=10, **SMALL_CNN).eval()
    model = STNFrontEnd(copy.deepcopy(backbone), transform, in_chans=1, padding_mode='border').eval()
    x = torch.rand(3, 1, 20, 20)
    with torch.no_grad():
        assert (model.rectify(x) - x).abs().max() <= 1e-5
        assert (model(x) - backbone(x)).abs().max() <= 1e-4
    assert model.last_theta.shape[0] == 3


def test_mnist_st_cnn_on_real_digits():
    torch.manual_seed(0)
    model = timm.create_model('gequiv_stn_cnn_mnist').eval()
    x = _digits()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10)
    assert torch.allclose(model.last_theta, torch.tensor([[1., 0., 0.], [0., 1., 0.]]).expand(4, 2, 3))
    assert model.pretrained_cfg['input_size'] == (1, 42, 42)
    feats = timm.create_model('gequiv_stn_cnn_mnist', features_only=True)(x)
    assert [f.shape[1] for f in feats] == [16, 32, 32]
    # the transformer's output is what the backbone sees: border padding keeps the digit's black background
    with torch.no_grad():
        model.stn.head.bias.copy_(torch.tensor([0., 0., 0.5, 0., 0., 0.]))  # shift the view right
        y = model.rectify(x)
    assert torch.allclose(y[..., -3:], x.min().expand_as(y[..., -3:]), atol=1e-5)


def test_gradients_reach_localisation_net_through_the_model():
    torch.manual_seed(0)
    model = timm.create_model('gequiv_stn_cnn_mnist')
    x, y = _digits(8), torch.arange(8) % 10
    opt = torch.optim.SGD(model.param_groups(lr=0.1, loc_lr_mult=1.0))
    F.cross_entropy(model(x), y).backward()
    assert model.stn.head.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.stn.loc_net.named_parameters():
        assert p.grad.abs().sum() > 0, n


def test_param_groups_and_group_matcher_with_timm_loc_backbone():
    torch.manual_seed(0)
    model = timm.create_model('gequiv_stn_resnet18', loc_backbone='resnet18', loc_input_size=32, num_classes=5,
                              loc_lr_mult=0.1)
    assert isinstance(model.stn.loc_net, timm.models.ResNet)
    groups = model.param_groups(lr=1e-3, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g['params']]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[1]['lr'] == pytest.approx(1e-4) and 'lr_scale' not in groups[1]
    assert {id(p) for p in groups[1]['params']} == {id(p) for p in model.stn.parameters()}
    # timm: lr_scale, applied by timm's schedulers
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    groups = model.param_groups(weight_decay=0.01)
    assert groups[1]['lr_scale'] == pytest.approx(0.1) and 'lr' not in groups[1]
    opt = create_optimizer_v2(groups, 'adamw', lr=1e-3)
    sched, _ = create_scheduler_v2(opt, 'cosine', num_epochs=2, warmup_epochs=0)
    sched.step(1)
    assert opt.param_groups[1]['lr'] == pytest.approx(0.1 * opt.param_groups[0]['lr'])
    # group_matcher: the transformer is its own (first) group, the backbone keeps its own grouping
    from timm.models._manipulate import group_parameters
    grouped = group_parameters(model, model.group_matcher(), reverse=True)
    assert grouped['stn.head.weight'] == 0 and grouped['stn.loc_net.conv1.weight'] == 0
    assert 0 < grouped['backbone.conv1.weight'] < grouped['backbone.layer4.1.conv2.weight']
    assert grouped['backbone.fc.weight'] == max(grouped.values())
    x = torch.rand(2, 3, 48, 48)
    assert model(x).shape == (2, 5)


def test_parallel_2x_crops_and_concatenated_features():
    torch.manual_seed(0)
    model = STNFrontEnd('gequiv_z2cnn', 'attention', num_transforms=2, out_size=0.5, in_chans=1, num_classes=3,
                        transform_kwargs=dict(scale_range=(0.25, 1.1), max_translation=1.0),
                        init_translations=[(-0.5, 0.0), (0.5, 0.0)], backbone_kwargs=SMALL_CNN)
    x = torch.rand(2, 1, 32, 32)
    views = model.rectify(x)
    assert views.shape == (2, 2, 1, 16, 16)
    # each branch sees its own view; the features are the two branches' maps concatenated along channels
    with torch.no_grad():
        feats = model.forward_features(x)
        f0 = model.backbones[0].forward_features(views[:, 0])
        f1 = model.backbones[1].forward_features(views[:, 1])
    assert torch.allclose(feats, torch.cat((f0, f1), 1))
    assert model.num_features == 16 and model(x).shape == (2, 3)
    assert model.last_theta.shape == (2, 2, 2, 3)
    assert torch.allclose(model.last_theta[0, :, 0, 2], torch.tensor([-0.5, 0.5]), atol=1e-6)
    shared = STNFrontEnd('gequiv_z2cnn', 'attention', num_transforms=2, share_backbone=True, in_chans=1,
                         num_classes=3, backbone_kwargs=SMALL_CNN)
    assert len(shared.backbones) == 1 and shared(x).shape == (2, 3)


def test_stn2x_resnet50_registered_model_small_input():
    torch.manual_seed(0)
    model = timm.create_model('gequiv_stn2x_resnet50', num_classes=4).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert model.rectify(x).shape == (1, 2, 3, 32, 32)
        assert model(x).shape == (1, 4)
    assert model.num_features == 2 * 2048 and len(model.backbones) == 2


def test_stage_transformer_on_feature_maps():
    torch.manual_seed(0)
    plain = STNFrontEnd('resnet18', 'affine', num_classes=3, loc_input_size=16).eval()
    staged = STNFrontEnd('resnet18', 'affine', num_classes=3, loc_input_size=16, stage_stn=2).eval()
    staged.load_state_dict(plain.state_dict(), strict=False)
    assert staged.stage_stn_module == 'backbone.layer2' and staged.stage_stn.in_chans == 128
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert (staged(x) - plain(x)).abs().max() < 1e-4  # identity start, on feature maps too
        staged.stage_stn.head.bias.copy_(torch.tensor([0., 0., 0.6, 0., 0., 0.]))
        moved = staged(x)
        assert staged.stage_stn.last_theta[0, 0, 2] == pytest.approx(0.6)
        assert (moved - plain(x)).abs().max() > 1e-3
        # a deep copy's hook drives the copy's own stage transformer
        twin = copy.deepcopy(staged)
        twin.stage_stn.head.bias.zero_()
        assert (twin(x) - plain(x)).abs().max() < 1e-4
        assert torch.allclose(staged(x), moved)
    with pytest.raises(ValueError, match='stage_stn'):
        STNFrontEnd('resnet18', stage_stn=7)


def test_tps_model_and_transform_loss():
    torch.manual_seed(0)
    model = timm.create_model('gequiv_stn_tps_resnet18', num_classes=2, reg_weight=1.0, boundary_weight=1.0)
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 2) and model.last_theta.shape == (2, 16, 2)
    assert model.transform_loss().item() == 0
    with torch.no_grad():
        model.stn.head.bias.fill_(0.3)
    model(x)
    loss = model.transform_loss()
    assert loss.item() > 0
    loss.backward()
    assert model.stn.head.bias.grad.abs().sum() > 0


def test_errors_are_clear():
    with pytest.raises(TypeError):
        timm.create_model('gequiv_stn_cnn_mnist', not_an_arg=1)
    with pytest.raises(ValueError, match='by name'):
        STNFrontEnd(timm.create_model('resnet18'), num_transforms=2)
    with pytest.raises(ValueError, match='unknown transform'):
        STNFrontEnd('resnet18', transform='shear')
    model = timm.create_model('gequiv_stn_cnn_mnist')
    with pytest.raises(ValueError, match='1 input channels'):
        model(torch.rand(1, 3, 42, 42))


def test_stn_viz_writes_png(tmp_path):
    import argparse

    from gequiv_timm import viz
    from gequiv_timm.cli import stn_viz
    p = argparse.ArgumentParser()
    stn_viz.add_arguments(p)
    out = tmp_path / 'stn.png'
    args = p.parse_args(['--num', '2', '--out', str(out), '--protocol', 'RTS'])
    assert stn_viz.run(args) == 0
    data = out.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
    # a parallel model: one rectified column per transformer
    torch.manual_seed(0)
    model = STNFrontEnd('gequiv_z2cnn', 'attention', num_transforms=2, in_chans=1, num_classes=3,
                        init_translations=[(-0.3, 0.0), (0.3, 0.0)], backbone_kwargs=SMALL_CNN)
    path = viz.plot_stn(model, torch.rand(2, 1, 24, 24), str(tmp_path / 'two.png'))
    assert path.read_bytes()[:4] == b'\x89PNG'
    args = p.parse_args(['--model', 'gequiv_z2cnn', '--out', str(tmp_path / 'x.png')])
    assert stn_viz.run(args) == 2  # not an STN model: a clear message, no file
    assert not (tmp_path / 'x.png').exists()
