"""PDE layers on R2 (gequiv_timm/layers/pde_r2.py): hand-computed cases, the morphology against max / min pooling and
a brute-force reference, translation equivariance by actually shifting inputs (and a check that can fail)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gequiv_timm.layers.pde_r2 import (
    CDEPdeLayerR2,
    ConvectionR2,
    DEPdeLayerR2,
    DilationR2,
    ErosionR2,
    LinearR2,
    MorphologicalConvolutionR2,
    R2EquivariantMixin,
    SpatialResampleR2,
    convection_r2,
    morphological_convolution_r2,
    r2_morphological_kernel,
)

RTOL = 1e-5


def brute_r2(x, kernel, erosion):
    """Every offset's candidates stacked (outside the image: +-inf), then max / min."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape[-2:]
    fill = float('inf') if erosion else float('-inf')
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), value=fill)
    cands = [xp[..., i:i + h, j:j + w] + (1 if erosion else -1) * kernel[:, i, j].view(1, c, 1, 1)
             for i in range(kh) for j in range(kw)]
    st = torch.stack(cands)
    return st.amin(0) if erosion else st.amax(0)


def _layers():
    return {
        'convection': lambda: ConvectionR2(3, init_scale=1.5),
        'dilation': lambda: DilationR2(3, 5),
        'erosion': lambda: ErosionR2(3, (3, 5), alpha=0.8, iterations=2),
        'morph_conv': lambda: MorphologicalConvolutionR2(3, (5, 3)),
        'linear': lambda: LinearR2(3, 4, bias=True),
        'cde': lambda: CDEPdeLayerR2(3, 4, 5).eval(),
        'de': lambda: DEPdeLayerR2(3, 4, 3, iterations=2).eval(),
    }


@pytest.mark.parametrize('name', list(_layers()))
def test_translation_equivariance(name):
    torch.manual_seed(0)
    layer = _layers()[name]()
    err = layer.check_equivariance(size=32, rtol=RTOL)
    assert err.relative <= RTOL and len(err.per_element) == 3


def test_resample_translation_equivariance():
    torch.manual_seed(0)
    for layer in (SpatialResampleR2(scale_factor=2), SpatialResampleR2(scale_factor=2, mode='bilinear'),
                  SpatialResampleR2(scale_factor=0.5, mode='area'), SpatialResampleR2(scale_factor=0.5)):
        assert layer.check_equivariance(size=24).relative <= RTOL, layer
    assert SpatialResampleR2(size=(5, 7))(torch.randn(1, 2, 10, 14)).shape == (1, 2, 5, 7)


class _Ramp(R2EquivariantMixin, nn.Module):
    """Adds the column index: not translation equivariant."""
    in_channels = 1

    def forward(self, x):
        return x + torch.arange(x.shape[-1], dtype=x.dtype)


def test_check_equivariance_can_fail():
    err = _Ramp().check_equivariance(size=16)
    assert err.relative > 0.01
    with pytest.raises(AssertionError, match='relative equivariance error'):
        _Ramp().check_equivariance(size=16, rtol=1e-3)


# ----- hand-computed cases ------------------------------------------------------------------------------------
def test_convection_moves_content_by_c():
    x = torch.randn(1, 3, 6, 7)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    y = convection_r2(x, c)
    torch.testing.assert_close(y[0, 0, :, 1:], x[0, 0, :, :-1])      # one pixel right
    torch.testing.assert_close(y[0, 1, :-1, :], x[0, 1, 1:, :])      # one pixel up (y up = row index down)
    torch.testing.assert_close(y[0, 2, :, 1:], (x[0, 2, :, 1:] + x[0, 2, :, :-1]) / 2)  # half way: the mean


def test_kernel_formula_on_known_points():
    alpha = 0.75
    beta = 2 * alpha / (2 * alpha - 1)
    nu = (2 * alpha - 1) / (2 * alpha) ** beta
    h = torch.tensor([[[2.0, 0.0], [0.0, 0.5]], [[1.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    k = r2_morphological_kernel(h, 5, alpha)
    assert k.shape == (2, 5, 5) and k[0, 2, 2] == 0
    assert k[0, 2, 4].item() == pytest.approx(nu * 4.0 ** beta)            # v = (2, 0): |Hv| = 4
    assert k[0, 0, 2].item() == pytest.approx(nu * 1.0 ** beta)            # v = (0, 2) (row 0 is up): |Hv| = 1
    assert k[1, 1, 3].item() == pytest.approx(nu * math.sqrt(5) ** beta)   # v = (1, 1): Hv = (2, 1)
    assert k[1, 3, 1].item() == pytest.approx(nu * math.sqrt(5) ** beta)   # symmetric: k(-v) = k(v)


def test_flat_metric_is_max_and_min_pooling():
    x = torch.randn(2, 3, 9, 8)
    dil, ero = DilationR2(3, (3, 5)), ErosionR2(3, (3, 5))
    with torch.no_grad():
        dil.metric_params.zero_()
        ero.metric_params.zero_()
    torch.testing.assert_close(dil(x), F.max_pool2d(x, (3, 5), 1, (1, 2)))
    torch.testing.assert_close(ero(x), -F.max_pool2d(-x, (3, 5), 1, (1, 2)))


def test_morphological_convolution_small_example():
    """3x3 input, 3x3 kernel, min-plus, computed by hand."""
    x = torch.tensor([[[[1.0, 5.0, 2.0], [4.0, 0.0, 6.0], [3.0, 7.0, 8.0]]]])
    k = torch.tensor([[[1.0, 2.0, 1.0], [2.0, 0.0, 2.0], [1.0, 2.0, 1.0]]])
    layer = MorphologicalConvolutionR2(1, 3)
    with torch.no_grad():
        layer.kernel.copy_(k)
    y = layer(x)
    # centre: min(1+1, 5+2, 2+1, 4+2, 0+0, 6+2, 3+1, 7+2, 8+1) = 0
    # top-left (0, 0): window x[0:2, 0:2] with kernel[1:3, 1:3]: min(1+0, 5+2, 4+2, 0+1) = 1
    # bottom-right (2, 2): x[1:3, 1:3] with kernel[0:2, 0:2]: min(0+1, 6+2, 7+2, 8+0) = 1
    # top-right (0, 2): x[0:2, 1:3] with kernel[1:3, 0:2]: min(5+2, 2+0, 0+1, 6+2) = 1
    assert y[0, 0, 1, 1] == 0 and y[0, 0, 0, 0] == 1 and y[0, 0, 2, 2] == 1 and y[0, 0, 0, 2] == 1
    torch.testing.assert_close(y, brute_r2(x, k, True))


@pytest.mark.parametrize('erosion', [False, True])
def test_morphology_matches_brute_force_with_gradients(erosion):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    k = (torch.rand(3, 5, 3, dtype=torch.float64) * 2).requires_grad_()
    y, ref = morphological_convolution_r2(x, k, erosion), brute_r2(x, k, erosion)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, k), g), torch.autograd.grad(ref, (x, k), g)):
        torch.testing.assert_close(a, b)


def test_dilation_above_input_above_erosion():
    torch.manual_seed(4)
    x = torch.randn(2, 4, 12, 12)
    dil, ero = DilationR2(4, 5), ErosionR2(4, 5)
    with torch.no_grad():
        d, e = dil(x), ero(x)
    assert (d >= x).all() and (x >= e).all() and (d > x).any() and (e < x).any()


def test_linear_is_channel_mixing():
    torch.manual_seed(5)
    layer = LinearR2(3, 2, bias=True)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(layer(x), torch.einsum('bchw,dc->bdhw', x, layer.weight) + 0.5)


def test_cde_and_de_layers_compose_their_parts():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 10, 10)
    cde = CDEPdeLayerR2(3, 4, 3, iterations=2).eval()
    ref = x
    for _ in range(2):
        ref = cde.erosion(cde.dilation(cde.convection(ref)))
    torch.testing.assert_close(cde(x), cde.batch_normalization(cde.linear(ref)))
    de = DEPdeLayerR2(3, 4, 3).eval()
    assert de.convection is None
    torch.testing.assert_close(de(x), de.batch_normalization(de.linear(de.erosion(de.dilation(x)))))


def test_gradients_reach_every_parameter():
    torch.manual_seed(7)
    layer = CDEPdeLayerR2(3, 4, 5)
    layer(torch.randn(2, 3, 10, 10)).square().sum().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r'\[B, C, H, W\].*M2 map'):
        DilationR2(2)(torch.randn(1, 2, 4, 5, 5))
    with pytest.raises(ValueError, match='expected 2 channels'):
        ErosionR2(2)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match='kernel_size must be an odd'):
        DilationR2(2, 4)
    with pytest.raises(ValueError, match=r'alpha must be a number in \(0.5, 1\]'):
        ErosionR2(2, alpha=0.5)
    with pytest.raises(ValueError, match=r'c must be \[C=2, 2\]'):
        convection_r2(torch.randn(1, 2, 5, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match='exactly one of size and scale_factor'):
        SpatialResampleR2()
    layer = DilationR2(2)
    with torch.no_grad():
        layer.metric_params[0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='metric_params has non-finite'):
        layer(torch.randn(1, 2, 5, 5))
