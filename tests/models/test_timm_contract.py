"""timm's model contract: what timm's own ``tests/test_models.py`` does not check on our models.

timm's file itself runs over every ``gequiv_*`` model in ``tests/models/test_timm_models_upstream.py``. This file adds:

* ``test_forward_intermediates`` and ``test_prune_intermediate_layers``: timm runs its
  ``test_model_forward_intermediates`` / ``test_prune_intermediate_layers_contract`` only on its own model modules
  (``FEAT_INTER_FILTERS``), so here the same properties are asserted for every gequiv model (the sides capped at 32
  by timm's input-size rule, to stay fast on 2 CPU cores);
* for each departure in ``tests/models/timm_departures.py`` whose failing assertion hides the later checks of the same timm
  test, those checks (the departures' ``covered_by``): keypoint backward with ``K`` on axis 1, timm's cfg test on
  the CPU for the escnn baselines, ``features_only`` for the unpadded P4CNN layout without the lower bound.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import timm_upstream
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from timm_departures import DEPARTURES

import gequiv_timm  # noqa: F401  (registers the models)

MODELS = timm.list_models('gequiv_*')
MAX_SIDE = 32
upstream = timm_upstream.load()


def _departing(test: str):
    """The models for which ``test`` of timm's file is a listed departure."""
    return sorted(m for m in MODELS for d in DEPARTURES if d.matches(test, m))


def _input_size(name_or_model, target: int = MAX_SIDE):
    """timm's ``_get_input_size`` (its own function, from its test file) with a smaller target."""
    if isinstance(name_or_model, torch.nn.Module):
        return upstream._get_input_size(model=name_or_model, target=target)
    return upstream._get_input_size(model_name=name_or_model, target=target)


def _create(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw)


@pytest.fixture(scope='module', params=MODELS)
def base(request):
    """One seeded eval-mode instance per model; tests that change it work on a deepcopy."""
    return _create(request.param).eval()


# ----------------------------------------------------------------------------------------------------------------
# not run by timm's file on models outside its own modules
# ----------------------------------------------------------------------------------------------------------------
def _check_maps(outputs, channels, reductions, size, batch, lower_bound: bool = True):
    assert len(channels) >= 3, 'fewer than 3 feature levels'
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.dim() == 4, f'feature map {tuple(o.shape)} is not 4-D (fold the group axis)'
        assert o.shape[1] == c
        assert o.shape[2] <= math.ceil(size[0] / r) + 1 and o.shape[3] <= math.ceil(size[1] / r) + 1
        if lower_bound:  # timm's "feature_info reduction off by 2x or more"
            assert o.shape[2] > size[0] / (2 * r) and o.shape[3] > size[1] / (2 * r), f'feature reduction {r}'
        assert o.shape[0] == batch
        assert not torch.isnan(o).any()


def test_forward_intermediates(base):
    model = base
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    size = _input_size(model)
    x = torch.randn(1, *size)
    final, inter = model.forward_intermediates(x, output_fmt='NCHW')
    _check_maps(inter, info.channels(), info.reduction(), size[1:], 1, lower_bound=False)
    torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
    try:
        model.set_grad_checkpointing()
    except Exception:
        return
    try:
        final2, _ = model.forward_intermediates(x, output_fmt='NCHW')
        torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)
    finally:
        model.set_grad_checkpointing(False)


def test_prune_intermediate_layers(base):
    model = base
    x = torch.randn(2, *_input_size(model))
    last = len(model.feature_info) - 1
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(pruned(x), expected, msg='prune_head=False at the last index changed the output')
    for i in range(last + 1):
        with torch.no_grad():
            sel = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(sel[0], taps[i], msg=f'stop_early tap {i}')
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i])
            sel = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
            torch.testing.assert_close(sel[0], taps[i], msg=f'pruned tap {i}')
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i], prune_norm=True)
            feats = pruned.forward_features(x)
            if i < last and torch.is_tensor(feats) and feats.ndim == 4:
                torch.testing.assert_close(feats, taps[i], msg=f'pruned features {i}')
        pruned.train()
        sel = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        feats = pruned.forward_features(x)
        feats = feats if isinstance(feats, (list, tuple)) else [feats]
        sum(f.sum() for f in sel + feats).backward()
        unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f'pruned to {i}, unused params: {unused[:5]}'


# ----------------------------------------------------------------------------------------------------------------
# the rest of timm's tests where a listed departure stops them early
# ----------------------------------------------------------------------------------------------------------------
def _fx_model(model, train: bool = False):
    from torchvision.models.feature_extraction import (
        NodePathTracer,
        create_feature_extractor,
        get_graph_node_names,
    )
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return = [eval_nodes[-1]]
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        out_names = [n.name for n in nodes[0]._input_nodes.keys()]
        node_names = [n.name for n in nodes]
        train_return = [train_nodes[-node_names.index(n)] for n in out_names]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=eval_return,
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('fx', [False, True], ids=['eager', 'fx'])
@pytest.mark.parametrize('name', _departing('test_model_backward'))
def test_keypoint_backward(name, fx):
    """timm's test_model_backward / _fx with num_classes (= K keypoints, or classes per pixel of a segmentation
    model) read on axis 1 of [B, K, H, W] (or [B, K, 2]) instead of the last axis: every parameter gets a gradient,
    none is missing, no NaN."""
    assert set(_departing('test_model_backward_fx')) == set(_departing('test_model_backward'))
    model = _create(name, num_classes=42).train()
    assert getattr(model, 'num_keypoints', model.num_classes) == 42
    n_params = sum(p.numel() for p in model.parameters())
    if fx:
        model = _fx_model(model, train=True)
    x = torch.randn(2, *upstream._get_input_size(model_name=name, target=upstream.TARGET_BWD_SIZE))
    out = model(x)
    out = torch.cat(tuple(out.values())) if fx else out
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert sum(p.grad.numel() for p in model.parameters()) == n_params
    assert out.shape[1] == 42 and out.dim() in (3, 4)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('name', [m for m in _departing('test_model_default_cfgs') if m.startswith('gequiv_escnn_')])
def test_escnn_default_cfgs_on_cpu(name):
    """timm's own test_model_default_cfgs, run on the CPU instead of the meta device (escnn's batch norm cannot run
    there): it must get through every cfg / head / pool_size / reset / classifier check and stop exactly at the
    first_conv one (the cfg has none); the checks timm runs after it follow, called one by one."""
    with pytest.raises(AssertionError) as err:
        upstream.test_model_default_cfgs(name, 1, 'cpu')
    assert 'isinstance(first_conv' in str(err.traceback[-1].statement), err.traceback[-1]
    assert timm.get_pretrained_cfg(name).first_conv is None
    upstream._assert_reset_classifier_preserves_parent_device_dtype(_create(name).eval())
    upstream._assert_factory_device(name, 'meta')
    upstream._assert_frozen_survives_reset_and_resize(name, 'meta')


@pytest.mark.parametrize('name', _departing('test_model_forward_features'))
def test_unpadded_features_only(name):
    """timm's test_model_forward_features (its input-size rule, batch 1) without the one lower bound that unpadded
    convolutions break; the maps' sizes follow the valid-convolution arithmetic exactly."""
    model = _create(name, features_only=True).eval()
    size = upstream._get_input_size(model=model, target=upstream.TARGET_FFEAT_SIZE)
    outputs = model(torch.randn(1, *size))
    _check_maps(outputs, model.feature_info.channels(), model.feature_info.reduction(), size[1:], 1,
                lower_bound=False)
    # 28 -> 26 (conv), 24 -> 12 (conv, pool), then -2 per 3x3 valid conv: the departure is the unpadded arithmetic
    assert [o.shape[-1] for o in outputs] == [26, 12, 10, 8, 6] and size[-1] == 28
