"""Rotated MNIST from the 5,000 real digits: deterministic, stratified, no leak, correct rotations."""
import torch

from gequiv_timm.data import load_mnist, rotate_images, rotated_mnist, split_indices


def test_real_digits():
    x, y = load_mnist()
    assert x.shape == (5000, 1, 28, 28) and y.shape == (5000,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))


def test_split_is_fixed_stratified_and_disjoint():
    tr, te = split_indices(0)
    tr2, te2 = split_indices(0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert len(tr) == 4000 and len(te) == 1000
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(5000))
    _, y = load_mnist()
    assert torch.equal(torch.bincount(y[te]), torch.full((10,), 100))
    assert not torch.equal(split_indices(1)[1], te)


def test_rotated_mnist_deterministic_and_no_leak():
    a, b = rotated_mnist(3), rotated_mnist(3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.angles, b.test.angles)
    x, _ = load_mnist()
    _, te = split_indices(3)
    up = rotated_mnist(3, protocol='upright')
    assert torch.all(up.train.angles == 0)
    # upright training images are exactly the original digits, and none of them is a test digit
    test_set = {tuple(v) for v in x[te].flatten(1).numpy().round(4).tolist()}
    assert not any(tuple(v) in test_set for v in up.train.images.flatten(1).numpy().round(4).tolist())
    assert float(a.test.angles.min()) >= 0 and float(a.test.angles.max()) < 360
    assert a.test.angles.std() > 90  # uniform on [0, 360)


def test_rotate_images_direction_and_exact_quarters():
    x, _ = load_mnist()
    d = x[:4]
    assert torch.equal(rotate_images(d, torch.full((4,), 90.0)), torch.rot90(d, 1, dims=(-2, -1)))
    near = rotate_images(d, torch.full((4,), 89.99))
    assert (near - torch.rot90(d, 1, dims=(-2, -1))).abs().mean() < 0.01  # same direction as rot90
    assert (rotate_images(d, torch.zeros(4)) - d).abs().max() == 0
