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
    with pytest.raises(ValueError, match=r'\[B, 1, H, W\]'):
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
        eb.gequiv_escnn_c4cnn()
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


# ----- timm factory kwargs, copies and escnn's shared basis cache ----------------------------------------------
def test_factory_dtype_and_independent_bases():
    """``dtype=`` builds the model in that dtype; moving one model leaves every other escnn model as it was (escnn
    shares basis-expansion modules between convs through a process-wide cache; each model owns copies)."""
    a = timm.create_model('gequiv_escnn_c4cnn').eval()
    b = timm.create_model('gequiv_escnn_c4cnn', dtype=torch.float64).eval()
    assert {t.dtype for t in [*b.parameters(), *b.buffers()] if t.is_floating_point()} == {torch.float64}
    assert {t.dtype for t in [*a.parameters(), *a.buffers()] if t.is_floating_point()} == {torch.float32}
    x = torch.randn(2, 1, 28, 28)
    assert a(x).dtype == torch.float32 and b(x.double()).dtype == torch.float64
    a.to(torch.bfloat16)
    c = timm.create_model('gequiv_escnn_c4cnn').eval()
    assert {t.dtype for t in [*c.parameters(), *c.buffers()] if t.is_floating_point()} == {torch.float32}
    assert c(x).dtype == torch.float32


def test_meta_device_construction():
    m = timm.create_model('gequiv_escnn_d4cnn', device='meta')
    wrong = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.device.type != 'meta']
    assert not wrong
    assert len(list(m.modules())) > 10  # enumerating modules must not hit escnn's value equality on meta tensors
    assert timm.create_model('gequiv_escnn_d4cnn')(torch.randn(1, 1, 28, 28)).device.type == 'cpu'


@pytest.mark.parametrize('name', ['gequiv_escnn_c8cnn', 'gequiv_escnn_c8_wrn'])
def test_deepcopy_in_eval_mode(name, models):
    import copy
    m = models[name]
    x = torch.randn(2, 1, 28, 28)
    twin = copy.deepcopy(m)
    torch.testing.assert_close(twin(x), m(x))


def test_integer_input_is_refused(models):
    with pytest.raises(TypeError, match='floating point'):
        models['gequiv_escnn_c4cnn'](torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_pruned_features_are_the_folded_tap(models):
    import copy
    m = copy.deepcopy(models['gequiv_escnn_c4cnn'])
    x = torch.randn(2, 1, 28, 28)
    taps = m.forward_intermediates(x, intermediates_only=True)
    m.prune_intermediate_layers([2], prune_norm=True)
    assert m.num_features == taps[2].shape[1] == 12 * 4
    torch.testing.assert_close(m.forward_features(x), taps[2])
    m2 = copy.deepcopy(models['gequiv_escnn_c4cnn'])
    m2.prune_intermediate_layers([2], prune_head=False)
    assert m2.num_features == 12 and m2(x).shape == (2, 10)
    # invariant features after pruning: group pooling rebuilt for the kept stage
    torch.testing.assert_close(m2.forward_features(torch.rot90(x, 1, (-2, -1))),
                               torch.rot90(m2.forward_features(x), 1, (-2, -1)), atol=1e-4, rtol=1e-4)


def test_field_max_pool_matches_escnn_group_pooling():
    gspaces, enn = eb.import_escnn()
    for gs in (gspaces.rot2dOnR2(4), gspaces.flipRot2dOnR2(4)):
        t = enn.FieldType(gs, 3 * [gs.regular_repr])
        x = torch.randn(2, t.size, 5, 5)
        ref = enn.GroupPooling(t)(enn.GeometricTensor(x, t)).tensor
        torch.testing.assert_close(eb.FieldMaxPool(gs.regular_repr.size)(x), ref)
        assert eb.FieldMaxPool(gs.regular_repr.size)(x.double()).dtype == torch.float64
