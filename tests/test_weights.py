"""The shipped checkpoints (weights/manifest.json): every file is there, intact, small, loads through
``timm.create_model(name.tag, pretrained=True)`` with no network, and reproduces its manifest metric when
``hub.check_entry`` re-measures it on the held-out split of the data set its recipe names (the data-set catalog
fixes task and metric; the manifest names no code). Also: the catalog and the manifest agree, and the model cards
in weights/cards are current.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import gequiv_timm  # noqa: F401
import timm
from gequiv_timm import hub, registry
from gequiv_timm._resources import weights_dir

MANIFEST = registry.load_manifest()
SHIPPED = sorted(k for k, e in MANIFEST.items() if e.get('file'))
REQUIRED = ('file', 'sha256', 'size', 'metrics', 'recipe', 'command')
MAX_BYTES = 2 * 1024 * 1024  # small enough to ship in the wheel


def test_manifest_and_catalog_agree():
    cat = registry.catalog()
    for key, entry in MANIFEST.items():
        name, _, tag = key.partition('.')
        assert name in cat, f"manifest entry {key}: {name} is not in the catalog"
        assert tag in cat[name].tags, f"manifest entry {key}: the catalog entry {name} has no tag {tag!r}"
        # the repo is derived once (registry.hub_id), stored nowhere else
        assert 'hf_hub_id' not in entry and 'hf_hub_id' not in cat[name].tags[tag], key
        assert timm.models.get_pretrained_cfg(key).hf_hub_id == registry.hub_id(key) == f'gequiv-timm/{key}'
        assert hub.default_repo(key) == registry.hub_id(key)
    # a tag that loads someone else's checkpoint (a stem model's backbone on timm's repo) is not ours to push to
    assert hub.default_repo('gequiv_p4_resnet18.a1_in1k') is None
    # every shipped file is listed, and every listed file ships
    on_disk = {p.name for p in weights_dir().glob('*.safetensors')}
    listed = {MANIFEST[k]['file'] for k in SHIPPED}
    assert on_disk == listed, f"weights/ files {sorted(on_disk)} vs manifest files {sorted(listed)}"


@pytest.mark.parametrize('key', SHIPPED)
def test_entry_is_complete_and_file_intact(key):
    entry = MANIFEST[key]
    missing = [f for f in REQUIRED if not entry.get(f)]
    assert not missing, f"manifest entry {key} lacks {missing}"
    assert 'seed' in entry['metrics'], f"{key}: metrics must record the seed"
    assert entry.get('budget') or 'epochs' in entry['metrics'], f"{key}: metrics must record the budget"
    assert entry['size'] <= MAX_BYTES, f"{key}: {entry['size']} bytes is too large to ship in the wheel"
    res = hub.check_entry(key, entry)  # size, sha256, metadata
    assert res['file'].endswith(entry['file'])


@pytest.mark.parametrize('key', SHIPPED)
def test_pretrained_true_loads_the_embedded_file_and_reproduces_the_metric(key, monkeypatch):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError(f'{key}: pretrained=True must use the shipped file, not the network')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_download)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_download)
    entry = MANIFEST[key]
    model = timm.create_model(key, pretrained=True).eval()
    state = load_file(str(weights_dir() / entry['file']))
    own = model.state_dict()
    assert own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)
    # re-measured on the held-out split; check_entry compares within noise (2 examples of n
    # for an error rate: the same weights on the same split differ only by float rounding at the argmax)
    res = hub.check_entry(key, entry, metrics=True)
    assert res['measured'], f"{key}: nothing was re-measured"


@pytest.mark.parametrize('key', SHIPPED)
def test_model_card_is_current(key):
    path = hub.card_path(key)
    assert path.is_file(), f"{path} is missing: run `gequiv-timm check --write-cards`"
    assert path.read_text(encoding='utf-8') == hub.render_card(key), \
        f"{path} is stale (the manifest or catalog changed): run `gequiv-timm check --write-cards`"


def test_check_entry_catches_a_metric_that_does_not_reproduce(tmp_path, monkeypatch):
    """The comparison itself can fail: a manifest that claims a better error than the file gives."""
    monkeypatch.setattr(hub, 'measure_checkpoint', _fake_measure)
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4cnn').eval()
    info = hub.save_weights(model, tmp_path / 'w.safetensors', 'gequiv_p4cnn', 'rotmnist', 'rotmnist/untrained')
    entry = {'file': 'w.safetensors', 'sha256': info['sha256'], 'size': info['size'],
             'metrics': {'test_error': 0.01, 'seed': 0}, 'recipe': 'rotmnist/untrained'}
    with pytest.raises(hub.WeightsError, match=r'test_error: measured 0\.5, manifest 0\.01'):
        hub.check_entry('gequiv_p4cnn.rotmnist', entry, folder=tmp_path, metrics=True)
    entry['metrics']['test_error'] = 0.5005  # within 2 / 1000
    assert hub.check_entry('gequiv_p4cnn.rotmnist', entry, folder=tmp_path, metrics=True)['measured']['n'] == 1000


def _fake_measure(model, entry):
    # a stand-in measurement (this test checks the comparison, not the measurement)
    return {'test_error': 0.5, 'n': 1000}


def test_check_entry_runs_no_code_the_manifest_names(tmp_path, monkeypatch):
    """The manifest is data: an 'evaluator' naming a module is refused by name (never imported), before any model
    is built; a recipe without a built-in data set cannot be re-measured (one clear error)."""
    import sys
    monkeypatch.setattr(hub, 'measure_checkpoint', _fake_measure)
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4cnn').eval()
    info = hub.save_weights(model, tmp_path / 'w.safetensors', 'gequiv_p4cnn', 'rotmnist', 'rotmnist/untrained')
    entry = {'file': 'w.safetensors', 'sha256': info['sha256'], 'size': info['size'],
             'metrics': {'test_error': 0.5, 'seed': 0}, 'recipe': 'rotmnist/untrained', 'evaluator': 'antigravity:fly'}
    built = []
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: built.append(a))
    with pytest.raises(hub.WeightsError, match="entry gequiv_p4cnn.rotmnist: field 'evaluator' is not allowed"):
        hub.check_entry('gequiv_p4cnn.rotmnist', entry, folder=tmp_path, metrics=True)
    assert 'antigravity' not in sys.modules and not built
    monkeypatch.undo()
    monkeypatch.setattr(hub, 'measure_checkpoint', _fake_measure)
    del entry['evaluator']
    entry['recipe'] = 'imagefolder/adamw'
    with pytest.raises(hub.WeightsError, match="recipe 'imagefolder/adamw' names no built-in data set"):
        hub.check_entry('gequiv_p4cnn.rotmnist', entry, folder=tmp_path, metrics=True)
    for e in MANIFEST.values():
        assert 'evaluator' not in e
