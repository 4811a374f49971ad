"""The compiled morphological operator (gequiv_timm/layers/pde_native.py) against the plain PyTorch path and the
brute-force reference: same forward values (bit for bit), same gradients (up to the order of float additions),
NaN inputs and unsupported cases on the PyTorch path, the backend switch."""
import pytest
import torch

from gequiv_timm.layers import pde_native
from gequiv_timm.layers.morphology import morphological_convolution_m2, morphological_convolution_m2_reference
from gequiv_timm.layers.pde import CDEPdeLayerM2, DilationM2

available, why = pde_native.native_available()
needs_native = pytest.mark.skipif(not available, reason=f"compiled operator unavailable: {why}")


@pytest.fixture
def backend():
    old = pde_native.morphology_backend()
    yield pde_native.set_morphology_backend
    pde_native.set_morphology_backend(old)


def _both(fn, backend):
    """``fn()`` with the native backend, then with the PyTorch one."""
    backend('native')
    a = fn()
    backend('torch')
    return a, fn()


@needs_native
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('erosion', [False, True])
@pytest.mark.parametrize('shape,ksize', [
    ((2, 3, 8, 9, 7), (3, 5, 5)),
    ((1, 2, 4, 5, 6), (1, 3, 3)),
    ((2, 2, 6, 4, 3), (5, 5, 3)),   # Or not a multiple of 4, image smaller than the kernel
    ((1, 1, 3, 6, 6), (3, 1, 1)),   # kOr == Or
    ((3, 5, 8, 21, 37), (3, 7, 7)),  # several chunks per plane, a ragged last chunk
])
def test_native_matches_torch_path_and_reference(shape, ksize, erosion, dtype, backend):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype)
    kernel = torch.rand(shape[1], shape[2], *ksize, dtype=dtype) * 2
    ref = morphological_convolution_m2_reference(x, kernel, erosion)
    with torch.no_grad():
        nat, tor = _both(lambda: morphological_convolution_m2(x, kernel, erosion), backend)
    assert torch.equal(nat, ref) and torch.equal(tor, ref)
    g = torch.randn_like(ref)

    def grads():
        xg, kg = x.clone().requires_grad_(), kernel.clone().requires_grad_()
        y = morphological_convolution_m2(xg, kg, erosion)
        return (y.detach(),) + torch.autograd.grad(y, (xg, kg), g)

    (yn, gxn, gkn), (yt, gxt, gkt) = _both(grads, backend)
    assert torch.equal(yn, ref) and torch.equal(yt, ref)
    torch.testing.assert_close(gxn, gxt)
    torch.testing.assert_close(gkn, gkt)


@needs_native
def test_native_ties_go_to_the_lowest_offset(backend):
    """A flat kernel on a constant input: every offset ties; the gradient goes to offset 0 on both paths."""
    x = torch.ones(1, 1, 4, 5, 5, requires_grad=True)
    k = torch.zeros(1, 4, 3, 3, 3, requires_grad=True)

    def grads():
        return torch.autograd.grad(morphological_convolution_m2(x, k).sum(), (x, k))

    (gxn, gkn), (gxt, gkt) = _both(grads, backend)
    assert torch.equal(gxn, gxt) and torch.equal(gkn, gkt)
    assert gkn[0, :, 0, 0, 0].abs().sum() > 0


@needs_native
@pytest.mark.parametrize('grad', [False, True])
def test_nan_input_takes_the_torch_path(backend, grad):
    """The operator notices NaN while it copies the input (no separate scan) and declines; the PyTorch path then
    propagates the NaN as the reference does. A NaN kernel is refused up front."""
    x = torch.randn(2, 2, 4, 5, 5)
    x[1, 1, 2, 3, 3] = float('nan')
    k = torch.rand(2, 4, 3, 3, 3)
    backend('native')
    assert pde_native.use_native(x, k)
    assert pde_native.native_morph_forward(x, k, False, need_index=grad) is None
    assert pde_native.native_morph_forward(x.nan_to_num(), k, False, need_index=grad) is not None
    assert not pde_native.use_native(x, k.clone().fill_(float('nan')))
    ref = morphological_convolution_m2_reference(x, k)
    xg = x.clone().requires_grad_(grad)
    y = morphological_convolution_m2(xg, k)
    torch.testing.assert_close(y, ref, equal_nan=True)
    if grad:
        y.nan_to_num().sum().backward()
        assert xg.grad.shape == x.shape


@needs_native
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(2, 3, 4, 24, 24), (1, 2, 8, 7, 9), (3, 1, 2, 2, 2)])
def test_native_max_pool_matches_pytorch(shape, dtype, backend):
    """max_pool2x2 on the compiled operator: F.max_pool2d's values bit for bit and its gradients exactly (ties to
    the first maximum of the window, odd sizes floored, NaN propagated)."""
    import torch.nn.functional as F
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=dtype).round(decimals=1)  # rounding makes ties
    x.view(-1)[5] = float('nan')
    g = torch.randn(*shape[:-2], shape[-2] // 2, shape[-1] // 2, dtype=dtype)

    def run():
        xg = x.clone().requires_grad_()
        y = pde_native.max_pool2x2(xg)
        y.backward(g)
        return y.detach(), xg.grad

    backend('native')
    yn, gn = run()
    xg = x.clone().requires_grad_()
    yr = F.max_pool2d(xg.flatten(0, -3).unsqueeze(1), 2).view_as(g)
    yr.backward(g)
    assert torch.equal(yn, yr.detach()) or torch.allclose(yn, yr.detach(), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(gn, xg.grad)
    backend('torch')
    yt, gt = run()
    assert torch.allclose(yt, yn, equal_nan=True, rtol=0, atol=0) and torch.equal(gt, gn)


@needs_native
def test_layers_train_the_same_on_both_backends(backend):
    """A CDE layer's output and parameter gradients agree between the backends."""
    torch.manual_seed(1)
    layer = CDEPdeLayerM2(3, 4, (3, 5, 5))
    x = torch.randn(4, 3, 8, 10, 10)

    def run():
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in layer.parameters()]

    (yn, gn), (yt, gt) = _both(run, backend)
    torch.testing.assert_close(yn, yt)
    # float32 sums over the whole batch (the convection's g0 gradient: both paths ~1e-4 of its size from the float64
    # value; the compiled one accumulates in double)
    for a, b in zip(gn, gt):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=max(1e-3 * b.abs().max().item(), 1e-3))


def test_backend_switch_errors(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        backend('fast')
    x, k = torch.randn(1, 1, 4, 5, 5), torch.rand(1, 4, 3, 3, 3)
    backend('torch')
    assert not pde_native.use_native(x, k)
    assert not pde_native.use_native(x.to(torch.bfloat16), k)


def test_native_skips_large_kernels_and_other_dtypes(backend):
    backend('auto')
    assert not pde_native.use_native(torch.randn(1, 1, 16, 20, 20), torch.rand(1, 16, 7, 7, 7))  # 343 offsets
    assert not pde_native.use_native(torch.randn(1, 1, 4, 5, 5).half(), torch.rand(1, 4, 3, 3, 3).half())
    layer = DilationM2(1, (1, 3, 3))
    assert layer(torch.randn(1, 1, 4, 5, 5)).shape == (1, 1, 4, 5, 5)


def test_without_a_compiler_the_torch_path_runs_with_one_warning(tmp_path):
    """A fresh process with no usable compiler (CXX points nowhere, empty cache): one RuntimeWarning, the same
    values as the reference, and asking for 'native' explicitly raises naming the problem."""
    import os
    import subprocess
    import sys
    code = '''
import warnings, torch
from gequiv_timm.layers import pde_native
from gequiv_timm.layers.morphology import morphological_convolution_m2, morphological_convolution_m2_reference
x, k = torch.randn(2, 3, 4, 6, 6), torch.rand(3, 4, 3, 3, 3)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    y = morphological_convolution_m2(x, k)
    morphological_convolution_m2(x, k)
msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
assert len(msgs) == 1 and 'compiled morphological operator is unavailable' in msgs[0], msgs
assert torch.equal(y, morphological_convolution_m2_reference(x, k))
assert pde_native.native_available()[0] is False
try:
    pde_native.set_morphology_backend('native')
except RuntimeError as e:
    assert 'unavailable' in str(e)
else:
    raise AssertionError('no error')
print('OK')
'''
    env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'), GEQUIV_TIMM_CACHE=str(tmp_path / 'cache'),
               GEQUIV_TIMM_MORPH_BACKEND='auto')
    res = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('OK'), res.stderr[-2000:]


@needs_native
@pytest.mark.parametrize('scale', [2.5, 12.0])
@pytest.mark.parametrize('shape', [(2, 3, 8, 9, 7), (1, 2, 4, 5, 6), (2, 2, 6, 3, 4), (1, 9, 4, 2, 2)])
def test_native_convection_matches_the_torch_path(shape, scale, backend):
    """convection_m2 on the compiled operator: the same values and gradients (input and g0) as grid_sample's path,
    shifts of several pixels and more than one orientation step (border clipping included; scale 12: shifts past
    the whole image, where the compiled stencil clamps its integer shift)."""
    from gequiv_timm.layers.pde import convection_m2
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64)
    g0 = torch.randn(shape[1], 3, dtype=torch.float64) * torch.tensor([scale, scale, 1.5], dtype=torch.float64)
    g = torch.randn(*shape, dtype=torch.float64)

    def run():
        xg, gg = x.clone().requires_grad_(), g0.clone().requires_grad_()
        y = convection_m2(xg, gg)
        return (y.detach(),) + torch.autograd.grad(y, (xg, gg), g)

    backend('native')
    assert pde_native.use_native_convection(x)
    nat = run()
    backend('torch')
    assert not pde_native.use_native_convection(x)
    for a, b in zip(nat, run()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_native
def test_native_convection_float32_and_without_input_gradient(backend):
    """float32 values agree to rounding; with only g0 requiring a gradient the compiled backward still gives the
    orientation fraction's and the shifts' gradients."""
    from gequiv_timm.layers.pde import convection_m2
    torch.manual_seed(4)
    x = torch.randn(3, 4, 8, 12, 12)
    g0 = torch.randn(4, 3) * torch.tensor([2.0, 2.0, 1.0])
    g = torch.randn_like(x)

    def run():
        gg = g0.clone().requires_grad_()
        y = convection_m2(x, gg)
        return y.detach(), torch.autograd.grad(y, gg, g)[0]

    (yn, gn), (yt, gt) = _both(run, backend)
    torch.testing.assert_close(yn, yt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gn, gt, rtol=1e-3, atol=1e-3 * gt.abs().max().item())


@pytest.mark.parametrize('kwargs', [dict(in_channels=1, out_channels=6, kernel_size=5),
                                    dict(in_channels=1, out_channels=3, kernel_size=3, stride=2, padding=1),
                                    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, bias=True,
                                         padding_mode='reflect')])
def test_lift_unfold_path_matches_conv2d(kwargs, monkeypatch):
    """The CPU lift with few input channels runs as im2col + bmm: the same output as F.conv2d (bit for bit with one
    input channel), the same gradients up to float summation order."""
    import gequiv_timm.layers.pde as pde
    torch.manual_seed(5)
    lift = pde.LiftM2Cartesian(orientations=8, **kwargs)
    if lift.bias is not None:
        torch.nn.init.normal_(lift.bias)
    x = torch.randn(3, kwargs['in_channels'], 13, 11, requires_grad=True)

    def run():
        y = lift(x)
        g = torch.linspace(-1, 1, y.numel()).view_as(y)
        return (y.detach(),) + torch.autograd.grad(y, (x, lift.weight), g)

    assert kwargs['in_channels'] * kwargs['kernel_size'] ** 2 <= pde._LIFT_UNFOLD_MAX
    fast = run()
    monkeypatch.setattr(pde, '_LIFT_UNFOLD_MAX', 0)
    ref = run()
    if kwargs['in_channels'] == 1:
        assert torch.equal(fast[0], ref[0])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize('threads', [2, 3, 5])
def test_native_operators_give_the_same_bits_for_any_thread_count(threads, backend):
    """Every compiled operator splits its work into contiguous ranges, one thread each, and writes whole vectors
    whose overrun lands in later rows of the same range (pde_native.py): the outputs and gradients must not depend
    on the number of threads. Odd sizes put range ends inside planes and rows."""
    from gequiv_timm.layers.pde import convection_m2
    backend('native')
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, 13, 11, dtype=torch.float64, requires_grad=True)
    kernel = torch.rand(5, 8, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    g0 = (torch.randn(5, 3, dtype=torch.float64) * 1.5).requires_grad_(True)
    xp = torch.randn(7, 3, 9, 15, dtype=torch.float64, requires_grad=True)

    def run():
        outs = [morphological_convolution_m2(x, kernel, erosion=False),
                morphological_convolution_m2(x, kernel, erosion=True), convection_m2(x, g0), pde_native.max_pool2x2(xp)]
        grads = torch.autograd.grad(sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                                        for o in outs), (x, kernel, g0, xp))
        return [o.detach() for o in outs] + list(grads)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run()
        torch.set_num_threads(threads)
        got = run()
    finally:
        torch.set_num_threads(old)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
