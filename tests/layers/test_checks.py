"""The one input-kind check and the one equivariance check (gequiv_timm/layers/checks.py) and their policy across
layers, stems and models: TypeError for the kind (not a tensor, not floating point), ValueError for the shape."""
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401
from gequiv_timm.layers import EquivariantStem, GroupConv2d, GroupPool, get_group
from gequiv_timm.layers.checks import EquivarianceError, check_equivariance, check_float_tensor


def test_kind_is_a_type_error_shape_a_value_error():
    with pytest.raises(TypeError, match=r'layer: expected an image as a torch.Tensor, got list'):
        check_float_tensor([1.0], 'layer', 'an image')
    with pytest.raises(TypeError, match=r'layer: expected a floating point tensor, got dtype torch.uint8'):
        check_float_tensor(torch.zeros(2, dtype=torch.uint8), 'layer')
    check_float_tensor(torch.zeros(2, dtype=torch.float16), 'layer')


@pytest.mark.parametrize('make, good, bad_shape', [
    (lambda: GroupConv2d(3, 4, 3, 'z2', 'p4', padding=1), (1, 3, 8, 8), (3, 8, 8)),
    (lambda: EquivariantStem(3, 16, 2, group='p4', kernel_size=5), (1, 3, 8, 8), (1, 4, 8, 8)),
    (lambda: timm.create_model('gequiv_p4cnn').eval(), (1, 1, 28, 28), (1, 2, 28, 28)),
    (lambda: timm.create_model('gequiv_rcn_paper').eval(), (1, 1, 64, 64), (1, 2, 64, 64)),
])
def test_every_entry_point_follows_the_policy(make, good, bad_shape):
    m = make()
    with torch.no_grad():
        m(torch.zeros(good))
        with pytest.raises(TypeError, match='floating point'):
            m(torch.zeros(good, dtype=torch.uint8))
        with pytest.raises(TypeError, match='torch.Tensor'):
            m(torch.zeros(good).tolist())
        with pytest.raises(ValueError):
            m(torch.zeros(bad_shape))


def test_check_equivariance_absolute_relative_and_per_element():
    conv = GroupConv2d(2, 3, 3, 'z2', 'p4', padding=1).double()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    err = conv.check_equivariance(x)
    assert isinstance(err, EquivarianceError) and float(err) < 1e-12 and err.relative < 1e-12
    assert set(err.per_element) == set(get_group('p4').elements())
    # any subset of the group, and a function that is not equivariant fails with both tolerances named
    assert set(conv.check_equivariance(x, elements=[1]).per_element) == {1}
    g = get_group('p4')

    def shift(t):
        return torch.roll(t, 1, dims=-1)
    bad = check_equivariance(shift, x, g.transform_plane, g.transform_plane, g.elements())
    assert float(bad) > 0.1 and bad.relative == pytest.approx(float(bad) / x.abs().max().item())
    with pytest.raises(AssertionError, match=r'shift: relative equivariance error .* > rtol'):
        check_equivariance(shift, x, g.transform_plane, g.transform_plane, g.elements(), rtol=1e-6, name='shift')
    with pytest.raises(AssertionError, match=r'equivariance error .* > atol'):
        check_equivariance(shift, x, g.transform_plane, g.transform_plane, g.elements(), atol=1e-6)


def test_stem_and_model_answer_the_same_check():
    stem = EquivariantStem(3, 16, 2, group='p4m', mode='equivariant', kernel_size=5).double()
    err = stem.check_equivariance(torch.randn(1, 3, 16, 16, dtype=torch.float64), rtol=1e-9)
    assert len(err.per_element) == 8 and err.relative < 1e-9
    pool = GroupPool('p4', 'max')
    assert float(pool.check_equivariance(torch.randn(1, 2, 4, 6, 6))) == 0.0
