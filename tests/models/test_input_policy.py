"""One input policy for every registered model (issue 15, item 14): one parametrised test over every
``gequiv_*`` model (the escnn baselines too when escnn is installed) and every kind of input.

The policy (:func:`gequiv_timm.models._timm_api.check_image_input`): a non-tensor or a non-floating dtype is a
TypeError; a tensor that is not ``[B, in_chans, H, W]``, smaller than the model's stated minimum (or, for keypoint
models, not a multiple of the coarsest stride), or holding NaN / Inf while ``GEQUIV_TIMM_CHECK_FINITE`` is on, is a
ValueError whose message starts with the model's registered name; an empty batch gives an empty output of the
shape and dtype a batch of one gives. The stated minimum is tight: the model runs at it, and one pixel less fails
inside the network when the policy's size check is taken away.

Each model is built once (the cases of one model are consecutive; a one-model cache holds it).
"""
from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

import gequiv_timm  # noqa: F401  (registers the models)
from gequiv_timm.models import _timm_api, rcn, stn
from gequiv_timm.models._timm_api import min_input_size
from gequiv_timm.models.escnn_baselines import escnn_available

KINDS = ('normal', 'at_min', 'below_min', 'tight', 'channels', 'rank3', 'int_dtype', 'not_tensor', 'nan',
         'empty_batch', 'empty_batch_train')  # empty_batch_train last: it leaves the model in train mode
ESCNN = escnn_available()


def _names():
    return [n for n in timm.list_models('gequiv_*') if ESCNN or not n.startswith('gequiv_escnn')]


CASES = [pytest.param(n, k, id=f'{n}-{k}') for n in _names() for k in KINDS]


@pytest.fixture(scope='module')
def build():
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()  # the cases of a model are consecutive: keep one model alive at a time
            torch.manual_seed(0)
            cache[name] = timm.create_model(name).eval()
        return cache[name]
    yield get
    cache.clear()


def _side(model) -> int:
    """A small valid side: the stated minimum, at least 32 (a multiple of every keypoint model's stride)."""
    return max(min_input_size(model), 32)


def _raises(fn, exc, *fragments):
    with pytest.raises(exc) as err:
        fn()
    msg = str(err.value)
    assert '\n' not in msg, msg  # one line
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def _without_size_check(monkeypatch):
    """Take the policy's size rules away (every other rule stays): min size 1, no multiple."""
    original = _timm_api.check_image_input

    def lenient(x, in_chans, min_size, name, multiple=1):
        original(x, in_chans, 1, name)
    for mod in (_timm_api, stn, rcn):
        monkeypatch.setattr(mod, 'check_image_input', lenient)


@pytest.mark.parametrize('name, kind', CASES)
def test_input_policy(build, monkeypatch, name, kind):
    model = build(name)
    c = model.pretrained_cfg['input_size'][0]
    m = min_input_size(model)
    s = _side(model)
    with torch.no_grad():
        if kind == 'normal':
            y = model(torch.randn(2, c, s, s))
            assert y.shape[0] == 2 and torch.isfinite(y).all()
        elif kind == 'at_min':
            model(torch.randn(1, c, m, m))
        elif kind == 'below_min':
            for h, w in ((m - 1, s), (s, m - 1)):
                _raises(lambda: model(torch.randn(1, c, h, w)), ValueError, name, 'too small', f'at least {m}x{m}')
        elif kind == 'tight':
            if isinstance(model, rcn.KeypointNet):
                pytest.skip('a keypoint model needs sides that are multiples of its coarsest stride: its minimum is '
                            'that stride, by the policy, not by the layers')
            if m == 1:
                pytest.skip('minimum 1: nothing smaller to try')
            _without_size_check(monkeypatch)
            with pytest.raises(Exception):  # noqa: B017  (any failure inside the network: torch's or a layer's)
                model(torch.randn(1, c, m - 1, m - 1))
        elif kind == 'channels':
            x = torch.randn(1, c + 1, s, s)
            for fn in (model, model.forward_features, model.forward_intermediates):
                _raises(lambda: fn(x), ValueError, name, f'expected {c} input channels', f'in_chans={c + 1}')
        elif kind == 'rank3':
            _raises(lambda: model(torch.randn(c, s, s)), ValueError, name, f'[B, {c}, H, W]', 'x[None]')
        elif kind == 'int_dtype':
            _raises(lambda: model(torch.zeros(1, c, s, s, dtype=torch.uint8)), TypeError, name, 'floating point')
        elif kind == 'not_tensor':
            _raises(lambda: model(torch.zeros(1, c, s, s).tolist()), TypeError, name, 'torch.Tensor')
        elif kind == 'nan':
            x = torch.randn(1, c, s, s)
            x[0, 0, 1, 2] = float('nan')
            monkeypatch.setattr(_timm_api, 'CHECK_FINITE', True)
            _raises(lambda: model(x), ValueError, name, '1 NaN', 'GEQUIV_TIMM_CHECK_FINITE')
            x[0, 0, 1, 2] = float('inf')
            _raises(lambda: model(x), ValueError, name, '1 Inf')
        elif kind == 'empty_batch':
            ref = model(torch.randn(1, c, s, s))
            out = model(torch.randn(0, c, s, s))
            assert out.shape == (0, *ref.shape[1:]) and out.dtype == ref.dtype
            feats = model.forward_intermediates(torch.randn(0, c, s, s), intermediates_only=True)
            ref_feats = model.forward_intermediates(torch.randn(1, c, s, s), intermediates_only=True)
            assert [f.shape[1:] for f in feats] == [f.shape[1:] for f in ref_feats]
            assert all(f.shape[0] == 0 for f in feats)
    if kind == 'empty_batch_train':  # an empty last batch in a training loop: forward and backward run
        model.train()
        out = model(torch.randn(0, c, s, s))
        assert out.shape[0] == 0
        out.sum().backward()


@pytest.mark.parametrize('value, on', [('1', True), ('true', True), ('0', False), ('', False), ('no', False)])
def test_finite_check_follows_the_environment_variable(monkeypatch, value, on):
    """GEQUIV_TIMM_CHECK_FINITE turns the model-level check on at import (the variable the layers read too): a fresh
    copy of the policy module is imported with the variable set."""
    monkeypatch.setenv('GEQUIV_TIMM_CHECK_FINITE', value)
    spec = importlib.util.spec_from_file_location('gequiv_timm.models._timm_api_env_probe', _timm_api.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.CHECK_FINITE is on


def test_min_input_size_is_for_gequiv_models():
    with pytest.raises(TypeError, match='not a gequiv_timm model'):
        min_input_size(torch.nn.Conv2d(1, 1, 1))
