"""Loading a backbone checkpoint into a stem model is strict: only the keys the equivariant stem replaces may be
absent or extra (and the classifier when ``num_classes`` changes, as in timm). Another backbone's checkpoint is
refused with its unexpected, missing and wrong-shaped keys named apart; a partial load is asked for with timm's
``pretrained_strict=False`` (``strict=False`` on an instance) and still refuses wrong shapes and dtypes. Before
issue 15, ``resnet34``'s checkpoint went into ``gequiv_p4_resnet18`` with its extra layers dropped (only logged) and
a wrong-shaped layer was reported as "missing".
"""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import gequiv_timm  # noqa: F401
from gequiv_timm.models.stems import inject_equivariant_stem, load_backbone_checkpoint
from gequiv_timm.weights import WeightsError, save_weights

STEM_SRC = {'conv1.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var', 'bn1.num_batches_tracked'}


def _state(name: str, seed: int = 1):
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}


@pytest.fixture(scope='module')
def r18():
    return _state('resnet18')


@pytest.fixture(scope='module')
def r34_file(tmp_path_factory):
    sd = _state('resnet34')
    path = tmp_path_factory.mktemp('r34') / 'resnet34.safetensors'
    save_file(sd, str(path))
    return sd, path


def _save(tmp_path, sd, name='w.safetensors', metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _stem_model(path, **kw):
    return timm.create_model('gequiv_p4_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)


def test_another_backbones_checkpoint_is_refused_unless_partial_is_asked(r34_file, r18):
    sd, path = r34_file
    extra = sorted(set(sd) - set(r18))
    assert len(extra) > 90  # resnet34's extra blocks
    with pytest.raises(WeightsError, match=rf"{path}: does not fit ResNet: unexpected keys \({len(extra)}\): "
                                           rf"\['{extra[0]}'.*pretrained_strict=False") as e:
        _stem_model(path)
    assert 'missing keys' not in str(e.value) and 'wrong shapes' not in str(e.value)
    # asked for explicitly: the matching layers load, the rest is reported
    model = _stem_model(path, pretrained_strict=False)
    own = model.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in r18 if k not in STEM_SRC)
    assert {k.split(':')[0] for k in model.pretrained_load_report['not_loaded']} == STEM_SRC | set(extra)


def test_wrong_shapes_and_missing_keys_are_named_apart(tmp_path, r18):
    sd = dict(r18)
    sd['layer4.1.conv2.weight'] = sd['layer4.1.conv2.weight'][:, :256]
    del sd['layer3.0.bn1.running_mean']
    sd['layer9.extra'] = torch.zeros(1)
    path = _save(tmp_path, sd)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): \['layer9.extra'\]; missing keys \(1\): "
                                           r"\['layer3.0.bn1.running_mean'\]; wrong shapes \(1\): "
                                           r"\['layer4.1.conv2.weight: file \(512, 256, 3, 3\) vs model "
                                           r"\(512, 512, 3, 3\)'\]\. Use the checkpoint"):
        _stem_model(path)
    # a partial load allows absent / extra keys, never a wrong shape (as torch's load_state_dict)
    with pytest.raises(WeightsError, match=r'wrong shapes \(1\)'):
        _stem_model(path, pretrained_strict=False)
    sd['layer4.1.conv2.weight'] = r18['layer4.1.conv2.weight']
    model = _stem_model(_save(tmp_path, sd, 'ok.safetensors'), pretrained_strict=False)
    assert torch.equal(model.layer4[1].conv2.weight, r18['layer4.1.conv2.weight'])
    assert 'layer3.0.bn1.running_mean' in model.pretrained_load_report['missing']


@pytest.mark.parametrize('kw', [{}, {'num_classes': 10}, {'in_chans': 1}, {'features_only': True}], ids=str)
def test_the_backbones_own_checkpoint_loads_strictly(tmp_path, r18, kw):
    """The legitimate case: the stem keys are replaced by design; a new head (num_classes) or a features-only model
    drops the classifier as timm does; everything else fits and is loaded."""
    model = _stem_model(_save(tmp_path, r18, metadata={'architecture': 'resnet18'}), **kw)
    inner = model.model if kw.get('features_only') else model
    own = inner.state_dict()
    assert torch.equal(own['layer4.1.conv2.weight'], r18['layer4.1.conv2.weight'])
    rep = inner.pretrained_load_report
    new_head = {'fc.weight', 'fc.bias'} if 'num_classes' in kw else set()  # a new head: dropped, as in timm
    assert {k.split(':')[0] for k in rep['not_loaded']} == STEM_SRC | new_head
    assert rep['missing'] == [] and rep['initialised']


@pytest.mark.parametrize('model', ['gequiv_p4_resnet18', 'gequiv_pde_resnet18'])
def test_every_model_on_a_backbone_takes_the_file_of_that_backbone(tmp_path, model):
    """A file written for the plain backbone (metadata architecture 'resnet18') loads into each model built on it,
    whichever stem replaced the backbone's (the PDE stem model refused it: 'weights are for resnet18'); a file for
    another architecture is refused by both."""
    torch.manual_seed(3)
    plain = timm.create_model('resnet18')
    path = tmp_path / 'resnet18.safetensors'
    save_weights(plain, path, architecture='resnet18')
    m = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(m.layer4[1].conv2.weight, plain.layer4[1].conv2.weight)
    assert torch.equal(m.fc.weight, plain.fc.weight)
    assert m.pretrained_load_report['missing'] == [] and m.pretrained_load_report['initialised']
    other = tmp_path / 'other.safetensors'
    save_weights(plain, other, architecture='resnet34')
    with pytest.raises(WeightsError, match=rf"weights are for 'resnet34', not '{model}'"):
        timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))


def test_a_checkpoint_for_another_architecture_is_refused(tmp_path, r18):
    path = _save(tmp_path, r18, metadata={'architecture': 'resnet50'})
    with pytest.raises(WeightsError, match=r"weights are for 'resnet50', not 'gequiv_p4_resnet18'"):
        _stem_model(path)


@pytest.mark.parametrize('case', ['int32', 'nan-stem-conv', 'other-stem-width'])
def test_bad_tensors_are_refused_before_the_stem_is_warm_started(tmp_path, r18, case):
    sd = dict(r18)
    if case == 'int32':
        sd['layer1.0.conv1.weight'] = sd['layer1.0.conv1.weight'].to(torch.int32)
        match = r"wrong dtypes \(1\): \['layer1.0.conv1.weight: file torch.int32"
    elif case == 'nan-stem-conv':
        sd['conv1.weight'] = sd['conv1.weight'] * float('nan')
        match = r"not loadable: bad values \(1\): \['conv1.weight: \d+ NaN / inf"
    else:
        sd['conv1.weight'] = sd['conv1.weight'][:32]
        match = r"stem conv conv1.weight \(torch.float32, \(32, 3, 7, 7\)\) is not a floating \[64, C_in, k, k\]"
    with pytest.raises(WeightsError, match=match):
        _stem_model(_save(tmp_path, sd))


def test_load_backbone_checkpoint_is_strict_and_pickle_free(tmp_path, r18, r34_file):
    model = inject_equivariant_stem('resnet18', 'p4', num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a pickle is refused by name, with the fix, before anything is read
    pth = tmp_path / 'resnet18.pth'
    pth.write_bytes(b'never read')
    with pytest.raises(WeightsError, match=r"resnet18.pth: not a .safetensors file.*safetensors.torch.save_file"
                                           r"\(state_dict, 'resnet18.safetensors'\)"):
        load_backbone_checkpoint(model, pth)
    # another backbone: refused, nothing copied (not even the warm-started stem)
    with pytest.raises(WeightsError, match=r'resnet34.safetensors: does not fit ResNet: unexpected keys \(\d+\)'):
        load_backbone_checkpoint(model, r34_file[1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), 'half-loaded'
    # its own backbone with a 10-class head: the head keeps its init (num_classes differs from the cfg's)
    rep = load_backbone_checkpoint(model, _save(tmp_path, r18))
    own = model.state_dict()
    assert torch.equal(own['layer2.0.conv1.weight'], r18['layer2.0.conv1.weight'])
    assert torch.equal(own['fc.weight'], before['fc.weight'])
    assert not torch.equal(own['conv1.lift.weight'], before['conv1.lift.weight'])  # warm-started
    assert rep['missing'] == []
    # partial, on request
    rep = load_backbone_checkpoint(model, r34_file[1], strict=False)
    assert any(k.startswith('layer3.5.') for k in rep['not_loaded'])
