"""Group convolutions: equivariance for every group element, a direct reference computation, export, caching,
and clear errors. Equivariance is checked by actually rotating/flipping inputs (torch.rot90 / torch.flip)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from gequiv_timm.layers import (
    GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool, P4ConvP4, P4ConvZ2, P4MConvP4M, P4MConvZ2, get_group,
    stride_is_exact,
)

LIFT = {'p4': P4ConvZ2, 'p4m': P4MConvZ2}
GG = {'p4': P4ConvP4, 'p4m': P4MConvP4M}


def rot_flip(x, g, group):
    """The plane action written out independently of groups.py, in GrouPy's convention: g = M^m R^r, the rotation
    first, then the mirror u -> -u (the row axis)."""
    m, r = divmod(g, 4)
    x = torch.rot90(x, r, dims=(-2, -1))
    return torch.flip(x, dims=(-2,)) if m else x


def act_on_group_map(y, g, group):
    """(g.f)(x, h) = f(g^-1 x, g^-1 h): spatial transform + group-axis permutation (uses the Cayley table)."""
    G = get_group(group)
    y = rot_flip(y, g, group)
    gi = G.inv(g)
    return y[:, :, [G.mul(gi, h) for h in range(G.order)]]


def make_stack(group, train):
    torch.manual_seed(0)
    stack = nn.Sequential(
        LIFT[group](3, 6, 3, padding=1), GroupBatchNorm(6, group), nn.ReLU(),
        GG[group](6, 5, 5, padding=2), GroupBatchNorm(5, group), nn.ReLU(),
        GroupMaxPool2d(2, group=group),
        GG[group](5, 4, 3, padding=0, dilation=2),
    ).double()
    stack.train(train)
    return stack


@pytest.mark.parametrize('group', ['p4', 'p4m'])
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('size', [(16, 16), (12, 20)])
def test_stack_equivariant_every_element(group, train, size):
    stack = make_stack(group, train)
    x = torch.randn(4, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        fx = stack(x)
        for g in range(get_group(group).order):
            lhs = stack(rot_flip(x, g, group))
            rhs = act_on_group_map(fx, g, group)
            assert lhs.shape == rhs.shape
            assert (lhs - rhs).abs().max().item() < 1e-10, (group, g)


@pytest.mark.parametrize('group', ['p4', 'p4m'])
def test_float32_equivariance_1e5(group):
    torch.manual_seed(1)
    lift, conv = LIFT[group](1, 8, 3, padding=1), GG[group](8, 8, 3, padding=1)
    x = torch.rand(2, 1, 28, 28)
    y = conv(torch.relu(lift(x)))
    for g in range(get_group(group).order):
        y2 = conv(torch.relu(lift(rot_flip(x, g, group))))
        assert (y2 - act_on_group_map(y, g, group)).abs().max().item() < 1e-5


def test_equivariance_breaks_for_non_equivariant_filter():
    """Sanity check of the test itself: a plain conv applied to a lifted map is not equivariant."""
    torch.manual_seed(0)
    lift = P4ConvZ2(1, 2, 3, padding=1)
    plain = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 1, 10, 10)
    f = lambda t: plain(lift(t).flatten(1, 2)).unflatten(1, (2, 4))
    err = (f(rot_flip(x, 1, 'p4')) - act_on_group_map(f(x), 1, 'p4')).abs().max().item()
    assert err > 1e-2


def reference_gconv(x, weight, bias, group, lifting, stride, padding, dilation):
    """Independent direct computation: loop over output group elements h, transform the filter with rot90/flip
    and permute its input group axis by k -> h^-1 k, then one conv2d per h."""
    G = get_group(group)
    outs = []
    for h in range(G.order):
        w = rot_flip(weight, h, group)  # spatial part on the last two axes
        if not lifting:
            hi = G.inv(h)
            w = w[:, :, [G.mul(hi, k) for k in range(G.order)]]
        w = w.flatten(1, 2)
        xin = x if lifting else x.flatten(1, 2)
        outs.append(F.conv2d(xin, w, bias, stride, padding, dilation))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize('group', ['p4', 'p4m'])
@pytest.mark.parametrize('lifting', [True, False])
def test_matches_direct_reference(group, lifting):
    torch.manual_seed(2)
    cls = LIFT[group] if lifting else GG[group]
    conv = cls(3, 4, 5, stride=2, padding=2, dilation=1).double()
    nn.init.normal_(conv.bias)
    G = get_group(group).order
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64) if lifting else torch.randn(2, 3, G, 11, 9, dtype=torch.float64)
    ref = reference_gconv(x, conv.weight, conv.bias, group, lifting, 2, 2, 1)
    assert torch.allclose(conv(x), ref, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(group=st.sampled_from(['p4', 'p4m']), lifting=st.booleans(), cin=st.integers(1, 4), cout=st.integers(1, 4),
       k=st.sampled_from([1, 3, 5]), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       h=st.integers(7, 12), w=st.integers(7, 12))
def test_property_equivariance(group, lifting, cin, cout, k, padding, dilation, h, w):
    if h + 2 * padding < dilation * (k - 1) + 1 or w + 2 * padding < dilation * (k - 1) + 1:
        return
    conv = (LIFT if lifting else GG)[group](cin, cout, k, padding=padding, dilation=dilation).double()
    x = conv._example_input((h, w))
    assert conv.check_equivariance(x) < 1e-10


@pytest.mark.parametrize('size', [9, 11, 13])
def test_stride_exactness_rule(size):
    conv = P4ConvP4(2, 2, 3, stride=2, padding=0).double()
    x = torch.randn(1, 2, 4, size, size, dtype=torch.float64)
    err = conv.check_equivariance(x)
    if stride_is_exact(size, 3, 2, 0):
        assert err < 1e-10
    else:  # pragma: no cover - every odd size is exact here; keeps the rule honest if sizes change
        assert err > 1e-6
    x_even = torch.randn(1, 2, 4, 10, 10, dtype=torch.float64)
    assert not stride_is_exact(10, 3, 2, 0)
    assert conv.check_equivariance(x_even) > 1e-3


def test_export_identical():
    torch.manual_seed(3)
    for cls, lifting in [(P4ConvZ2, True), (P4ConvP4, False), (P4MConvZ2, True), (P4MConvP4M, False)]:
        conv = cls(3, 5, 3, padding=1)
        nn.init.normal_(conv.bias)
        G = conv.out_group.order
        x = torch.randn(2, 3, 8, 8) if lifting else torch.randn(2, 3, G, 8, 8)
        plain = conv.export()
        assert isinstance(plain, nn.Conv2d)
        y = plain(x if lifting else x.flatten(1, 2))
        assert torch.allclose(y, conv(x).flatten(1, 2), atol=1e-6)


def test_weight_layout_and_he_init():
    conv = P4MConvP4M(16, 32, 3)
    assert conv.weight.shape == (32, 16, 8, 3, 3)
    assert P4ConvZ2(3, 7, 5).weight.shape == (7, 3, 1, 5, 5)
    std = conv.weight.std().item()
    expected = (2.0 / (16 * 8 * 9)) ** 0.5
    assert abs(std - expected) / expected < 0.1
    assert conv.bias.shape == (32,)


def _fresh_from(conv):
    """A new layer of the same shape built from ``conv``'s current weights (nothing shared)."""
    ref = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    ref = ref.to(conv.weight.dtype)
    ref.load_state_dict({k: v.detach().clone() for k, v in conv.state_dict().items()})
    return ref.eval()


def _write_data_copy(conv):
    conv.weight.data.copy_(torch.randn_like(conv.weight))


def _write_data_mul(conv):
    conv.weight.data.mul_(-2.5)
    conv.bias.data.add_(1.0)


def _write_load_state_dict(conv):
    conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})


def _write_no_grad_inplace(conv):
    with torch.no_grad():
        conv.weight.mul_(0.5).add_(0.1)


def _write_optimizer_step(conv):
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv.train()
    conv(torch.randn(2, conv.in_channels, 4, 6, 6, dtype=conv.weight.dtype)).square().sum().backward()
    opt.step()
    conv.eval()


def _write_to_dtype(conv):
    conv.double()


def _write_param_swap(conv):
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))


def _write_data_assign(conv):
    conv.weight.data = torch.randn_like(conv.weight)


def _write_data_one_entry(conv):
    conv.weight.data[1, 0, 2, 1, 1] += 1.0  # one weight of 72, through a view of .data


def _write_bias_only(conv):
    conv.bias.data.fill_(3.0)


def _write_state_dict_inplace(conv):
    conv.state_dict()['weight'].mul_(-1.0)  # state_dict tensors share the parameters' memory


def _write_filter_idx_inplace(conv):
    conv.filter_idx.copy_(conv.filter_idx.flip(0))  # the fixed map itself, in place (rows of other elements)


def _write_filter_idx_swap(conv):
    conv.filter_idx = conv.filter_idx.flip(0).contiguous()


def _write_ema(conv):
    ema = P4ConvP4(2, 3, 3, padding=1)
    with torch.no_grad():
        for p, q in zip(conv.parameters(), ema.parameters()):
            p.lerp_(q, 0.5)


WRITES = [_write_data_copy, _write_data_mul, _write_load_state_dict, _write_no_grad_inplace, _write_optimizer_step,
          _write_to_dtype, _write_param_swap, _write_data_assign, _write_data_one_entry, _write_bias_only,
          _write_state_dict_inplace, _write_filter_idx_inplace, _write_filter_idx_swap, _write_ema]


@pytest.mark.parametrize('write', WRITES)
@pytest.mark.parametrize('grad', [False, True])
@pytest.mark.parametrize('bits', ['memcmp', 'torch.equal'])
def test_no_stale_filter_bank_after_any_weight_write(write, grad, bits, monkeypatch):
    """After eval forwards (the second one reuses the bank of the first when no gradient is wanted), any write to
    the weights, or to the fixed maps, is seen by the next eval forward (issue: a cached bank outlived `.data`
    writes). The next output equals a layer built from the new weights whose bank is expanded from scratch. Both
    ways of comparing the bits: libc's memcmp (with its arguments converted once per bank) and, where there is no
    libc, ``torch.equal`` on integer views."""
    from gequiv_timm.layers import gconv as gconv_module
    if bits == 'memcmp' and gconv_module._MEMCMP is None:
        pytest.skip('no libc memcmp on this platform')
    if bits == 'torch.equal':
        monkeypatch.setattr(gconv_module, '_MEMCMP', None)
    torch.manual_seed(0)
    conv = P4ConvP4(2, 3, 3, padding=1).eval()
    x = torch.randn(1, 2, 4, 6, 6)
    with torch.set_grad_enabled(grad):
        y_old = conv(x)
        torch.testing.assert_close(conv(x), y_old, rtol=0, atol=0)
    write(conv)
    x = x.to(conv.weight.dtype)
    with torch.set_grad_enabled(grad):
        y_new = conv(x)
        y_ref = _reference_forward(conv, x)
    assert not torch.allclose(y_old.to(y_new.dtype), y_new), 'the write did not change the output: test is void'
    torch.testing.assert_close(y_new, y_ref, rtol=0, atol=0)
    with torch.no_grad():  # and a later reused bank is the new one
        torch.testing.assert_close(conv(x), y_ref.detach(), rtol=0, atol=0)


def _reference_forward(conv, x):
    """The layer's map computed from scratch with the reference expansion (no reuse, no flat gather)."""
    y = F.conv2d(x if conv.in_planar else x.flatten(1, 2), conv._expand(conv.weight), conv._expand_bias(conv.bias), conv.stride, conv.padding,
                 conv.dilation)
    return y.unflatten(1, (conv.out_channels, conv.out_order))


def _count_expansions(conv):
    calls = []
    fast = conv._expand_fast

    def counting(w):
        calls.append(1)
        return fast(w)
    conv._expand_fast = counting
    return calls


def test_eval_bank_is_reused_only_without_gradients_and_in_eval():
    """The reuse is real (the check cannot pass vacuously) and limited to eval mode without weight gradients."""
    torch.manual_seed(0)
    conv = P4ConvP4(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 6, 6)
    calls = _count_expansions(conv)
    conv.eval()
    with torch.no_grad():
        ys = [conv(x) for _ in range(3)]
    assert len(calls) == 1 and all(torch.equal(y, ys[0]) for y in ys)
    with torch.inference_mode():
        conv(x)
    assert len(calls) == 1
    conv(x).sum().backward()  # eval with gradients: expanded, and the weights get their gradient
    assert len(calls) == 2 and conv.weight.grad is not None
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    conv(x)  # frozen weights, grad mode on: nothing to differentiate, reused (made at this call, kept)
    conv(x)
    assert len(calls) == 3
    conv.train()
    with torch.no_grad():
        conv(x)
        conv(x)
    assert len(calls) == 5 and conv._eval_cache is None
    conv.eval()
    with torch.no_grad():
        conv(x)
    conv.to(torch.float64)  # moved: the old bank is dropped, the next call makes one in float64
    assert conv._eval_cache is None
    with torch.no_grad():
        assert conv(x.double()).dtype == torch.float64


@pytest.mark.parametrize('group', ['p4', 'p4m', 'c8', 'd8', 'c16', 'c2', 'd1'])
@pytest.mark.parametrize('lift', [True, False])
@pytest.mark.parametrize('k', [3, 5])
def test_fast_expansion_is_the_reference_bitwise(group, lift, k):
    """The eager flat gather gives the reference bank bit for bit, and the same weight gradient."""
    torch.manual_seed(0)
    conv = GroupConv2d(3, 2, k, 'z2' if lift else group, group, padding=k // 2).double()
    ref, fast = conv._expand(conv.weight), conv._expand_fast(conv.weight)
    assert torch.equal(ref, fast) and fast.is_contiguous()
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, conv.weight, g)
    (g_fast,) = torch.autograd.grad(fast, conv.weight, g)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(conv.expanded_weight(), ref, rtol=0, atol=0)


def test_fast_expansion_follows_a_new_map_and_falls_back_above_the_limit(monkeypatch):
    from gequiv_timm.layers import gconv
    torch.manual_seed(0)
    conv = P4MConvP4M(2, 3, 3)
    first = conv._expand_fast(conv.weight)
    conv.filter_idx = conv.filter_idx.roll(1, 0)  # another (wrong) table: the fast path follows it
    assert torch.equal(conv._expand_fast(conv.weight), conv._expand(conv.weight))
    assert not torch.equal(conv._expand_fast(conv.weight), first)
    monkeypatch.setattr(gconv, 'FLAT_INDEX_LIMIT', 10)
    conv._flat = None
    assert conv._flat_index(conv._rotate(conv.weight), 3, 2, 8) is None
    assert torch.equal(conv._expand_fast(conv.weight), conv._expand(conv.weight))


def test_gradients_flow_in_train_and_eval():
    conv = P4ConvP4(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 6, 6)
    for mode in (True, False):
        conv.train(mode)
        conv.zero_grad()
        conv(x).sum().backward()
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('cls', [P4ConvZ2, P4ConvP4, P4MConvZ2, P4MConvP4M])
def test_tuple_stride_and_padding(cls):
    torch.manual_seed(0)
    a = cls(2, 3, 3, stride=(2, 2), padding=(1, 1))
    b = cls(2, 3, 3, stride=2, padding=1)
    b.load_state_dict(a.state_dict())
    G = a.in_group.order
    x = torch.randn(1, 2, 9, 9) if G == 1 else torch.randn(1, 2, G, 9, 9)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert a.stride == 2 and a.padding == 1
    with pytest.raises(ValueError, match='differs between the axes'):
        cls(2, 3, 3, stride=(1, 2))
    with pytest.raises(ValueError, match='differs between the axes'):
        cls(2, 3, 3, padding=(0, 1))


def test_group_pool_and_batchnorm():
    y = torch.randn(2, 3, 4, 5, 5)
    assert torch.equal(GroupPool('p4', 'max')(y), y.amax(2))
    assert torch.allclose(GroupPool('p4', 'mean')(y), y.mean(2))
    bn = GroupBatchNorm(3, 'p4')
    out = bn(y * 3 + 1)
    # one statistic per channel, shared over the group axis
    assert torch.allclose(out.mean(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-5)
    assert bn.running_mean.shape == (3,)


def test_group_pool_invariance():
    pool = GroupPool('p4m', 'max')
    assert pool.check_equivariance(torch.randn(2, 3, 8, 7, 9)) == 0.0


@pytest.mark.parametrize('bad, msg', [
    (lambda: P4ConvP4(2, 3, 3)(torch.randn(2, 8, 5, 5)), 'looks folded'),
    (lambda: P4ConvP4(2, 3, 3)(torch.randn(2, 3, 4, 5, 5)), 'expected 2 input channels'),
    (lambda: P4ConvP4(2, 3, 3)(torch.randn(2, 2, 8, 5, 5)), 'group axis of size |G|=4'),
    (lambda: P4ConvZ2(1, 3, 3)(torch.randn(1, 1, 2, 2)), 'too small'),
    (lambda: P4ConvZ2(1, 3, 3)(torch.randn(1, 28, 28)), 'planar input'),
    (lambda: P4ConvZ2(1, 3, 4), 'kernel_size must be odd'),
    (lambda: P4ConvP4(0, 3, 3), 'in_channels must be a positive int'),
    (lambda: GroupConv2d(1, 2, 3, 'p4', 'p4m'), 'cannot convolve'),
    (lambda: GroupBatchNorm(3, 'p4')(torch.randn(2, 3, 8, 4, 4)), 'expected [B, C=3, |G|=4'),
    (lambda: get_group('p6'), 'unknown group'),
])
def test_bad_input_messages(bad, msg):
    with pytest.raises(ValueError) as e:
        bad()
    assert msg in str(e.value)


def test_integer_input_is_a_type_error():
    """The wrong kind of input (layers/checks.py's policy): TypeError naming the layer and the fix."""
    with pytest.raises(TypeError, match=r'P4ConvZ2: expected a floating point tensor, got dtype torch.int64.*x\.float'):
        P4ConvZ2(1, 3, 3)(torch.ones(1, 1, 5, 5, dtype=torch.long))


def test_groups_are_groups():
    for name in ('p4', 'p4m'):
        G = get_group(name)
        x = torch.randn(3, 5, 5)
        for a in range(G.order):
            assert G.mul(a, G.inv(a)) == 0
            for b in range(G.order):
                # the table agrees with composing the tensor operations: (ab).x == a.(b.x)
                assert torch.equal(G.transform_plane(x, G.mul(a, b)),
                                   G.transform_plane(G.transform_plane(x, b), a))


@pytest.mark.parametrize('name', ['gequiv_p4cnn', 'gequiv_p4mcnn', 'gequiv_p4m_resnet44'])
def test_export_group_convs_same_logits_and_frozen(name):
    import timm
    import gequiv_timm  # noqa: F401
    from gequiv_timm.layers import ExportedGroupConv2d, export_group_convs
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg['input_size']
    x = torch.randn(2, *size)
    fast = export_group_convs(model)
    assert any(isinstance(m, ExportedGroupConv2d) for m in fast.modules())
    assert not any(isinstance(m, GroupConv2d) for m in fast.modules())
    assert any(isinstance(m, GroupConv2d) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        # a snapshot: a later write to the original changes the original only
        for m in model.modules():
            if isinstance(m, GroupConv2d):
                m.weight.data.mul_(-1)
        assert not torch.allclose(fast(x), model(x), atol=1e-3)


def test_exported_group_conv_checks_its_input():
    from gequiv_timm.layers import ExportedGroupConv2d
    conv = ExportedGroupConv2d.from_group_conv(P4ConvP4(2, 3, 3, padding=1))
    with pytest.raises(ValueError, match='looks folded'):
        conv(torch.randn(1, 8, 6, 6))


def test_meta_device_build_does_not_poison_later_cpu_layers():
    """Regression (the filter-index table is cached per (groups, k)): a layer built under torch.device('meta'), as
    timm's default-cfg test builds models, must not leave a meta table for the next CPU layer."""
    from gequiv_timm.layers import groups
    groups._filter_indices.cache_clear()  # the first build of each table happens under the meta device
    with torch.device('meta'):
        first = P4MConvP4M(2, 3, 5, padding=2)
        lift = P4ConvZ2(1, 2, 3)
    assert first.weight.device.type == 'meta' and lift.weight.device.type == 'meta'
    conv = P4MConvP4M(2, 3, 5, padding=2)
    assert conv.filter_idx.device.type == 'cpu'
    x = torch.randn(1, 2, 8, 9, 9)
    assert conv(x).shape == (1, 3, 8, 9, 9)
    assert P4ConvZ2(1, 2, 3)(torch.randn(1, 1, 7, 7)).shape == (1, 2, 4, 5, 5)


# ----------------------------------------------------------------------------------------------------------------
# on the --device of the run (CPU by default; `pytest --device cuda` on a GPU machine: benchmarks/gpu_check.sh)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('group', ['p4', 'p4m', 'c8', 'd8'])
def test_layers_on_device_match_the_cpu_in_float64(group, device):
    """Forward, gradients and exact quarter-turn equivariance of a small stack on the device, against the same
    stack on the CPU in float64."""
    torch.manual_seed(0)
    stack = nn.Sequential(GroupConv2d(2, 4, 3, 'z2', group, padding=1), GroupBatchNorm(4, group), nn.ReLU(),
                          GroupConv2d(4, 3, 3, group, group, padding=1), GroupMaxPool2d(2, group=group),
                          GroupPool(group, 'max'))
    ref = copy.deepcopy(stack).double()
    dev = stack.to(device=device, dtype=torch.float32)
    x = torch.randn(3, 2, 12, 12, dtype=torch.float64)
    y_ref = ref(x)
    xd = x.float().to(device).requires_grad_(True)
    y = dev(xd)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), (_, q) in zip(dev.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=1e-3, atol=1e-3, msg=n)
    dev.eval()
    with torch.no_grad():
        a = dev(torch.rot90(xd, 1, dims=(-2, -1)))
        b = torch.rot90(dev(xd), 1, dims=(-2, -1))
        assert (a - b).abs().max().item() < 1e-4
        dev[0].weight.data.mul_(-1)  # a write on the device is followed there too
        torch.testing.assert_close(dev[0](xd), _reference_forward(dev[0], xd), rtol=0, atol=0)


def test_no_bank_reuse_on_gpu(cuda_device):
    conv = P4ConvP4(2, 3, 3, padding=1).to(cuda_device).eval()
    x = torch.randn(1, 2, 4, 6, 6, device=cuda_device)
    with torch.no_grad():
        y = conv(x)
        assert conv._eval_cache is None
        torch.testing.assert_close(y, _reference_forward(conv, x), rtol=0, atol=0)


@pytest.mark.parametrize('how', ['deepcopy', 'torch.save', 'pickle'])
def test_layer_with_an_eval_bank_copies_and_pickles(how):
    """A layer that made its eval bank (with memcmp's pointer arguments) still deep-copies, saves and pickles (timm's
    prune_intermediate_layers and EMA deep-copy models); the copy makes its own bank from its own weights and
    does not share the original's: a write to the copy changes only the copy's output."""
    import copy
    import io
    import pickle
    torch.manual_seed(0)
    conv = P4ConvP4(2, 3, 3, padding=1).eval()
    x = torch.randn(1, 2, 4, 6, 6)
    with torch.no_grad():
        y = conv(x)
        conv(x)
    assert conv._eval_cache is not None, 'no bank was made: test is void'
    if how == 'deepcopy':
        other = copy.deepcopy(conv)
    elif how == 'torch.save':
        buf = io.BytesIO()
        torch.save(conv, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    else:
        other = pickle.loads(pickle.dumps(conv))
    with torch.no_grad():
        assert torch.equal(other(x), y)
        other.weight.mul_(2.0)
        assert not torch.equal(other(x), y)
        assert torch.equal(conv(x), y)
