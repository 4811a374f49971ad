"""The non-diagonal-metric morphology and CDE layer (layers/pde_nondiag.py) and the further M2 modules
(layers/pde_m2_ops.py): quarter-turn equivariance by actually rotating inputs, hand-computed cases, reductions to the
diagonal layers."""
import math

import pytest
import torch
import torch.nn.functional as F

from gequiv_timm.layers.morphology import morphological_convolution_m2_reference
from gequiv_timm.layers.pde import CDEPdeLayerM2, DilationM2, ErosionM2, m2_log_coordinates, m2_morphological_kernel
from gequiv_timm.layers.pde_m2_ops import (
    AnisotropicDilatedProjectM2,
    ConvectionDilationPdeM2,
    ConvectionErosionPdeM2,
    ConvM2Cartesian,
    DEPdeLayerM2,
    SpatialResampleM2,
    anisotropic_dilated_project_m2,
)
from gequiv_timm.layers.pde_nondiag import (
    CDEPdeLayerM2NonDiag,
    DilationM2NonDiag,
    ErosionM2NonDiag,
    m2_morphological_kernel_nondiag,
)

RTOL = 1e-5


def _modules():
    return {
        'dilation_nondiag': lambda: DilationM2NonDiag(3, (3, 5, 5)),
        'erosion_nondiag': lambda: ErosionM2NonDiag(3, (3, 3, 3), alpha=0.8, iterations=2),
        'cde_nondiag': lambda: CDEPdeLayerM2NonDiag(3, 4, (3, 5, 5)),
        'de': lambda: DEPdeLayerM2(3, 4, (3, 5, 5), iterations=2),
        'conv_dilation': lambda: ConvectionDilationPdeM2(3, (3, 5, 5), iterations=2),
        'conv_erosion': lambda: ConvectionErosionPdeM2(3, (3, 3, 3)),
        'conv_m2_valid': lambda: ConvM2Cartesian(3, 2, 8, (3, 5, 5)),
        'conv_m2_same_bias': lambda: ConvM2Cartesian(3, 2, 8, 3, padding=1, bias=True),
        'aniso_project': lambda: AnisotropicDilatedProjectM2(3.0, 1.0),
        'upsample_nearest': lambda: SpatialResampleM2(scale_factor=2),
        'downsample_bilinear': lambda: SpatialResampleM2(scale_factor=0.5, mode='bilinear'),
    }


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', list(_modules()))
def test_quarter_turn_equivariance(name, train):
    torch.manual_seed(0)
    m = _modules()[name]().train(train)
    m.in_channels = getattr(m, 'in_channels', 3) if name not in ('aniso_project', 'upsample_nearest',
                                                                  'downsample_bilinear') else 3
    assert m.check_equivariance(size=12, orientations=8, rtol=RTOL).relative <= RTOL


def test_nearest_downsampling_is_not_equivariant_and_the_check_says_so():
    m = SpatialResampleM2(scale_factor=0.5)
    m.in_channels = 2
    assert m.check_equivariance(size=12).relative > 0.1


# ----- non-diagonal metric ----------------------------------------------------------------------------------
def test_diagonal_h_gives_the_diagonal_kernel():
    torch.manual_seed(1)
    w = torch.rand(3, 3, dtype=torch.float64) + 0.5
    k = m2_morphological_kernel_nondiag(torch.diag_embed(w), 8, (3, 5, 5), 0.7)
    torch.testing.assert_close(k, m2_morphological_kernel(w, 8, (3, 5, 5), 0.7))


def test_nondiag_kernel_hand_computed():
    alpha = 0.75
    beta = 2 * alpha / (2 * alpha - 1)
    nu = (2 * alpha - 1) / (2 * alpha) ** beta
    h = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]], dtype=torch.float64)
    k = m2_morphological_kernel_nondiag(h, 8, (3, 3, 3), alpha)[0]
    # orientation 0, no turn, offset (x, y) = (1, 1) (row 0 is up): c = (1, 1, 0), H c = (2, 1, 0)
    assert k[0, 1, 0, 2].item() == pytest.approx(nu * math.sqrt(5) ** beta)
    # (x, y) = (1, -1): c = (1, -1, 0), H c = (0, -1, 0): the coupling makes this direction cheaper
    assert k[0, 1, 2, 2].item() == pytest.approx(nu * 1.0)
    # any offset: |H c| from the tabulated exponential coordinates
    c = m2_log_coordinates(8, (3, 3, 3))
    hc = torch.einsum('ij,okhwj->okhwi', h[0], c)
    torch.testing.assert_close(k, nu * hc.norm(dim=-1) ** beta)


def test_nondiag_layers_match_the_reference_and_order():
    torch.manual_seed(2)
    x = torch.randn(2, 2, 8, 7, 7, dtype=torch.float64)
    dil, ero = DilationM2NonDiag(2, (3, 3, 3)).double(), ErosionM2NonDiag(2, (3, 3, 3)).double()
    with torch.no_grad():
        d, e = dil(x), ero(x)
        assert torch.equal(d, morphological_convolution_m2_reference(x, dil.kernel(8), False))
        assert torch.equal(e, morphological_convolution_m2_reference(x, ero.kernel(8), True))
    assert (d >= x).all() and (x >= e).all()


def test_nondiag_cde_with_diagonal_h_equals_the_diagonal_layer():
    torch.manual_seed(3)
    diag = CDEPdeLayerM2(3, 4, (3, 3, 3)).eval()
    nd = CDEPdeLayerM2NonDiag(3, 4, (3, 3, 3)).eval()
    sd = dict(diag.state_dict())
    sd['dilation.metric_params'] = torch.diag_embed(sd['dilation.metric_params'])
    sd['erosion.metric_params'] = torch.diag_embed(sd['erosion.metric_params'])
    nd.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 9, 9)
    torch.testing.assert_close(nd(x), diag(x))


# ----- DE layer, convection + morphology ----------------------------------------------------------------------
def test_de_layer_and_pde_modules_compose_their_parts():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 9, 9)
    de = DEPdeLayerM2(3, 4, (3, 3, 3)).eval()
    torch.testing.assert_close(de(x), de.batch_normalization(de.linear(de.erosion(de.dilation(x)))))
    cd = ConvectionDilationPdeM2(3, (3, 3, 3), iterations=2)
    torch.testing.assert_close(cd(x), cd.morph(cd.convection(cd.morph(cd.convection(x)))))
    assert isinstance(cd.morph, DilationM2) and isinstance(ConvectionErosionPdeM2(3).morph, ErosionM2)
    with torch.no_grad():
        assert (ConvectionErosionPdeM2(3, (3, 3, 3)).morph(x) <= x).all()


# ----- linear group convolution ---------------------------------------------------------------------------------
def test_conv_m2_with_four_orientations_is_a_rot90_group_convolution():
    """Or = 4, no interpolation: output orientation o correlates input orientation (o + a - 1) mod 4 with the
    base kernel turned by o quarter turns."""
    torch.manual_seed(5)
    conv = ConvM2Cartesian(2, 3, orientations=4, kernel_size=(3, 3, 3), disk=False)
    x = torch.randn(2, 2, 4, 8, 8)
    y = conv(x)
    assert y.shape == (2, 3, 4, 6, 6)
    for o in range(4):
        ref = sum(F.conv2d(x[:, :, (o + a - 1) % 4], torch.rot90(conv.weight[:, :, a], o, dims=(-2, -1)))
                  for a in range(3))
        torch.testing.assert_close(y[:, :, o], ref)


def test_conv_m2_errors():
    with pytest.raises(ValueError, match='exceeds orientations=4'):
        ConvM2Cartesian(1, 1, 4, (5, 3, 3))
    with pytest.raises(ValueError, match='built for 8 orientations'):
        ConvM2Cartesian(1, 1, 8, 3)(torch.randn(1, 1, 4, 6, 6))


# ----- projection and resampling --------------------------------------------------------------------------------
def test_anisotropic_projection_stretches_along_the_orientation():
    """A point in orientation 0 (facing +x) spreads further along x than along y; in orientation 2 the other way."""
    x = torch.full((1, 1, 8, 11, 11), -10.0)
    x[0, 0, 0, 5, 5] = 0.0
    y = anisotropic_dilated_project_m2(x, 3.0, 1.0, alpha=0.75)
    assert y.shape == (1, 1, 11, 11) and y[0, 0, 5, 5] == 0
    assert y[0, 0, 5, 8] > y[0, 0, 2, 5]       # 3 px along x beats 3 px along y
    x2 = torch.roll(x, 2, dims=2)               # the same point in orientation 2 (facing +y)
    y2 = anisotropic_dilated_project_m2(x2, 3.0, 1.0, alpha=0.75)
    torch.testing.assert_close(y2[0, 0, 2, 5], y[0, 0, 5, 8])
    # isotropic lengths: a round dilation, the same in every orientation
    yi = anisotropic_dilated_project_m2(x, 2.0, 2.0)
    torch.testing.assert_close(yi[0, 0], yi[0, 0].T)


def test_resample_shapes_and_errors():
    x = torch.randn(1, 2, 8, 6, 6)
    assert SpatialResampleM2(scale_factor=2)(x).shape == (1, 2, 8, 12, 12)
    assert SpatialResampleM2(size=(3, 4), mode='area')(x).shape == (1, 2, 8, 3, 4)
    torch.testing.assert_close(SpatialResampleM2(scale_factor=2)(x)[..., ::2, ::2], x)
    with pytest.raises(ValueError, match='exactly one of size and scale_factor'):
        SpatialResampleM2()
    with pytest.raises(ValueError, match='longitudinal must be a positive'):
        AnisotropicDilatedProjectM2(0.0, 1.0)
