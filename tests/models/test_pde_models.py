"""PDE-G-CNN timm models (gequiv_timm/models/pde.py, registry/pde.toml): the timm API, rotation invariance by
actually rotating digits, and the PDE stem injected into a timm backbone."""
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401
from gequiv_timm.layers.pde import PDEStem
from gequiv_timm.models.pde import PDEGCNN, create_pde_stem_model



def _small(**kw):
    args = dict(widths=(4, 4, 4, 4), pool_after=(0, 2), kernel_size=(3, 3, 3))
    args.update(kw)
    return timm.create_model('gequiv_pde_cnn_rotmnist', **args)


def test_registered_with_timm_and_params_below_quarter_of_p4cnn():
    assert 'gequiv_pde_cnn_rotmnist' in timm.list_models('gequiv_pde*')
    assert 'gequiv_pde_resnet18' in timm.list_models('gequiv_pde*')
    pde = timm.create_model('gequiv_pde_cnn_rotmnist')
    p4 = timm.create_model('gequiv_p4cnn')
    n_pde = sum(p.numel() for p in pde.parameters())
    n_p4 = sum(p.numel() for p in p4.parameters())
    assert isinstance(pde, PDEGCNN) and n_pde <= n_p4 / 4
    assert pde.pretrained_cfg['first_conv'] == 'stages.0.lift'


@pytest.mark.parametrize('train', [True, False])
def test_logits_invariant_to_quarter_turns(train):
    torch.manual_seed(0)
    model = _small().train(train)
    x = torch.randn(4, 1, 28, 28)
    assert model.exact_input_sizes(28, 28)
    y = model(x)
    for k in (1, 2, 3):
        yr = model(torch.rot90(x, k, dims=(-2, -1)))
        assert ((yr - y).abs().max() / y.abs().max()).item() <= 1e-5


def test_features_rotate_with_the_input():
    torch.manual_seed(1)
    model = _small().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        f, fr = model.forward_features(x), model.forward_features(torch.rot90(x, 1, dims=(-2, -1)))
    torch.testing.assert_close(fr, torch.rot90(f, 1, dims=(-2, -1)), rtol=1e-5, atol=1e-5 * f.abs().max().item())


def test_timm_api():
    model = _small(num_classes=7, drop_rate=0.1)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 4)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [4 * 8] * 4
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert final.shape == (2, 4, 6, 6) and len(inter) == 2
    nwd = model.no_weight_decay()
    assert any(n.endswith('.g0') for n in nwd) and any(n.endswith('.metric_params') for n in nwd)
    assert set(model.group_matcher()) == {'stem', 'blocks'}
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_features_only_and_in_chans():
    m = timm.create_model('gequiv_pde_cnn_rotmnist', features_only=True, out_indices=(0, 5))
    outs = m(torch.randn(1, 1, 28, 28))
    assert [tuple(o.shape) for o in outs] == [(1, 24 * 8, 12, 12), (1, 24 * 8, 6, 6)]
    m3 = _small(in_chans=3)
    assert m3(torch.randn(1, 3, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match='expected 3 input channels'):
        m3(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match='too small'):
        _small()(torch.randn(1, 1, 8, 8))


def test_param_groups_speed_up_the_pde_coefficients():
    model = _small(coef_lr_mult=10.0)
    coef = {id(p) for n, p in model.named_parameters() if n.endswith(('.g0', '.metric_params'))}
    groups = model.param_groups(lr=0.01, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g['params']]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter once
    for g in groups:
        ids = {id(p) for p in g['params']}
        if ids & coef:
            assert ids <= coef and g['lr'] == pytest.approx(0.1) and g['weight_decay'] == 0.0
        else:
            assert g['lr'] == pytest.approx(0.01)
            assert g['weight_decay'] == (0.05 if all(p.ndim > 1 for p in g['params']) else 0.0)
    timm_groups = model.param_groups(weight_decay=0.05)  # timm's factories: lr_scale, applied by its schedulers
    assert sorted(g['lr_scale'] for g in timm_groups) == [1.0, 1.0, 10.0]
    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 1, 28, 28)).logsumexp(1).sum().backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert max(v for n, v in moved.items() if n.endswith('.g0')) == pytest.approx(0.1, rel=1e-3)
    assert max(v for n, v in moved.items() if n.endswith('linear.weight')) == pytest.approx(0.01, rel=0.05)  # + decay


def test_prune_intermediate_layers():
    model = _small()
    assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.stages) == 2
    assert model.forward_intermediates(torch.randn(1, 1, 28, 28), indices=[1], intermediates_only=True)[0].shape == \
        (1, 4 * 8, 12, 12)


def test_pde_stem_injected_into_resnet():
    torch.manual_seed(2)
    model = create_pde_stem_model('resnet18', num_classes=5, stem_width=4)
    assert isinstance(model.conv1, PDEStem)
    assert model._gequiv_stem['replaced'] == ['conv1', 'bn1', 'act1', 'maxpool']
    assert model.pretrained_cfg['first_conv'] == 'conv1.lift'
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 5)
        # the stem's planar output rotates with the image (input size a multiple of the stem's stride)
        s, sr = model.conv1(x), model.conv1(torch.rot90(x, 1, dims=(-2, -1)))
    torch.testing.assert_close(sr, torch.rot90(s, 1, dims=(-2, -1)), rtol=1e-5, atol=1e-5 * s.abs().max().item())


def test_registered_pde_resnet18_builds():
    model = timm.create_model('gequiv_pde_resnet18', num_classes=3, stem_width=4)
    assert isinstance(model.conv1, PDEStem) and model.conv1.out_chans == 64 and model.conv1.stride == 4
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_pretrained_plain_backbone_loads_into_non_stem_layers(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(3)
    plain = timm.create_model('resnet18', num_classes=1000)
    path = tmp_path / 'resnet18.safetensors'
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    model = timm.create_model('gequiv_pde_resnet18', pretrained=True, stem_width=4,
                              pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.layer1[0].conv1.weight, plain.layer1[0].conv1.weight)
    torch.testing.assert_close(model.fc.weight, plain.fc.weight)
    report = model.pretrained_load_report
    assert any(k.startswith('conv1.weight') for k in report['not_loaded'])
    assert any(k.startswith('conv1.lift') for k in report['initialised'])


def test_pde_coefficients_have_no_weight_decay():
    model = create_pde_stem_model('resnet18', num_classes=3, stem_width=4)
    nwd = model.no_weight_decay()
    assert 'conv1.layers.0.convection.g0' in nwd and 'conv1.layers.0.dilation.metric_params' in nwd
    import copy
    assert copy.deepcopy(model).no_weight_decay() == nwd
