"""Distorted MNIST (R, RTS, P, E): shapes, determinism, and that each stored transform really made its image."""

import pytest
import torch
import torch.nn.functional as F

from gequiv_timm.data import load_mnist, split_indices
from gequiv_timm.data.distorted import PROTOCOLS, distort_images, distorted_mnist
from gequiv_timm.layers.stn import tps_control_points, tps_solve_matrix, transform_points



def _small(protocol, n=64, seed=0):
    images, _ = load_mnist()
    g = torch.Generator().manual_seed(seed)
    return images[:n], distort_images(images[:n], protocol, g)


@pytest.fixture(scope='module')
def rts():
    return distorted_mnist('RTS', seed=0)


def test_rts_shapes_labels_and_split(rts):
    images, labels = load_mnist()
    tr, te = split_indices(0)
    assert rts.train.images.shape == (4000, 1, 42, 42) and rts.test.images.shape == (1000, 1, 42, 42)
    assert rts.image_size == 42
    assert torch.equal(rts.train.labels, labels[tr]) and torch.equal(rts.test.labels, labels[te])
    assert rts.train.images.min() >= 0 and rts.train.images.max() <= 1
    # every distortion keeps (nearly) all the ink: the digit is moved around, not cut off or duplicated
    ink_in = images[te].sum((1, 2, 3))
    ink_out = rts.test.images.sum((1, 2, 3))
    scale = 1 / rts.test.theta[:, :2, :2].det().abs().sqrt()  # forward scale s
    ratio = ink_out / (ink_in * scale ** 2)  # scaling a digit by s scales its ink by s^2
    assert ratio.median() > 0.95 and ratio.min() > 0.6
    ds = rts.train.dataset()
    x, y = ds[0]
    assert x.shape == (1, 42, 42) and abs(float(rts.train.dataset().tensors[0].mean())) < 0.5


def test_rts_parameters_in_protocol_ranges(rts):
    th = rts.train.theta  # sampling map p_in = (1/s) R(a) (p_out - t)
    lin = th[:, :2, :2]
    s = 1 / lin.det().sqrt()
    a = torch.rad2deg(torch.atan2(lin[:, 1, 0], lin[:, 0, 0]))
    assert s.min() >= 0.7 - 1e-4 and s.max() <= 1.2 + 1e-4 and s.max() - s.min() > 0.45
    assert a.abs().max() <= 45 + 1e-3 and a.abs().max() > 40
    t = -(torch.linalg.inv(lin) @ th[:, :2, 2:])[..., 0]  # forward translation
    room = 1 - 28 * s / 42
    assert (t.abs() <= room[:, None] + 1e-4).all() and t.abs().max() > 0.3


def test_deterministic_and_seed_dependent():
    a = distorted_mnist('R', seed=1)
    b = distorted_mnist('R', seed=1)
    c = distorted_mnist('R', seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.theta, b.test.theta)
    assert not torch.equal(a.test.theta, c.test.theta)
    assert a.train.images.shape == (4000, 1, 28, 28)
    angles = torch.rad2deg(torch.atan2(a.train.theta[:, 1, 0], a.train.theta[:, 0, 0]))
    assert angles.abs().max() <= 90 + 1e-3 and angles.min() < -80 and angles.max() > 80
    assert angles.mean().abs() < 5  # uniform on [-90, 90]


@pytest.mark.parametrize('protocol', ['R', 'RTS', 'P'])
def test_stored_theta_made_the_image(protocol):
    """Map an ink pixel's location through the stored sampling map: the original digit has ink there."""
    orig, (dist, theta) = _small(protocol)
    size = PROTOCOLS[protocol]['size']
    assert dist.shape == (64, 1, size, size) and theta.shape == (64, 3, 3)
    src = orig
    if protocol == 'RTS':
        src = F.pad(orig, (7, 7, 7, 7))
    # resample the original with the stored homography; it must equal the distorted image (same sampler)
    from gequiv_timm.layers.stn import projective_warp
    again = projective_warp(src, theta, out_size=size)
    assert (again.clamp(0, 1) - dist).abs().max() < 1e-4
    # and the transforms are not trivial
    eye = torch.eye(3)
    assert (theta - eye).abs().flatten(1).amax(1).min() > 1e-3


def test_projective_protocol_corners_and_scale():
    _, (dist, theta) = _small('P', n=200)
    corners = torch.tensor([[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]])
    # where do the image corners go (forward map = inverse of the sampling map)?
    fwd = transform_points(torch.linalg.inv(theta), corners, 'projective')
    moved = fwd - corners[None]
    assert moved.abs().max() < 1.0  # bounded (truncated noise + shrink)
    assert torch.isfinite(dist).all() and dist.sum((1, 2, 3)).min() > 10
    # not all affine: the perspective row is used
    assert theta[:, 2, :2].abs().max() > 0.02


def test_elastic_protocol():
    orig, (dist, theta) = _small('E', n=100)
    ctrl = tps_control_points(4)
    assert theta.shape == (100, 16, 2) and dist.shape == (100, 1, 28, 28)
    # source points = (ctrl + offset) / s with |offset| <= 0.15, s in [0.75, 1]
    lo = (ctrl.abs() - 0.15)[None]
    hi = ((ctrl.abs() + 0.15) / 0.75)[None]
    assert (theta.abs() >= lo - 1e-5).all() and (theta.abs() <= hi + 1e-5).all()
    # the warp is non-affine: the best affine fit of the source points leaves a residual
    pc = torch.cat((ctrl, torch.ones(16, 1)), 1)
    fit = pc @ torch.linalg.lstsq(pc.expand(100, -1, -1), theta).solution
    assert (theta - fit).abs().amax((1, 2)).median() > 0.02
    m = tps_solve_matrix(ctrl, ctrl)
    assert torch.allclose(transform_points(theta, ctrl, 'tps', m), theta, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="expected one of"):
        distorted_mnist('RT')
    with pytest.raises(ValueError, match='28, 28'):
        distort_images(torch.rand(2, 1, 32, 32), 'R', torch.Generator())
