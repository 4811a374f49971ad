"""MNIST strokes (gequiv_timm/data/strokes.py): deterministic by seed, the properties its docstring states, and its
catalog entry."""
import pytest
import torch

from gequiv_timm.data import mnist_strokes
from gequiv_timm.data.catalog import get_dataset, load_data
from gequiv_timm.data.landmarks import INK_THRESHOLD, place_digits
from gequiv_timm.data.mnist import split_indices
from gequiv_timm.data.strokes import _uniform, compose_canvases


@pytest.fixture(scope='module')
def small():
    return mnist_strokes(seed=3, n_train=48, n_test=16)


def test_same_seed_same_tensors_other_seed_differs(small):
    again = mnist_strokes(seed=3, n_train=48, n_test=16)
    for a, b in ((small.train, again.train), (small.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.digits, b.digits)
    other = mnist_strokes(seed=4, n_train=48, n_test=16)
    assert not torch.equal(small.train.masks, other.train.masks)


def test_shapes_ranges_and_foreground(small):
    for split, n in ((small.train, 48), (small.test, 16)):
        assert split.images.shape == (n, 1, 64, 64) and split.images.dtype == torch.float32
        assert split.masks.shape == (n, 64, 64) and split.masks.dtype == torch.int64
        assert split.images.min() >= 0 and split.images.max() <= 1
        assert set(split.masks.unique().tolist()) == {0, 1}
        frac = split.masks.float().mean().item()
        assert 0.03 < frac < 0.25, frac  # thin structures: a small part of the canvas
        drawn = (split.digits >= 0).sum(1)
        assert drawn.min() >= 2 and drawn.max() <= 4  # 2..max_digits digits per canvas: strokes can cross
    assert small.classes == ('background', 'stroke')


def test_strokes_are_brighter_than_the_background_on_average(small):
    x, m = small.train.images, small.train.masks.bool().unsqueeze(1)
    assert x[m].mean() > x[~m].mean() + 0.2


def test_mask_is_the_thresholded_clean_digit_union():
    """The mask is OR_k (warped digit_k >= 0.5), whatever contrast, background and noise the image gets: rebuilt
    here from the same draws of the generator."""
    digits = torch.zeros(3, 2, 28, 28)
    digits[:, 0, 12:16, 4:24] = 1.0   # a horizontal bar
    digits[:, 1, 4:24, 12:16] = 0.8   # a vertical bar: they cross
    counts = torch.tensor([2, 1, 2])
    _, masks = compose_canvases(digits, counts, torch.Generator().manual_seed(5), canvas=40, translate=2.0)
    g = torch.Generator().manual_seed(5)
    angle, s = _uniform(g, 6, 0.0, 360.0), _uniform(g, 6, 1.0, 1.4)
    shift = _uniform(g, (6, 2), -2.0, 2.0)
    warped, _, _ = place_digits(digits.view(6, 1, 28, 28), torch.zeros(6, 1, 2), angle, s, shift, 40)
    ink = (warped.clamp(0, 1).view(3, 2, 40, 40) >= INK_THRESHOLD)
    ink[1, 1] = False  # canvas 1 draws one digit only
    assert torch.equal(masks, ink.any(1).long())
    assert (ink[0, 0] & ink[0, 1]).any()  # the two strokes of canvas 0 cross


def test_contrast_background_noise_do_not_change_the_mask():
    digits = torch.zeros(2, 2, 28, 28)
    digits[:, :, 10:18, 6:22] = 1.0
    counts = torch.tensor([2, 2])
    a = compose_canvases(digits, counts, torch.Generator().manual_seed(1), contrast=(0.1, 0.1), noise=(0.3, 0.3))
    b = compose_canvases(digits, counts, torch.Generator().manual_seed(1), contrast=(1, 1), noise=(0, 0),
                         illumination=0.0)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_train_and_test_canvases_use_disjoint_digits(monkeypatch):
    """Each split draws from its own part of split_indices(seed): the images handed to the composer are those."""
    import gequiv_timm.data.strokes as S
    seen = []
    real = S._split

    def spy(images, labels, n, max_digits, g, **kw):
        seen.append(images.clone())
        return real(images, labels, n, max_digits, g, **kw)
    monkeypatch.setattr(S, '_split', spy)
    S.mnist_strokes(seed=2, n_train=4, n_test=4)
    raw, _ = S._load_raw()
    tr, te = split_indices(2)
    assert torch.equal(seen[0], raw[tr].squeeze(1)) and torch.equal(seen[1], raw[te].squeeze(1))
    assert not set(tr.tolist()) & set(te.tolist())


@pytest.mark.parametrize('kw, msg', [
    (dict(max_digits=1), 'max_digits must be >= 2'),
    (dict(n_train=0), 'n_train must be a positive int'),
    (dict(scale=(0.0, 1.0)), 'scale must be'),
    (dict(noise=(0.2, 0.1)), 'noise must be'),
    (dict(translate=-1.0), 'translate and illumination'),
])
def test_bad_arguments_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        mnist_strokes(**kw)


def test_catalog_entry_and_loading():
    ds = get_dataset('strokes')
    assert ds.task == 'segment' and ds.metric == 'test_dice' and ds.labels == ('background', 'stroke')
    bundle = load_data('strokes', seed=0, limit_train=10, limit_eval=6)
    assert bundle.task == 'segment' and bundle.num_classes == 2 and bundle.image_size == 64
    x, m = bundle.train[0]
    assert x.shape == (1, 64, 64) and m.shape == (64, 64) and m.dtype == torch.int64
    assert len(bundle.train) == 10 and len(bundle.eval) == 6
    ref = mnist_strokes(0)
    # standardised with the MNIST statistics; the masks untouched
    assert torch.allclose(bundle.eval.dataset[0][0], (ref.test.images[0] - 0.1307) / 0.3081)
    assert torch.equal(bundle.eval.dataset[0][1], ref.test.masks[0])
