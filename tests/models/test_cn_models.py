"""C_N / D_N models (issue 16): gequiv_c8cnn / gequiv_d8cnn / gequiv_c16cnn, and the group ResNets, All-CNN and the
equivariant stem on the new groups.

Quarter turns (and, for D_N, mirrors) are exact when 4 divides N: checked here with torch.rot90 / torch.flip on the
input, in float64. The other rotations are approximate; tests/test_symmetry.py holds the measured model figures.
"""
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401  (registers)
from gequiv_timm.data import load_mnist
from gequiv_timm.layers.gconv import GroupConv2d
from gequiv_timm.layers.stem import EquivariantStem
from gequiv_timm.models.gcnn import GroupCNN
from gequiv_timm.models.gresnet import GroupAllCNN, GroupResNet

CN = {'gequiv_c8cnn': 'c8', 'gequiv_d8cnn': 'd8', 'gequiv_c16cnn': 'c16'}


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


def _moves(group):
    """The input transforms that the logits must ignore exactly: quarter turns, and for D_N the mirrors too."""
    rots = [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    if not group.startswith('d'):
        return rots
    return rots + [lambda x, k=k: torch.rot90(torch.flip(x, dims=(-1,)), k, dims=(-2, -1)) for k in range(4)]


@pytest.fixture(scope='module')
def digits():
    x, _ = load_mnist()
    return ((x[:4] - 0.1307) / 0.3081).double()


@pytest.mark.parametrize('name', sorted(CN))
def test_parameters_match_p4cnn_within_ten_percent(name):
    ref = _n_params(timm.create_model('gequiv_p4cnn'))
    n = _n_params(timm.create_model(name))
    assert abs(n - ref) <= 0.10 * ref, (name, n, ref)
    # and the widths really are the layout's: 7 convolutions 3x3, one pool after stage 1, the harmonic basis
    m = timm.create_model(name)
    convs = [mod for mod in m.modules() if isinstance(mod, GroupConv2d)]
    assert len(convs) == 7 and all(c.kernel_size == 3 and c.padding == 0 for c in convs)
    assert all(c.filter_basis == 'harmonic' and c.out_group.name == CN[name] for c in convs)
    assert m.pool_after == (1,) and m.group_pool.mode == 'max'


def test_c8cnn_is_cheaper_than_escnns_c8_model_with_fewer_parameters():
    """The C8 layout's promise (gcnn.py, registry/gcnn.toml): 7 fields in the two stages before the pool, 9 after,
    21,188 parameters, fewer than escnn's C8 model and at most 0.70x its exported convolution MACs."""
    pytest.importorskip('escnn')
    from gequiv_timm.measure import count_macs
    ours = timm.create_model('gequiv_c8cnn').eval()
    theirs = timm.create_model('gequiv_escnn_c8cnn').eval()
    assert [c.out_channels for c in ours.modules() if isinstance(c, GroupConv2d)] == [7, 7, 9, 9, 9, 9, 9]
    assert _n_params(ours) == 21_188 < _n_params(theirs)
    assert count_macs(ours.export()) <= 0.70 * count_macs(theirs.export())


@pytest.mark.parametrize('name', sorted(CN))
@pytest.mark.parametrize('train', [False, True])
def test_logits_exactly_invariant_to_quarter_turns(name, train, digits):
    torch.manual_seed(0)
    model = timm.create_model(name).double().train(train)
    with torch.no_grad():
        ref = model(digits)
        for move in _moves(CN[name]):
            assert (model(move(digits)) - ref).abs().max().item() < 1e-9


def test_c8_is_not_invariant_to_mirrors(digits):
    """The check above can fail: C8 has no mirrors, so a mirrored digit changes its logits."""
    torch.manual_seed(0)
    model = timm.create_model('gequiv_c8cnn').double().eval()
    with torch.no_grad():
        d = (model(torch.flip(digits, dims=(-1,))) - model(digits)).abs().max().item()
    assert d > 1e-4


def test_small_widths_features_and_basis_arguments():
    m = timm.create_model('gequiv_c8cnn', widths=[2, 3, 3], features_only=True, out_indices=(0, 2))
    outs = m(torch.randn(2, 1, 28, 28))
    assert [o.shape[1] for o in outs] == m.feature_info.channels() == [2 * 8, 3 * 8]
    assert all(fi['group'] == 'c8' and fi['layout'] == 'folded' for fi in m.feature_info.get_dicts())
    m = timm.create_model('gequiv_d8cnn', widths=[2, 2, 2], filter_basis='bilinear')
    assert all(c.filter_basis == 'bilinear' for c in m.modules() if isinstance(c, GroupConv2d))
    m = timm.create_model('gequiv_c16cnn', widths=[2, 2, 2], max_frequency=1)
    assert all(c.max_frequency == 1 for c in m.modules() if isinstance(c, GroupConv2d))
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize('kwargs, fragment', [
    (dict(filter_basis='pixel'), "GroupCNN: filter_basis='pixel'"),
    (dict(filter_basis='spline'), "GroupCNN: filter_basis must be one of"),
    (dict(max_frequency=-1), "GroupCNN: max_frequency must be a non-negative int"),
])
def test_basis_arguments_refused_before_building(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        timm.create_model('gequiv_c8cnn', **kwargs)


def test_p4_models_unchanged():
    # the new arguments leave the GrouPy-exact p4 / p4m layers on their pixel basis
    m = timm.create_model('gequiv_p4cnn')
    assert all(c.filter_basis == 'pixel' for c in m.modules() if isinstance(c, GroupConv2d))
    assert _n_params(m) == 21_940


# ----- the other families on the new groups -----------------------------------------------------------------
def _family(kind, group):
    if kind == 'resnet_cifar':
        return GroupResNet(group=group, layers=(1, 1), widths=(2, 3), num_classes=3)
    if kind == 'resnet_imagenet':
        return GroupResNet(group=group, layers=(1, 1), widths=(2, 3), stem_type='imagenet', num_classes=3)
    if kind == 'allcnn':
        return GroupAllCNN(group=group, widths=(2, 3), num_classes=3)
    return GroupCNN(group=group, widths=(2, 2, 2), num_classes=3)


@pytest.mark.parametrize('kind', ['resnet_cifar', 'resnet_imagenet', 'allcnn', 'gcnn'])
@pytest.mark.parametrize('group', ['c8', 'd8', 'c12'])
def test_families_accept_cn_dn_exact_on_quarter_turns(kind, group):
    torch.manual_seed(0)
    m = _family(kind, group).double().eval()
    assert m.group.name == group
    assert all(c.filter_basis == 'harmonic' for c in m.modules() if isinstance(c, GroupConv2d))
    x = torch.randn(2, 3 if kind != 'gcnn' else 1, 32 if kind != 'gcnn' else 28, 32 if kind != 'gcnn' else 28,
                    dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        for move in _moves(group):
            assert (m(move(x)) - ref).abs().max().item() < 1e-12
        if group.startswith('c'):  # no mirrors in C_N: a flip changes the logits (the check can fail)
            assert (m(torch.flip(x, dims=(-1,))) - ref).abs().max().item() > 1e-6


@pytest.mark.parametrize('group', ['c8', 'd8', 'c16'])
@pytest.mark.parametrize('mode', ['invariant', 'equivariant'])
def test_equivariant_stem_on_cn_dn(group, mode):
    torch.manual_seed(0)
    stem = EquivariantStem(3, 32, 2, group=group, mode=mode, kernel_size=5).double().eval()
    assert stem.lift.filter_basis == 'harmonic'
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = stem(x)
        for k in (1, 2, 3):  # element N/4 * k of the group is the quarter turn k
            g = stem.group.element(0, k * stem.group.rotations // 4)
            yr = stem(torch.rot90(x, k, dims=(-2, -1)))
            assert (yr - stem.transform_output(y, g)).abs().max().item() < 1e-12
    assert stem.check_equivariance(atol=1e-12) < 1e-12  # default: the grid elements, exact
    # at 2*pi/N (smooth inputs, the centre pixel): approximate, and far from exact
    approx = stem.check_equivariance(elements=[1])
    assert 1e-6 < approx.relative < 0.5


def test_stem_warm_start_projects_onto_the_harmonic_basis():
    torch.manual_seed(0)
    stem = EquivariantStem(3, 16, 2, group='c8', kernel_size=3)
    # a planar filter already in the basis (its identity-element filter) is recovered exactly
    coeffs = torch.randn(2, 3, 1, stem.lift.basis_size)
    coeffs[1] *= 0.1  # init_from_conv takes the filters by decreasing norm: keep them in this order
    planar = stem.lift._expand(coeffs).view(2, 8, 3, 3, 3)[:, 0]  # [C, C_in, k, k] at the identity
    stem.init_from_conv(planar)
    got = stem.lift.weight[:2]
    assert torch.allclose(got, coeffs, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected a conv weight \[C, 3, k, k\]"):
        stem.init_from_conv(torch.randn(4, 1, 3, 3))


def test_inject_c8_stem_into_a_timm_backbone():
    from gequiv_timm import inject_equivariant_stem
    torch.manual_seed(0)
    m = inject_equivariant_stem('resnet18', 'c8', 'invariant', num_classes=5).double().eval()
    stem = next(mod for mod in m.modules() if isinstance(mod, EquivariantStem))
    assert stem.group.name == 'c8' and stem.check_equivariance(size=32) < 1e-12
    assert m(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 5)


def test_stem_refuses_the_trivial_group():
    with pytest.raises(ValueError, match=r"group must be 'p4', 'p4m' or 'cN' / 'dN'"):
        EquivariantStem(3, 16, 2, group='c1')


# ----- TorchScript and torch.fx of the expansion path -------------------------------------------------------
def _script(m):
    import warnings
    with warnings.catch_warnings():  # torch 2.x: "torch.jit.script is deprecated" (timm still tests it)
        warnings.simplefilter('ignore', FutureWarning)
        return torch.jit.script(m)


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize('name', sorted(CN))
def test_scripted_and_traced_equal_eager_and_keep_the_invariance(name):
    from timm.models import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    model = timm.create_model(name, widths=[2, 3, 3]).eval()
    _randomise_bn(model)
    x = torch.randn(2, 1, 28, 28)
    nodes = get_graph_node_names(model)[1]
    traced = create_feature_extractor(model, return_nodes=[nodes[-1]])
    scripted = _script(model)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(scripted(x), y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traced(x)[nodes[-1]], y, rtol=1e-5, atol=1e-6)
        for move in _moves(CN[name]):
            torch.testing.assert_close(scripted(move(x)), y, rtol=1e-5, atol=1e-5)
    # the scripted and traced models follow writes to the weights (no cached filter bank)
    with torch.no_grad():
        model.stages[1].conv.weight.mul_(-1.5)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traced(x)[nodes[-1]], model(x), rtol=1e-5, atol=1e-6)
    # and train: the expansion is differentiable through the script
    out = scripted.train()(x)
    out.sum().backward()
    assert model.stages[1].conv.weight.grad is not None


def test_scripted_cn_stem_and_resnet():
    torch.manual_seed(0)
    for model, shape in ((EquivariantStem(3, 16, 2, group='c8', mode='equivariant', kernel_size=5), (2, 3, 16, 16)),
                         (GroupResNet('d8', layers=(1, 1), widths=(2, 2), stem_type='imagenet', num_classes=3),
                          (2, 3, 16, 16))):
        model.eval()
        _randomise_bn(model)
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(_script(model)(x), model(x), rtol=1e-5, atol=1e-6)
