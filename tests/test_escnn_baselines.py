"""The escnn baselines as timm models: registration, parameter match, invariance, export, timm API, extras."""
import sys

import pytest
import torch

pytest.importorskip('escnn')

import timm

import gequiv_timm  # noqa: F401
from gequiv_timm import registry
from gequiv_timm.models import escnn_baselines as eb

CNNS = ['gequiv_escnn_c4cnn', 'gequiv_escnn_c8cnn', 'gequiv_escnn_d4cnn']
ALL = CNNS + ['gequiv_escnn_c8_wrn']


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    out = {}
    for name in ALL:
        m = timm.create_model(name)
        # a few training steps' worth of BN statistics so eval mode is not the identity-ish init
        m.train()
        with torch.no_grad():
            m(torch.randn(8, 1, 28, 28))
        out[name] = m.eval()
    return out


def test_registered_through_catalog_with_requires():
    names = timm.list_models('gequiv_escnn_*')
    assert set(ALL) <= set(names)
    for name in ALL:
        entry = registry.get_entry(name)
        assert entry.requires == ['escnn']
        assert entry.family == 'escnn_baselines'


@pytest.mark.parametrize('name', CNNS)
def test_parameters_match_p4cnn(name, models):
    ref = n_params(timm.create_model('gequiv_p4cnn'))
    got = n_params(models[name])
    assert abs(got - ref) / ref < 0.03, (name, got, ref)


@pytest.mark.parametrize('name', ALL)
def test_logits_invariant_to_quarter_turns(name, models):
    m = models[name]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = m(x)
        for k in (1, 2, 3):
            yk = m(torch.rot90(x, k, dims=(-2, -1)))
            assert torch.allclose(yk, y, atol=1e-4), (name, k, (yk - y).abs().max())
    # sanity: the network is not constant
    assert (y[0] - y[1]).abs().max() > 1e-3


def test_d4_is_mirror_invariant_and_c4_is_not(models):
    x = torch.randn(3, 1, 28, 28)
    xf = torch.flip(x, dims=(-1,))
    with torch.no_grad():
        d4 = models['gequiv_escnn_d4cnn']
        assert torch.allclose(d4(xf), d4(x), atol=1e-4)
        c4 = models['gequiv_escnn_c4cnn']
        assert (c4(xf) - c4(x)).abs().max() > 1e-3


@pytest.mark.parametrize('name', ['gequiv_escnn_c4cnn', 'gequiv_escnn_c8_wrn'])
def test_export_is_plain_torch_and_matches(name, models):
    from escnn import nn as enn
    m = models[name]
    e = m.export()
    assert e.exported and not m.exported
    assert not any(isinstance(mod, enn.EquivariantModule) for mod in e.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(e(x), m(x), atol=1e-5)
    # the source model is untouched and still escnn
    assert any(isinstance(mod, enn.R2Conv) for mod in m.modules())


def test_timm_api(models):
    # small widths keep it fast; the registered layout is exercised by the fixture models
    m = timm.create_model('gequiv_escnn_c4cnn', num_classes=5, in_chans=3, drop_rate=0.1, global_pool='max',
                          widths=[3, 3, 3, 3, 3, 3, 3])
    x = torch.randn(2, 3, 28, 28)
    assert m(x).shape == (2, 5)
    assert m.get_classifier().out_features == 5
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    final, inter = m.forward_intermediates(x)
    assert final.shape[1] == m.num_features
    assert [t.shape[1] for t in inter] == [f['num_chs'] for f in m.feature_info]
    assert len(m.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    assert m.group_matcher()['stem'].startswith('^stages')
    assert m.no_weight_decay() == set()


def test_features_only():
    f = timm.create_model('gequiv_escnn_c8_wrn', features_only=True, stem_width=2, widths=[2, 3, 4])
    outs = f(torch.randn(2, 1, 28, 28))
    assert [o.shape[1] for o in outs] == f.feature_info.channels()
    assert [28 // o.shape[-1] for o in outs] == f.feature_info.reduction()


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = timm.create_model('gequiv_escnn_c4cnn', widths=[3, 3, 3, 3, 3, 3, 3])
    x = torch.randn(4, 1, 28, 28)
    grads = []
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        m.train()
        m(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_bad_input_messages(models):
    m = models['gequiv_escnn_c4cnn']
    with pytest.raises(ValueError, match='in_chans=3'):
        m(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r'\[B, C=1, H, W\]'):
        m(torch.randn(1, 28, 28))
    with pytest.raises(ValueError, match='group must be one of'):
        eb.EscnnCNN(group='c5')
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('gequiv_escnn_c4cnn', pretrained=True)


def test_missing_escnn_names_the_extra(monkeypatch):
    # escnn itself cannot be imported
    for mod in [k for k in sys.modules if k == 'escnn' or k.startswith('escnn.')]:
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"gequiv_timm\[escnn\]"):
        eb._create('gequiv_escnn_c4cnn')
    assert not eb.escnn_available()


def test_catalog_requires_is_enforced(monkeypatch):
    # the registry's builder checks the extra before importing anything (escnn mapped to a missing module)
    monkeypatch.setitem(registry.EXTRAS, 'escnn', 'escnn_not_installed_xyz')
    with pytest.raises(ImportError, match=r"gequiv_timm\[escnn\]"):
        timm.create_model('gequiv_escnn_d4cnn')


def test_exact_svd_shim_accepts_np_matrix():
    """escnn hands its null-space solver an np.matrix; the shim takes it and agrees with numpy's SVD."""
    import numpy as np
    a = np.asmatrix(np.random.default_rng(0).standard_normal((6, 4)))
    u, s, vh = eb._exact_svd(a, n_components=4, random_state=None)
    assert np.allclose(s, np.linalg.svd(np.asarray(a), compute_uv=False))
    assert np.allclose((u * s) @ vh, np.asarray(a))
