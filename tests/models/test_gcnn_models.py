"""The first timm models: gequiv_p4cnn / gequiv_p4mcnn / gequiv_z2cnn through timm's own factory."""
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401  (registers)
from gequiv_timm.data import load_mnist


@pytest.fixture(scope='module')
def digits():
    x, _ = load_mnist()
    return (x[:8] - 0.1307) / 0.3081


def test_registered_and_listed():
    names = timm.list_models('gequiv_*')
    for n in ('gequiv_p4cnn', 'gequiv_p4mcnn', 'gequiv_z2cnn'):
        assert n in names
        assert timm.is_model(n)


@pytest.mark.parametrize('name, lo, hi', [('gequiv_p4cnn', 20_000, 30_000), ('gequiv_z2cnn', 20_000, 30_000),
                                          ('gequiv_p4mcnn', 20_000, 30_000)])
def test_parameter_budget(name, lo, hi):
    m = timm.create_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert lo <= n <= hi


@pytest.mark.parametrize('name, group_elems', [('gequiv_p4cnn', [(0, 1), (0, 2), (0, 3)]),
                                               ('gequiv_p4mcnn', [(m, r) for m in (0, 1) for r in range(4)])])
@pytest.mark.parametrize('train', [False, True])
def test_logits_invariant_on_real_digits(name, group_elems, train, digits):
    torch.manual_seed(0)
    model = timm.create_model(name).double().train(train)
    x = digits.double()
    with torch.no_grad():
        ref = model(x)
        for m, r in group_elems:
            xg = torch.rot90(torch.flip(x, dims=(-1,)) if m else x, r, dims=(-2, -1))
            assert (model(xg) - ref).abs().max().item() < 1e-9


def test_planar_model_is_not_invariant(digits):
    """The test above can fail: the planar twin changes its logits under rotation."""
    torch.manual_seed(0)
    model = timm.create_model('gequiv_z2cnn').eval()
    with torch.no_grad():
        d = (model(torch.rot90(digits, 1, dims=(-2, -1))) - model(digits)).abs().max().item()
    assert d > 1e-3


def test_timm_api(digits):
    m = timm.create_model('gequiv_p4cnn', num_classes=7, drop_rate=0.1, global_pool='max')
    feats = m.forward_features(digits)
    assert feats.shape == (8, 10, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (8, 10)
    assert m.forward_head(feats).shape == (8, 7)
    assert m.get_classifier().out_features == 7
    m.reset_classifier(3)
    assert m(digits).shape == (8, 3)
    m.reset_classifier(0)
    assert m(digits).shape == (8, 10)
    assert set(m.pretrained_cfg) >= {'input_size', 'mean', 'std', 'num_classes', 'classifier', 'architecture'}
    m2 = timm.create_model('gequiv_p4cnn', in_chans=3)
    assert m2(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_features_only_folded():
    m = timm.create_model('gequiv_p4mcnn', features_only=True, out_indices=(1, 3, 6))
    outs = m(torch.randn(2, 1, 28, 28))
    assert [o.shape[1] for o in outs] == m.feature_info.channels() == [7 * 8] * 3
    assert [o.dim() for o in outs] == [4, 4, 4]
    assert all(fi['layout'] == 'folded' and fi['group'] == 'p4m' for fi in m.feature_info.get_dicts())
    assert m.feature_info.reduction() == [2, 2, 2]


def test_forward_intermediates_and_prune():
    m = timm.create_model('gequiv_p4cnn')
    x = torch.randn(2, 1, 28, 28)
    final, inter = m.forward_intermediates(x, indices=[0, 6])
    assert torch.allclose(final, m.forward_features(x))
    assert [t.shape for t in inter] == [(2, 40, 26, 26), (2, 40, 2, 2)]
    only = m.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(only) == 2
    m.prune_intermediate_layers(indices=[2])
    assert len(m.stages) == 3


def test_grad_checkpointing_same_result():
    torch.manual_seed(0)
    m = timm.create_model('gequiv_p4cnn').double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    y1 = m(x)
    m.set_grad_checkpointing(True)
    y2 = m(x)
    y2.sum().backward()
    assert torch.allclose(y1, y2)
    assert m.stages[0].conv.weight.grad is not None
    assert m.group_matcher()['stem'] and m.no_weight_decay() == set()


@pytest.mark.parametrize('shape, msg', [((2, 28, 28), 'expected an image batch'),
                                        ((2, 3, 28, 28), 'expected 1 input channels'),
                                        ((2, 1, 12, 12), 'too small')])
def test_bad_inputs(shape, msg):
    m = timm.create_model('gequiv_p4cnn')
    with pytest.raises(ValueError, match=msg):
        m(torch.randn(*shape))


def test_exact_input_sizes_rule():
    m = timm.create_model('gequiv_p4cnn')
    assert m.exact_input_sizes(28, 28)
    assert not m.exact_input_sizes(29, 29)  # 27 is odd where it is pooled
