"""Spatial transformer layers: identity start, grids, bounds, invalid theta, recovery of a known transform."""
import math

import pytest
import torch
import torch.nn.functional as F

from gequiv_timm.data import rotate_images
from gequiv_timm.layers.stn import (
    TRANSFORMS, AffineWarp, LocalisationCNN, ParallelSpatialTransformer, ProjectiveTransform, ProjectiveWarp,
    SpatialTransformer, TPSTransform, TPSWarp, affine_grid, affine_warp, attention_theta, check_theta,
    create_transform, homography_from_points, identity_grid, projective_grid, projective_warp, rotation_theta,
    similarity_theta, tps_control_points, tps_grid, tps_warp, transform_points, translation_theta)



def _const_loc():
    """A trivial localisation net (the image mean): fitting then only moves the head, cheaply."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def _blobs(size=32, batch=1, seed=0):
    """Smooth, asymmetric test images in [0, 1] (sums of Gaussian blobs of different heights)."""
    g = torch.Generator().manual_seed(seed)
    grid = identity_grid(size, False)  # [H, W, 2]
    out = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        for k in range(4):
            c = torch.rand(2, generator=g) * 1.0 - 0.5
            amp = 0.4 + 0.6 * torch.rand((), generator=g)
            w = 0.12 + 0.15 * torch.rand((), generator=g)
            out[b, 0] += amp * torch.exp(-((grid - c) ** 2).sum(-1) / (2 * w ** 2))
    return out.clamp(0, 1)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('transform', TRANSFORMS)
def test_identity_at_init(transform, align_corners):
    torch.manual_seed(0)
    x = torch.rand(3, 2, 20, 24)
    stn = SpatialTransformer(2, transform, align_corners=align_corners)
    y = stn(x)
    assert y.shape == x.shape
    assert (y - x).abs().max().item() <= 1e-5
    assert stn.transform_loss(1.0, 1.0).item() < 1e-10


@pytest.mark.parametrize('transform,kwargs', [
    ('affine', dict(max_linear=0.5, max_translation=0.5)),
    ('similarity', dict(max_angle=1.0, scale_range=(0.5, 1.5), max_translation=0.3)),
    ('rotation', dict(max_angle=0.5)), ('attention', dict(scale_range=(0.3, 1.2), max_translation=0.7)),
    ('translation', dict(max_translation=0.2)), ('projective', dict(max_perspective=0.5, max_translation=0.4)),
    ('tps', dict(grid_size=3, max_offset=0.2)),
])
def test_bounded_families_identity_and_bounds(transform, kwargs):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16)
    stn = SpatialTransformer(1, transform, padding_mode='border', **kwargs)
    assert (stn(x) - x).abs().max().item() <= 1e-5
    fam = stn.family
    raw = torch.randn(64, fam.num_params) * 100  # far outside any sane range
    theta = fam.to_theta(raw)
    assert torch.isfinite(theta).all()
    if fam.kind == 'affine':
        t = theta[:, :, 2]
        bound = kwargs.get('max_translation')
        if bound is not None:
            assert t.abs().max() <= bound + 1e-6
        if 'scale_range' in kwargs:
            s = theta[:, :, :2].det().abs().sqrt()
            lo, hi = kwargs['scale_range']
            assert s.min() >= lo - 1e-5 and s.max() <= hi + 1e-5
        if transform == 'rotation':
            ang = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
            assert ang.abs().max() <= 0.5 + 1e-5
    elif fam.kind == 'projective':
        # w = g x + h y + 1 >= 1 - p on the image square: never singular, never past the horizon
        assert not fam.invalid(theta, (16, 16), False).any()
        corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]])
        w = corners @ theta[:, 2, :2].T + 1
        assert w.min() >= 1 - 0.5 - 1e-6
    else:
        assert (theta - fam.ctrl).abs().max() <= 0.2 + 1e-6


def test_bad_bounds_rejected():
    with pytest.raises(ValueError, match='scale_range'):
        create_transform('similarity', scale_range=(1.2, 2.0))
    with pytest.raises(ValueError, match='max_perspective'):
        ProjectiveTransform(max_perspective=1.5)
    with pytest.raises(ValueError, match='unknown transform'):
        create_transform('shear')
    with pytest.raises(ValueError, match='accepts the options'):
        create_transform('rotation', max_translation=0.3)


def test_rotation_theta_matches_rotate_images():
    x = _blobs(28, 3)
    angles = torch.tensor([17.0, -33.0, 71.0])
    ours = affine_warp(x, rotation_theta(torch.deg2rad(angles)), align_corners=False)
    ref = rotate_images(x, angles)
    assert (ours - ref).abs().max() < 1e-5


def test_theta_builders_compose():
    a, s = torch.tensor([0.3, -1.0]), torch.tensor([0.8, 1.3])
    tx, ty = torch.tensor([0.1, 0.0]), torch.tensor([0., 0.2])
    th = similarity_theta(a, s, tx, ty)
    assert th.shape == (2, 2, 3)
    lin = th[:, :, :2]
    assert torch.allclose(lin @ lin.transpose(1, 2), (s ** 2)[:, None, None] * torch.eye(2), atol=1e-6)
    assert torch.allclose(translation_theta(tx, ty), attention_theta(torch.ones(2), tx, ty))
    assert torch.allclose(rotation_theta(a), similarity_theta(a, 1.0, 0.0, 0.0))


@pytest.mark.parametrize('align_corners', [False, True])
def test_attention_crop_is_exact_center_crop(align_corners):
    """Scale 1/2 at half the output size samples exactly the central pixels (align_corners=False): checks that the
    grid and the sampler use the same pixel-centre convention, and the out_size path (the CUB trick)."""
    x = torch.rand(2, 3, 16, 16)
    th = attention_theta(torch.full((2,), 0.5), torch.zeros(2), torch.zeros(2))
    y = affine_warp(x, th, out_size=8, align_corners=align_corners)
    assert y.shape == (2, 3, 8, 8)
    if not align_corners:
        assert (y - x[:, :, 4:12, 4:12]).abs().max() < 1e-5
    else:  # corners aligned: the crop spans [-1/2, 1/2], i.e. pixel 3.75 .. 11.25; off-grid, but symmetric
        assert (y - y.flip(-1).flip(-2)).abs().max() > 0  # a non-trivial resampling
        mid = F.grid_sample(x, affine_grid(th, (8, 8), True), align_corners=True)
        assert torch.allclose(y, mid)


def test_stn_output_size_and_feature_maps():
    torch.manual_seed(0)
    x = torch.rand(2, 16, 12, 12)  # a feature map, not an image
    stn = SpatialTransformer(16, 'affine', out_size=(6, 8), loc_kwargs=dict(channels=(8,), hidden=16))
    y = stn(x)
    assert y.shape == (2, 16, 6, 8)
    ref = F.interpolate(x, size=(6, 8), mode='bilinear', align_corners=False)  # identity map at another size
    assert (y - ref).abs().max() < 1e-5


@pytest.mark.parametrize('padding_mode', ['zeros', 'border', 'reflection'])
def test_padding_modes(padding_mode):
    x = torch.rand(1, 1, 10, 10) + 1.0
    th = translation_theta(torch.tensor([1.0]), torch.tensor([0.0]))  # shift by half the width: half out of view
    y = affine_warp(x, th, align_corners=False, padding_mode=padding_mode)
    right = y[..., 5:]  # output pixel 5 samples x = 1.1, just past the right edge
    if padding_mode == 'zeros':
        assert right.abs().max() == 0
    elif padding_mode == 'border':
        assert torch.allclose(right, x[..., -1:].expand_as(right))
    else:
        assert torch.allclose(right, x.flip(-1)[..., :5])  # mirrored about the edge x = 1
    assert torch.allclose(y[..., :5], x[..., 5:])


def test_gradients_reach_localisation_net():
    torch.manual_seed(0)
    stn = SpatialTransformer(1, 'similarity', loc_kwargs=dict(channels=(4, 4), hidden=8))
    x = _blobs(20, 4, seed=1)
    target = torch.roll(x, 2, -1)
    opt = torch.optim.SGD(stn.parameters(), lr=0.5)
    # step 0: the zero-initialised head gets a gradient (it must, or the STN could never leave the identity)
    loss = F.mse_loss(stn(x), target)
    loss.backward()
    assert stn.head.weight.grad.abs().sum() > 0 and stn.head.bias.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    # step 1: now the gradient flows through the head into every localisation-net parameter
    F.mse_loss(stn(x), target).backward()
    for name, p in stn.loc_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('transform,true_params', [
    ('similarity', [0.35, math.log(0.85), 0.15, -0.1]),
    ('affine', [0.1, -0.15, 0.1, 0.2, -0.1, -0.05]),
    ('projective', [0.05, 0.1, -0.1, -0.05, 0.0, 0.1, 0.15, -0.1]),
])
def test_transform_recovered_from_synthetic_pair(transform, true_params):
    """Warp an image by a known transform, fit the STN to reproduce the warp, compare the predicted theta."""
    torch.manual_seed(0)
    x = _blobs(24, 1, seed=3)
    stn = SpatialTransformer(1, transform, loc_net=_const_loc(), loc_features=1, padding_mode='border')
    true_theta = stn.family.to_theta(torch.tensor([true_params]))
    target = stn.family.grid(true_theta, (24, 24), False)
    target = F.grid_sample(x, target, padding_mode='border', align_corners=False)
    opt = torch.optim.Adam(stn.head.parameters(), lr=0.03)  # the bias alone can express the transform
    for _ in range(150):
        opt.zero_grad()
        F.mse_loss(stn(x), target).backward()
        opt.step()
    err = (stn.last_theta - true_theta).abs().max().item()
    assert err < 0.02, f"{transform}: theta error {err:.4f}"


def test_tps_recovered_from_synthetic_pair():
    torch.manual_seed(0)
    x = _blobs(24, 1, seed=4)
    fam = TPSTransform(grid_size=3)
    src = fam.ctrl + 0.08 * torch.randn(9, 2, generator=torch.Generator().manual_seed(1))
    target = tps_warp(x, src[None], fam.ctrl, padding_mode='border')
    stn = SpatialTransformer(1, fam, loc_net=_const_loc(), loc_features=1, padding_mode='border')
    opt = torch.optim.Adam(stn.head.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        F.mse_loss(stn(x), target).backward()
        opt.step()
    # control points near the border see flat image content: check the fit and the interior point
    assert F.mse_loss(stn(x), target).item() < 1e-4
    assert (stn.last_theta[0, 4] - src[4]).abs().max() < 0.02


@pytest.mark.parametrize('grid_size', [2, 3, (3, 5), 4])
@pytest.mark.parametrize('align_corners', [False, True])
def test_tps_at_rest_is_identity(grid_size, align_corners):
    ctrl = tps_control_points(grid_size)
    grid = tps_grid(ctrl[None], ctrl, (13, 17), align_corners)
    assert (grid[0] - identity_grid((13, 17), align_corners)).abs().max() < 1e-5
    x = torch.rand(2, 1, 13, 17)
    assert (tps_warp(x, ctrl.expand(2, -1, -1), ctrl, align_corners=align_corners) - x).abs().max() <= 1e-5
    # and an affine motion of the control points gives exactly that affine map (affine maps lie in the TPS span)
    th = similarity_theta(torch.tensor([0.4]), torch.tensor([0.9]), torch.tensor([0.1]), torch.tensor([-0.2]))
    src = transform_points(th, ctrl, 'affine')
    assert (tps_grid(src, ctrl, (13, 17), align_corners) - affine_grid(th, (13, 17), align_corners)).abs().max() < 1e-5


def test_tps_interpolates_control_points():
    ctrl = tps_control_points(3)
    src = ctrl + 0.1 * torch.randn(2, 9, 2, generator=torch.Generator().manual_seed(0))
    from gequiv_timm.layers.stn import tps_solve_matrix
    m = tps_solve_matrix(ctrl, ctrl)
    assert torch.allclose(transform_points(src, ctrl, 'tps', m), src, atol=1e-5)


def test_projective_matches_affine_and_homography_from_points():
    x = _blobs(24, 2)
    th = similarity_theta(torch.tensor([0.3, -0.2]), torch.tensor([0.9, 1.1]), torch.tensor([0.1, 0.]),
                          torch.tensor([0., -0.1]))
    H = torch.cat((th, torch.tensor([0., 0., 1.]).expand(2, 1, 3)), 1)
    assert (projective_warp(x, H) - affine_warp(x, th)).abs().max() < 1e-5
    # four point pairs -> H that maps them
    dst = torch.tensor([[[-0.8, -0.9], [0.9, -0.7], [0.7, 0.8], [-0.9, 0.9]]])
    src = torch.tensor([[[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]]])
    Hp = homography_from_points(src, dst)
    assert torch.allclose(transform_points(Hp, dst[0], 'projective'), src, atol=1e-5)
    with pytest.raises(ValueError, match='degenerate'):
        homography_from_points(src, torch.zeros_like(dst))


def test_singular_projective_raises_or_falls_back():
    x = torch.rand(3, 1, 12, 12)
    H = torch.eye(3).repeat(3, 1, 1)
    H[1] = torch.tensor([[1., 2., 0.], [0.5, 1., 0.], [0., 0., 1.]])  # rank 2
    with pytest.raises(ValueError, match=r'sample\(s\) \[1\].*singular'):
        projective_grid(H, (12, 12), False)
    H2 = torch.eye(3).repeat(3, 1, 1)
    H2[2, 2, 0] = 3.0  # w = 3x + 1 changes sign inside the image: the horizon crosses the output
    with pytest.raises(ValueError, match='infinity'):
        projective_warp(x, H2)
    # module: invalid='identity' replaces the unusable transforms by the identity and counts them
    stn = SpatialTransformer(1, 'projective', invalid='identity')
    with torch.no_grad():
        stn.head.bias.copy_(torch.tensor([0., 0., 0., 0., 0., 0., 3.0, 0.]))  # every sample crosses the horizon
    y = stn(x)
    assert stn.last_num_fallbacks == 3 and torch.isfinite(y).all()
    assert (y - x).abs().max() <= 1e-5
    stn.invalid = 'raise'
    with pytest.raises(ValueError, match='infinity'):
        stn(x)


@pytest.mark.parametrize('transform', ['affine', 'tps', 'projective'])
def test_nonfinite_theta_raises_or_falls_back(transform):
    x = torch.rand(2, 1, 12, 12)
    x_bad = x.clone()
    x_bad[1, 0, 3, 3] = float('nan')  # a NaN input makes the localisation net return NaN for sample 1
    stn = SpatialTransformer(1, transform)
    with torch.no_grad():
        stn.head.weight.fill_(0.01)
    with pytest.raises(ValueError, match=r'non-finite.*sample\(s\) \[1\]'):
        stn(x_bad)
    stn.invalid = 'identity'
    y = stn(x_bad)
    assert stn.last_num_fallbacks == 1
    assert torch.isfinite(stn.last_theta).all()
    assert torch.isfinite(y[0]).all()


def test_wrong_theta_shapes_rejected():
    with pytest.raises(ValueError, match=r'\[B, 2, 3\].*view\(-1, 2, 3\)'):
        affine_grid(torch.zeros(2, 6), (4, 4), False)
    with pytest.raises(ValueError, match='projective'):
        affine_grid(torch.eye(3)[None], (4, 4), False)
    with pytest.raises(ValueError, match=r'\[B, 3, 3\].*affine'):
        projective_grid(torch.zeros(1, 2, 3), (4, 4), False)
    with pytest.raises(ValueError, match=r'\[B, 9, 2\]'):
        tps_grid(torch.zeros(1, 16, 2), tps_control_points(3), (4, 4), False)
    with pytest.raises(TypeError, match='floating'):
        check_theta(torch.zeros(1, 2, 3, dtype=torch.long), 'affine')
    with pytest.raises(ValueError, match=r'raw parameters \[B, 4\]'):
        create_transform('similarity').to_theta(torch.zeros(2, 6))
    with pytest.raises(ValueError, match='3 input channels'):
        SpatialTransformer(3)(torch.rand(1, 1, 8, 8))


def test_warp_modules_match_functionals():
    x = _blobs(16, 2)
    th = similarity_theta(torch.tensor([0.2, 0.1]), 0.9, 0.05, 0.0)
    assert torch.equal(AffineWarp(out_size=8)(x, th), affine_warp(x, th, 8))
    H = torch.cat((th, torch.tensor([0.1, 0.0, 1.0]).expand(2, 1, 3)), 1)
    assert torch.equal(ProjectiveWarp()(x, H), projective_warp(x, H))
    c = tps_control_points(3)
    assert torch.allclose(TPSWarp(3)(x, c.expand(2, -1, -1)), x, atol=1e-5)


def test_transform_loss_regularises_toward_identity_and_inside():
    stn = SpatialTransformer(1, 'attention', reg_weight=1.0, boundary_weight=0.0)
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        stn.head.bias.copy_(torch.tensor([math.log(0.5), 0.3, 0.0]))  # zoom in, shift right: inside the image
    stn(x)
    assert stn.transform_loss().item() > 0
    assert stn.transform_loss(0.0, 1.0).item() == 0  # nothing leaves the image
    with torch.no_grad():
        stn.head.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))  # full scale, shifted: half of it samples outside
    stn(x)
    assert stn.transform_loss(0.0, 1.0).item() > 0
    # descending the regulariser alone moves the transform back toward the identity
    opt = torch.optim.SGD(stn.head.parameters(), lr=0.5)
    before = stn.family.deviation(stn.last_theta).mean().item()
    for _ in range(20):
        opt.zero_grad()
        stn(x)
        stn.transform_loss(1.0, 1.0).backward()
        opt.step()
    stn(x)
    assert stn.family.deviation(stn.last_theta).mean().item() < 0.1 * before


def test_parallel_transformers():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    pst = ParallelSpatialTransformer(3, 'attention', num_transforms=2, loc_kwargs=dict(channels=(4,), hidden=8))
    y = pst(x)
    assert y.shape == (2, 2, 3, 16, 16)
    assert (y - x[:, None]).abs().max() <= 1e-5
    assert pst.last_theta.shape == (2, 2, 2, 3)
    pst2 = ParallelSpatialTransformer(3, 'attention', num_transforms=2, out_size=8, max_translation=0.9,
                                      scale_range=(0.25, 1.5), init_translations=[(-0.5, 0.0), (0.5, 0.0)])
    y2 = pst2(x)
    assert y2.shape == (2, 2, 3, 8, 8)
    assert torch.allclose(pst2.last_theta[0, :, 0, 2], torch.tensor([-0.5, 0.5]), atol=1e-6)
    # a translated full-scale view of the left half: the right half of the first crop is the left half of x
    assert (y2[:, 0] - pst2(x)[:, 0]).abs().max() == 0
    with pytest.raises(ValueError, match='init_translations'):
        ParallelSpatialTransformer(3, 'attention', num_transforms=2, init_translations=[(0.1, 0.1)])


def test_localisation_input_resize_and_custom_loc_net():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    stn = SpatialTransformer(1, 'affine', loc_input_size=16, out_size=32)
    y = stn(x)
    assert y.shape == (2, 1, 32, 32)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(ValueError, match='loc_features'):
        SpatialTransformer(1, 'affine', loc_net=net)
    stn2 = SpatialTransformer(1, 'affine', loc_net=net, loc_features=5, loc_input_size=8)
    assert stn2(x).shape == x.shape
    stn3 = SpatialTransformer(1, 'affine', loc_net=net, loc_features=7, loc_input_size=8)
    with pytest.raises(ValueError, match=r'returned \(2, 5\)'):
        stn3(x)
    loc = LocalisationCNN(3, (8, 8), hidden=12)
    assert loc(torch.rand(1, 3, 9, 11)).shape == (1, 12)
    with pytest.raises(ValueError, match=r'\[B, C, H, W\]'):
        loc(torch.rand(3, 9, 11))
    with pytest.raises(TypeError, match='floating'):
        loc(torch.zeros(1, 3, 9, 11, dtype=torch.long))
    with pytest.raises(ValueError, match='3 input channels'):
        loc(torch.rand(1, 1, 9, 11))
