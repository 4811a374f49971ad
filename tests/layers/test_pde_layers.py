"""PDE-G-CNN layers on M2 (gequiv_timm/layers/pde.py): equivariance by actually rotating inputs, the
morphological convolution against a brute-force reference, and the degenerate / non-finite coefficient rules."""
import math

import pytest
import torch
import torch.nn as nn

from gequiv_timm.layers.morphology import morphological_convolution_m2_blocks, morphological_convolution_m2_reference
from gequiv_timm.layers.pde import (
    CDEPdeLayerM2,
    ConvectionM2,
    DilationM2,
    ErosionM2,
    LiftM2Cartesian,
    LinearM2,
    MaxProjectM2,
    PDEStem,
    ReflectionPadM2,
    SumProjectM2,
    convection_m2,
    m2_log_coordinates,
    m2_morphological_kernel,
    morphological_convolution_m2,
)

RTOL = 1e-5


def rot_image(x, k=1):
    """Rotate planar maps [..., H, W] by k quarter turns counter-clockwise."""
    return torch.rot90(x, k, dims=(-2, -1))


def rot_m2(x, k=1):
    """Rotate an M2 map [B, C, Or, H, W]: rotate the plane, shift orientations by k * Or / 4."""
    return torch.roll(torch.rot90(x, k, dims=(-2, -1)), k * x.shape[2] // 4, dims=2)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _layers(orientations):
    return {
        'lift': (lambda: LiftM2Cartesian(2, 3, orientations, 5, padding=2), True, False),
        'lift_valid_reflect': (lambda: LiftM2Cartesian(2, 3, orientations, 3, padding=1, padding_mode='reflect',
                                                       bias=True), True, False),
        'convection': (lambda: ConvectionM2(3, init_scale=1.5), False, False),
        'dilation': (lambda: DilationM2(3, (3, 5, 5)), False, False),
        'erosion': (lambda: ErosionM2(3, (3, 3, 3), alpha=0.8, iterations=2), False, False),
        'linear': (lambda: LinearM2(3, 4, bias=True), False, False),
        'cde': (lambda: CDEPdeLayerM2(3, 4, (3, 5, 5)), False, False),
        'pad': (lambda: ReflectionPadM2(2), False, False),
        'max_project': (lambda: MaxProjectM2(), False, True),
        'sum_project': (lambda: SumProjectM2(), False, True),
    }


@pytest.mark.parametrize('orientations', [4, 8])
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', list(_layers(8)))
def test_layer_rotation_equivariance(name, train, orientations):
    torch.manual_seed(1)
    make, planar_in, planar_out = _layers(orientations)[name]
    layer = make().train(train)
    x = torch.randn(2, 2, 11, 11) if planar_in else torch.randn(2, 3, orientations, 11, 11)
    y = layer(x)
    for k in (1, 2, 3):
        xr = rot_image(x, k) if planar_in else rot_m2(x, k)
        yr = rot_image(y, k) if planar_out else rot_m2(y, k)
        assert rel_err(layer(xr), yr) <= RTOL, (name, k)


def _stack(orientations=8):
    return nn.Sequential(
        LiftM2Cartesian(1, 6, orientations, 5, padding=2), nn.BatchNorm3d(6),
        CDEPdeLayerM2(6, 6, (3, 5, 5)), CDEPdeLayerM2(6, 6, (3, 3, 3), iterations=2), CDEPdeLayerM2(6, 4, 5),
        MaxProjectM2())


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('size', [12, 13])
def test_stack_rotation_equivariance(train, size):
    torch.manual_seed(2)
    net = _stack().train(train)
    x = torch.randn(3, 1, size, size)
    y = net(x)
    assert y.shape == (3, 4, size, size)
    for k in (1, 2, 3):
        assert rel_err(net(rot_image(x, k)), rot_image(y, k)) <= RTOL


def test_stack_gradients_are_equivariant():
    """The input gradient of a rotation-invariant loss rotates with the input."""
    torch.manual_seed(3)
    net = _stack().eval()
    x = torch.randn(2, 1, 12, 12, requires_grad=True)
    xr = rot_image(x.detach(), 1).requires_grad_()
    g, = torch.autograd.grad(net(x).square().sum(), x)
    gr, = torch.autograd.grad(net(xr).square().sum(), xr)
    assert rel_err(gr, rot_image(g, 1)) <= 1e-4


def test_check_equivariance_method():
    torch.manual_seed(4)
    assert CDEPdeLayerM2(2, 3).check_equivariance(size=9, rtol=RTOL).relative <= RTOL
    err = PDEStem(3, 8, stride=2, width=4).check_equivariance(size=12, rtol=RTOL)
    assert err.relative <= RTOL and set(err.per_element) == {1, 2, 3} and float(err) == max(err.per_element.values())


# ----- morphological convolution ---------------------------------------------------------------------------
@pytest.mark.parametrize('erosion', [False, True])
@pytest.mark.parametrize('shape,ksize', [
    ((2, 3, 8, 9, 7), (3, 5, 5)),
    ((1, 2, 4, 5, 6), (1, 3, 3)),
    ((2, 2, 6, 4, 3), (5, 5, 3)),   # Or not a multiple of 4, image smaller than the kernel
    ((1, 1, 3, 6, 6), (3, 1, 1)),   # kOr == Or: every orientation competes
])
def test_morphological_convolution_matches_brute_force(shape, ksize, erosion):
    torch.manual_seed(5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    kernel = (torch.rand(shape[1], shape[2], *ksize, dtype=torch.float64) * 2).requires_grad_()
    y = morphological_convolution_m2(x, kernel, erosion)
    ref = morphological_convolution_m2_reference(x, kernel, erosion)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    gx, gk = torch.autograd.grad(y, (x, kernel), g)
    rx, rk = torch.autograd.grad(ref, (x, kernel), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gk, rk)
    with torch.no_grad():  # the index-free inference path gives the same values
        assert torch.equal(morphological_convolution_m2(x, kernel, erosion), ref)
    # and so does the vectorised path of the training forward, without its index
    assert torch.equal(morphological_convolution_m2_blocks(x, kernel, erosion), ref)


@pytest.mark.parametrize('erosion', [False, True])
@pytest.mark.parametrize('block', [10 ** 6, 2500, 800, 120])  # all; 2 samples; 2 channels; 2 orientations
def test_inference_loop_blocks_match_brute_force(block, erosion):
    from gequiv_timm.layers.morphology import _morph_forward_loop
    torch.manual_seed(9)
    x = torch.randn(3, 3, 8, 5, 6)
    kernel = torch.rand(3, 8, 3, 3, 5) * 2
    assert torch.equal(_morph_forward_loop(x, kernel, erosion, block=block),
                       morphological_convolution_m2_reference(x, kernel, erosion))


def test_morphological_gradcheck():
    torch.manual_seed(6)
    x = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    k = torch.rand(2, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: morphological_convolution_m2(a, b, False), (x, k))
    assert torch.autograd.gradcheck(lambda a, b: morphological_convolution_m2(a, b, True), (x, k))


def test_dilation_above_input_above_erosion():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 8, 10, 10)
    dil, ero = DilationM2(4, (3, 5, 5)), ErosionM2(4, (3, 5, 5))
    with torch.no_grad():
        ero.metric_params.copy_(dil.metric_params)
        k = dil.kernel(8)
        ko, kh, kw = k.shape[-3:]
        assert torch.all(k >= 0) and torch.all(k[:, :, ko // 2, kh // 2, kw // 2] == 0)
        d, e = dil(x), ero(x)
    assert torch.all(d >= x) and torch.all(x >= e)
    assert (d > x).any() and (e < x).any()


def test_dilation_layer_gradients_match_reference():
    torch.manual_seed(8)
    layer = DilationM2(2, (3, 3, 3), alpha=0.7).double()
    x = torch.randn(2, 2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = morphological_convolution_m2_reference(x, layer.kernel(4), False)
    torch.testing.assert_close(y, ref)
    gy = torch.autograd.grad(y.square().sum(), (x, layer.metric_params))
    gr = torch.autograd.grad(ref.square().sum(), (x, layer.metric_params))
    for a, b in zip(gy, gr):
        torch.testing.assert_close(a, b)


def test_morphological_convolution_shape_errors():
    x = torch.randn(1, 2, 4, 5, 5)
    with pytest.raises(ValueError, match=r'kernel must be \[C=2, Or=4'):
        morphological_convolution_m2(x, torch.rand(2, 8, 3, 3, 3))
    with pytest.raises(ValueError, match='exceeds Or=4'):
        morphological_convolution_m2(x, torch.rand(2, 4, 5, 3, 3))
    with pytest.raises(ValueError, match='odd'):
        morphological_convolution_m2(x, torch.rand(2, 4, 3, 2, 3))
    with pytest.raises(ValueError, match=r'\[B, C, Or, H, W\]'):
        DilationM2(2)(torch.randn(1, 2, 5, 5))


# ----- kernel ------------------------------------------------------------------------------------------------
def test_kernel_formula_on_known_points():
    alpha = 0.75
    beta = 2 * alpha / (2 * alpha - 1)
    nu = (2 * alpha - 1) / (2 * alpha) ** beta
    w = torch.tensor([[2.0, 0.5, 3.0]], dtype=torch.float64)
    k = m2_morphological_kernel(w, 8, (3, 5, 5), alpha)[0]
    # orientation 0, no turn: c = (x, y, 0); (i, j) = (2 - y, 2 + x)
    assert k[0, 1, 2, 4].item() == pytest.approx(nu * (2.0 * 2) ** beta)          # x = 2: forward
    assert k[0, 1, 0, 2].item() == pytest.approx(nu * (0.5 * 2) ** beta)          # y = 2: lateral
    # orientation 2 (90 degrees): a step along the image's +y axis is "forward" in that frame
    assert k[2, 1, 0, 2].item() == pytest.approx(nu * (2.0 * 2) ** beta)
    # pure turn by one step: c = (0, 0, pi/4)
    assert k[0, 2, 2, 2].item() == pytest.approx(nu * (3.0 * math.pi / 4) ** beta)
    # a turn with a forward step: exponential coordinates of (1, 0, th)
    th = math.pi / 4
    hc = (th / 2) / math.tan(th / 2)
    c1, c2 = hc * 1.0, -(th / 2) * 1.0
    rho = math.sqrt((2 * c1) ** 2 + (0.5 * c2) ** 2 + (3 * th) ** 2)
    assert k[0, 2, 2, 3].item() == pytest.approx(nu * rho ** beta)


def test_log_coordinates_invert_the_exponential():
    """exp(c1 A1 + c2 A2 + c3 A3) of the tabulated coordinates lands on the offset it was made from."""
    c = m2_log_coordinates(8, (3, 3, 3))
    for o in range(8):
        th_o = 2 * math.pi * o / 8
        for a in range(3):
            for i in range(3):
                for j in range(3):
                    c1, c2, c3 = c[o, a, i, j].tolist()
                    if abs(c3) < 1e-12:
                        x, y = c1, c2
                    else:
                        x = (c1 * math.sin(c3) + c2 * (math.cos(c3) - 1)) / c3
                        y = (c1 * (1 - math.cos(c3)) + c2 * math.sin(c3)) / c3
                    dx, dy = j - 1, 1 - i  # the offset in the image frame, rotated into the output's frame
                    ex = math.cos(th_o) * dx + math.sin(th_o) * dy
                    ey = -math.sin(th_o) * dx + math.cos(th_o) * dy
                    assert (x, y) == pytest.approx((ex, ey), abs=1e-9)
                    assert c3 == pytest.approx((a - 1) * 2 * math.pi / 8)


# ----- degenerate and non-finite coefficients ---------------------------------------------------------------
@pytest.mark.parametrize('cls', [DilationM2, ErosionM2])
def test_zero_and_negative_metric_are_finite(cls):
    torch.manual_seed(9)
    layer = cls(2, (3, 3, 3))
    x = torch.randn(2, 2, 4, 6, 6, requires_grad=True)
    with torch.no_grad():
        layer.metric_params.zero_()
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.metric_params.grad).all()
    # a zero metric is a flat kernel: a plain max (min) filter over the support
    ref = morphological_convolution_m2_reference(x.detach(), torch.zeros(2, 4, 3, 3, 3), cls is ErosionM2)
    torch.testing.assert_close(y.detach(), ref)
    # the metric is w^2: negative scales equal positive ones
    with torch.no_grad():
        layer.metric_params.copy_(torch.tensor([[-1.0, 0.5, -2.0], [0.0, -0.3, 1.0]]))
        neg = layer(x)
        layer.metric_params.abs_()
        torch.testing.assert_close(neg, layer(x))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_coefficients_raise(bad):
    x = torch.randn(1, 2, 4, 5, 5)
    dil = DilationM2(2)
    with torch.no_grad():
        dil.metric_params[1, 2] = bad
    with pytest.raises(ValueError, match='metric_params has non-finite'):
        dil(x)
    conv = ConvectionM2(2)
    with torch.no_grad():
        conv.g0[0, 0] = bad
    with pytest.raises(ValueError, match='g0 has non-finite'):
        conv(x)
    with pytest.raises(ValueError, match='non-finite'):
        m2_morphological_kernel(torch.full((2, 3), bad), 4, 3)


@pytest.mark.parametrize('alpha', [0.5, 0.3, 1.2, float('nan')])
def test_alpha_out_of_range_raises(alpha):
    with pytest.raises(ValueError, match=r'alpha must be a number in \(0.5, 1\]'):
        DilationM2(2, alpha=alpha)


def test_huge_metric_stays_finite():
    layer = ErosionM2(1, (3, 5, 5))
    with torch.no_grad():
        layer.metric_params.fill_(1e3)
    x = torch.randn(1, 1, 8, 6, 6, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.metric_params.grad).all()
    torch.testing.assert_close(y, x)  # a very steep kernel leaves only the centre


# ----- convection and lifting -------------------------------------------------------------------------------
def test_convection_moves_content_forward_and_turns():
    torch.manual_seed(10)
    x = torch.randn(1, 2, 8, 7, 7)
    g0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2 * math.pi / 8]])
    y = convection_m2(x, g0)
    # channel 0, orientation 0 (frame facing +x): content moves one pixel right
    torch.testing.assert_close(y[0, 0, 0, :, 1:], x[0, 0, 0, :, :-1])
    # orientation 2 (facing +y, up in the image): content moves one row up
    torch.testing.assert_close(y[0, 0, 2, :-1, :], x[0, 0, 2, 1:, :])
    # channel 1 turns by one orientation step
    torch.testing.assert_close(y[0, 1], torch.roll(x[0, 1], 1, dims=0))


def test_convection_gradient_reaches_g0():
    layer = ConvectionM2(2)
    x = torch.randn(2, 2, 8, 6, 6)
    layer(x).square().sum().backward()
    assert layer.g0.grad is not None and layer.g0.grad.abs().sum() > 0 and torch.isfinite(layer.g0.grad).all()


def test_lift_with_four_orientations_is_rot90_of_the_kernel():
    torch.manual_seed(11)
    lift = LiftM2Cartesian(2, 3, orientations=4, kernel_size=3, disk=False)
    x = torch.randn(2, 2, 8, 8)
    y = lift(x)
    for o in range(4):
        w = torch.rot90(lift.weight, o, dims=(-2, -1))
        torch.testing.assert_close(y[:, :, o], torch.nn.functional.conv2d(x, w))


def test_lift_rotation_of_45_degrees_moves_a_point_kernel():
    lift = LiftM2Cartesian(1, 1, orientations=8, kernel_size=5, disk=False)
    with torch.no_grad():
        lift.weight.zero_()
        lift.weight[0, 0, 2, 4] = 1.0  # a point at (x, y) = (2, 0)
    bank = torch.einsum('opq,q->op', lift.rotation_matrix, lift.weight.flatten()).view(8, 5, 5)
    assert bank[2, 0, 2] == 1.0  # 90 degrees: (0, 2), i.e. row 0
    # 45 degrees: the point goes to (sqrt2, sqrt2), between pixels: the rotated kernel lives up-right of the centre
    b1 = bank[1]
    assert b1.sum() > 0 and b1[3:].abs().sum() == 0 and b1[:, :2].abs().sum() == 0
    r, c = divmod(int(b1.argmax()), 5)
    assert (r, c) in {(0, 3), (1, 3), (0, 4), (1, 4)}


def test_cde_layer_shapes_and_errors():
    layer = CDEPdeLayerM2(3, 5, (3, 5, 5))
    assert layer(torch.randn(2, 3, 8, 9, 9)).shape == (2, 5, 8, 9, 9)
    with pytest.raises(ValueError, match='expected 3 channels'):
        layer(torch.randn(2, 4, 8, 9, 9))
    with pytest.raises(ValueError, match='kernel_size must be an odd'):
        DilationM2(2, (2, 3, 3))
    with pytest.raises(ValueError, match='kernel_size must be odd'):
        LiftM2Cartesian(1, 2, 8, 4)


def test_pde_stem_planar_shapes():
    stem = PDEStem(3, 16, stride=4, width=4)
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 16, 8, 8)


def test_meta_device_construction_does_not_poison_cached_tables():
    with torch.device('meta'):
        meta = CDEPdeLayerM2(2, 2, (3, 3, 3))
        lift = LiftM2Cartesian(1, 2, 8, 5)
        assert lift.rotation_matrix.device.type == 'meta'
        meta(torch.empty(1, 2, 8, 6, 6))  # shape-only forward: no value checks, no error
    x = torch.randn(1, 1, 9, 9)
    assert torch.isfinite(LiftM2Cartesian(1, 2, 8, 5)(x)).all()
    assert torch.isfinite(DilationM2(2, (3, 3, 3))(torch.randn(1, 2, 8, 6, 6))).all()
