"""``limit_train`` / ``limit_eval`` (``--limit-train`` / ``--limit-eval``) are never bent to fit: a limit larger than
the set, below 1, or for a set that is absent is one ``ValueError`` line naming the option, the set and its size
(issue 15: a limit larger than the set silently used the whole set). A limit up to the size is a fixed subset."""
from pathlib import Path

import pytest
import torch

from gequiv_timm.data.catalog import load_data

SET = 'rotmnist-upright'  # the cheapest built-in set to build


@pytest.fixture(scope='module')
def sizes():
    whole = load_data(SET)
    return {'limit_train': len(whole.train), 'limit_eval': len(whole.eval)}


@pytest.mark.parametrize('arg, option, which', [('limit_train', '--limit-train', 'training set'),
                                                ('limit_eval', '--limit-eval', 'evaluation set')])
def test_a_limit_larger_than_the_set_is_refused_naming_its_size(sizes, arg, option, which):
    n = sizes[arg]
    with pytest.raises(ValueError) as err:
        load_data(SET, **{arg: n + 1})
    msg = str(err.value)
    assert '\n' not in msg
    assert f'{arg} ({option}) {n + 1} is more than the {n:,} samples of {SET}\'s {which}' in msg, msg
    assert f'pass at most {n}' in msg and f'leave {option} out' in msg, msg


@pytest.mark.parametrize('arg', ['limit_train', 'limit_eval'])
def test_a_limit_up_to_the_size_is_used_as_given(sizes, arg):
    n = sizes[arg]
    key = 'train' if arg == 'limit_train' else 'eval'
    assert len(getattr(load_data(SET, **{arg: n}), key)) == n
    part = getattr(load_data(SET, **{arg: n - 1}), key)
    assert len(part) == n - 1
    again = getattr(load_data(SET, **{arg: n - 1}), key)
    assert torch.equal(part[0][0], again[0][0]) and part.indices == again.indices  # a fixed (seeded) subset


@pytest.mark.parametrize('value', [0, -1, True, 2.5, '10'])
def test_a_limit_below_one_or_not_a_count_is_refused(value):
    with pytest.raises(ValueError, match=r'^limit_train \(--limit-train\) must be a number of samples >= 1, or None '
                                         r'for the whole set; got '):
        load_data(SET, limit_train=value)


def _write_folder(root: Path, splits=('train', 'val'), per_class=3):
    from PIL import Image
    for split in splits:
        for c in ('a', 'b'):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((torch.rand(28, 28) * 255).byte().numpy(), mode='L').save(d / f'{i}.png')


FOLDER_CFG = dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation='bilinear')


def test_image_folder_limits(tmp_path):
    _write_folder(tmp_path / 'both')
    data = load_data(str(tmp_path / 'both'), data_config=FOLDER_CFG, limit_train=6, limit_eval=2)
    assert len(data.train) == 6 and len(data.eval) == 2
    with pytest.raises(ValueError, match=r"\(--limit-train\) 7 is more than the 6 samples of image folder .*both's "
                                         r"training set; pass at most 6"):
        load_data(str(tmp_path / 'both'), data_config=FOLDER_CFG, limit_train=7)
    with pytest.raises(ValueError, match=r"\(--limit-eval\) 7 is more than the 6 samples"):
        load_data(str(tmp_path / 'both'), data_config=FOLDER_CFG, limit_eval=7)
    # no val/ folder: no evaluation set, so a limit for it cannot apply (it was ignored)
    _write_folder(tmp_path / 'trainonly', splits=('train',))
    assert load_data(str(tmp_path / 'trainonly'), data_config=FOLDER_CFG).eval is None
    with pytest.raises(ValueError, match=r'limit_eval \(--limit-eval\) 2: image folder .*trainonly \(no val/ or '
                                         r'validation/ folder\) has no evaluation set to limit; leave --limit-eval out'):
        load_data(str(tmp_path / 'trainonly'), data_config=FOLDER_CFG, limit_eval=2)
