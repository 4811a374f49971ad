"""MNIST landmarks: keypoint definitions, placement of image and points alike, visibility, determinism."""
import math

import pytest
import torch

from gequiv_timm.data import load_mnist
from gequiv_timm.data.landmarks import (
    INK_THRESHOLD,
    KEYPOINT_NAMES,
    digit_keypoints,
    ink_box_size,
    mnist_landmarks,
    place_digits,
)


@pytest.fixture(scope='module')
def ds():
    return mnist_landmarks(seed=0)


def test_keypoints_of_a_hand_made_digit():
    img = torch.zeros(28, 28)
    img[5, 10:15] = 1.0      # a top bar, columns 10..14
    img[5:20, 12] = 1.0      # a stem in column 12, rows 5..19
    img[12, 8:13] = 1.0      # a left arm at row 12, columns 8..12
    kp = digit_keypoints(img)
    w = img.double()
    cx = float((w.sum(0) * torch.arange(28)).sum() / w.sum())
    cy = float((w.sum(1) * torch.arange(28)).sum() / w.sum())
    assert kp[0].tolist() == [12.0, 5.0]      # top row 5; nearest the centroid column (~11.8) is column 12
    assert kp[1].tolist() == [12.0, 19.0]     # bottom: the end of the stem
    assert kp[2].tolist() == [8.0, 12.0]      # left: the end of the arm
    assert kp[3].tolist() == [14.0, 5.0]      # right: column 14 only has ink at row 5
    assert kp[4].tolist() == pytest.approx([cx, cy], abs=1e-5)
    assert ink_box_size(img) == pytest.approx(math.sqrt(15 * 7))
    with pytest.raises(ValueError, match='ink threshold'):
        digit_keypoints(torch.zeros(28, 28))


def test_keypoints_on_real_digits_are_extreme_ink_points():
    images, _ = load_mnist()
    for img in images[:200, 0]:
        kp = digit_keypoints(img)
        ink = img >= INK_THRESHOLD
        rr, cc = ink.nonzero(as_tuple=True)
        for k in range(4):  # the four extreme points lie on ink
            x, y = int(kp[k, 0]), int(kp[k, 1])
            assert ink[y, x]
        assert kp[0, 1] == rr.min() and kp[1, 1] == rr.max() and kp[2, 0] == cc.min() and kp[3, 0] == cc.max()


def test_identity_placement_is_an_exact_copy():
    images, _ = load_mnist()
    x = images[:4]
    kp = torch.stack([digit_keypoints(im) for im in x])
    n = len(x)
    canvas, kp2, vis = place_digits(x, kp, torch.zeros(n), torch.ones(n), torch.zeros(n, 2), out_size=64)
    # centres 13.5 -> 31.5: an integer shift of 18 pixels
    assert torch.allclose(canvas[:, :, 18:46, 18:46], x, atol=1e-5)
    assert canvas.sum() == pytest.approx(x.sum().item(), rel=1e-5)
    assert torch.allclose(kp2, kp + 18, atol=1e-4) and vis.all()


@pytest.mark.parametrize('angle,scale,shift', [(90.0, 1.0, (0.0, 0.0)), (-37.0, 1.7, (5.0, -9.0)),
                                               (151.0, 1.2, (-12.0, 3.5))])
def test_image_and_points_move_alike(angle, scale, shift):
    # a small blob: its intensity centroid must land on the transformed point
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 6:9, 19:22] = torch.tensor([[0.2, 0.5, 0.2], [0.5, 1.0, 0.5], [0.2, 0.5, 0.2]])
    pt = torch.tensor([[[20.0, 7.0]]])
    canvas, kp, vis = place_digits(img, pt, torch.tensor([angle]), torch.tensor([scale]), torch.tensor([shift]))
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing='ij')
    m = canvas[0, 0]
    c = torch.stack([(m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()])
    assert torch.allclose(c, kp[0, 0], atol=0.05), (c, kp)
    assert vis.all()


def test_rotation_is_counter_clockwise_on_screen():
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 13:15, 24:27] = 1.0  # a blob right of the centre
    pt = torch.tensor([[[25.0, 13.5]]])
    canvas, kp, _ = place_digits(img, pt, torch.tensor([90.0]), torch.ones(1), torch.zeros(1, 2))
    # right of centre, turned 90 degrees counter-clockwise, goes above the centre (smaller y)
    assert kp[0, 0, 1] < 31.5 - 10 and abs(kp[0, 0, 0] - 31.5) < 1e-4
    assert canvas[0, 0, :23].sum() > 0.99 * canvas.sum() and canvas[0, 0, 23:].sum() == 0


def test_points_leaving_the_canvas_are_absent():
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 10:18, 10:18] = 1.0
    pts = torch.tensor([[[0.0, 13.5], [27.0, 13.5], [13.5, 13.5]]])
    _, kp, vis = place_digits(img, pts, torch.zeros(1), torch.full((1,), 2.0), torch.tensor([[20.0, 0.0]]))
    # x: 31.5 + 20 + 2 * (x - 13.5): -27 + 51.5 = 24.5 (in), 27 + 51.5 = 78.5 (out), 51.5 (in)
    assert torch.allclose(kp[0, :, 0], torch.tensor([24.5, 78.5, 51.5]))
    assert vis.tolist() == [[True, False, True]]


def test_dataset_shapes_and_invariants(ds):
    assert ds.keypoint_names == KEYPOINT_NAMES and len(KEYPOINT_NAMES) == 5
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    for split in (ds.train, ds.test):
        assert split.images.shape[1:] == (1, 64, 64) and split.keypoints.shape[1:] == (5, 2)
        assert split.images.min() >= 0 and split.images.max() <= 1
        inside = ((split.keypoints >= -0.5) & (split.keypoints < 63.5)).all(-1)
        assert torch.equal(split.visible, inside)
        assert (split.angle.abs() <= 30).all() and (split.scale >= 1).all() and (split.scale <= 1.8).all()
        assert (split.shift.abs() <= 14).all()
        assert (split.norm > 5).all()
    # a few points do leave the canvas at the default placement; most stay
    frac = ds.train.visible.float().mean().item()
    assert 0.97 < frac < 1.0


def test_centroid_keypoint_follows_the_ink(ds):
    # the centroid keypoint of the placed digit is the ink centre of mass of the placed image (for digits well
    # inside the canvas); bilinear resampling keeps it to a fraction of a pixel
    sp = ds.test
    keep = sp.visible.all(1) & (sp.shift.abs().max(1).values < 6)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing='ij')
    m = sp.images[keep, 0]
    c = torch.stack([(m * xs).sum((-2, -1)), (m * ys).sum((-2, -1))], -1) / m.sum((-2, -1))[:, None]
    err = (c - sp.keypoints[keep, 4]).norm(dim=-1)
    assert keep.sum() > 100 and err.max() < 0.35, err.max()


def test_deterministic_by_seed(ds):
    again = mnist_landmarks(seed=0)
    for a, b in ((ds.train.images, again.train.images), (ds.test.keypoints, again.test.keypoints),
                 (ds.train.visible, again.train.visible), (ds.test.norm, again.test.norm)):
        assert torch.equal(a, b)
    other = mnist_landmarks(seed=1)
    assert not torch.equal(ds.test.keypoints, other.test.keypoints)


def test_dataset_tensors_and_errors(ds):
    x, kp, vis, norm = ds.test.dataset()[0]
    assert x.shape == (1, 64, 64) and kp.shape == (5, 2) and vis.dtype == torch.bool and norm.dim() == 0
    with pytest.raises(ValueError, match='scale'):
        mnist_landmarks(scale=(2.0, 1.0))
