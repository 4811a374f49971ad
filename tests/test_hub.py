"""gequiv_timm.hub without a server: the Hub layout timm reads, model cards, and every bad-input path.

Weights here are a seeded, untrained gequiv_p4cnn saved with ``save_weights`` (what ``gequiv-timm train --out``
writes); the shipped checkpoints are tested in test_weights.py, the Hub round trip in test_hub_server.py.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gequiv_timm  # noqa: F401
import timm
from gequiv_timm import hub, registry
from gequiv_timm.cli import main as cli_main
from gequiv_timm.weights import ChecksumError, sha256_file

NAME, TAG = 'gequiv_p4cnn', 'rotmnist'
METRICS = {'test_error': 0.25, 'test_split': 'rotmnist seed 0 (1,000 digits)', 'seed': 0, 'epochs': 3}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(NAME, **kw).eval()


def _sd_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    model = _model()
    # one training step so BN running stats are not at their init values (they must round-trip too)
    model.train()(torch.rand(8, 1, 28, 28)).sum().backward()
    model.eval()
    info = hub.save_weights(model, d / 'p4.safetensors', NAME, TAG, 'rotmnist/adamw-cosine/lr0.003/bs64/ep3/seed0',
                            extra={'metrics': METRICS})
    return model, d / 'p4.safetensors', info


@pytest.fixture(scope='module')
def exported(ckpt, tmp_path_factory):
    model, path, _ = ckpt
    out = tmp_path_factory.mktemp('export')
    res = hub.export(f'{NAME}.{TAG}', out, checkpoint=path, repo_id='someorg/p4cnn-test')
    return model, path, out, res


# ----- the layout timm reads ---------------------------------------------------------------------------------
def test_export_writes_timm_hub_layout(exported):
    model, path, out, res = exported
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == NAME and cfg['num_classes'] == 10 and cfg['num_features'] == 10
    assert cfg['label_names'] == [str(i) for i in range(10)]
    assert cfg['model_args']['group'] == 'p4' and cfg['model_args']['widths'] == [10] * 7
    assert cfg['pretrained_cfg']['input_size'] == [1, 28, 28] and cfg['pretrained_cfg']['tag'] == TAG
    assert 'file' not in cfg['pretrained_cfg'] and 'hf_hub_id' not in cfg['pretrained_cfg']
    # the weights are the given file, byte for byte (the manifest sha256 then names the Hub's bytes too)
    assert (out / 'model.safetensors').read_bytes() == path.read_bytes()
    assert res.sha256 == sha256_file(path)
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, 'weights files must be readable by others (they ship)'
    with safe_open(str(out / 'model.safetensors'), 'pt') as f:
        meta = f.metadata()
    assert meta['architecture'] == NAME and meta['tag'] == TAG and meta['gequiv_timm_version']
    assert meta['recipe'].startswith('rotmnist/') and json.loads(meta['metrics'])['test_error'] == 0.25


def test_export_rewrites_a_bare_checkpoint_with_metadata(ckpt, tmp_path):
    model, _, _ = ckpt
    bare = tmp_path / 'bare.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    hub.export(NAME, tmp_path / 'out', checkpoint=bare)
    meta = hub.read_metadata(tmp_path / 'out' / 'model.safetensors')
    assert meta['architecture'] == NAME and meta['gequiv_timm_version'] == gequiv_timm.__version__
    got = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_local_dir_and_verify_export_reproduce_the_source(exported):
    model, _, out, _ = exported
    assert hub.verify_export(out, model) == 0.0
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert _sd_equal(model, reloaded)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), reloaded(x))
    # another network (different init) is told apart
    with pytest.raises(hub.WeightsError, match='differ'):
        hub.verify_export(out, _model(seed=1))


def test_model_card_has_metrics_recipe_usage_citation_licence(exported):
    _, _, out, res = exported
    card = (out / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: timm\nlicense: apache-2.0\n')
    assert '| test_error | 0.25 |' in card
    assert 'rotmnist/adamw-cosine/lr0.003/bs64/ep3/seed0' in card
    assert "timm.create_model('hf-hub:someorg/p4cnn-test', pretrained=True)" in card
    assert f"timm.create_model('{NAME}.{TAG}', pretrained=True)" in card
    assert '@inproceedings{cohen2016group' in card and 'Group Equivariant Convolutional Networks' in card
    assert '## Licence' in card and res.sha256 in card
    # the front matter parses as the Hub's model-card metadata
    from huggingface_hub import ModelCard
    meta = ModelCard(card).data.to_dict()
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert meta['pipeline_tag'] == 'image-classification' and 'timm' in meta['tags']


def test_card_usage_code_runs(exported):
    _, _, out, _ = exported
    card = (out / 'README.md').read_text()
    code = card.split('```python\n', 1)[1].split('```', 1)[0]
    code = code.replace("'hf-hub:someorg/p4cnn-test'", repr(f'local-dir:{out}'))
    scope = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    assert scope['probs'].shape == (1, 10) and torch.allclose(scope['probs'].sum(), torch.tensor(1.0))


def test_cli_export_and_dry_run_push(ckpt, tmp_path, capsys, monkeypatch):
    _, path, _ = ckpt
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError('a dry run must not contact the Hub')
    monkeypatch.setattr(huggingface_hub, 'HfApi', no_hub)
    assert cli_main(['export', f'{NAME}.{TAG}', str(tmp_path / 'e'), '--checkpoint', str(path)]) == 0
    assert (tmp_path / 'e' / 'model.safetensors').read_bytes() == path.read_bytes()
    # a dry run exports and verifies, and talks to nobody
    rc = cli_main(['push', f'{NAME}.{TAG}', '--repo', 'o/n', '--dry-run', '--checkpoint', str(path),
                   '--export-dir', str(tmp_path / 'd')])
    assert rc == 0
    assert 'dry run: would create repo o/n' in capsys.readouterr().out
    assert (tmp_path / 'd' / 'README.md').is_file()


def test_cli_export_without_weights_says_what_to_do(tmp_path, capsys):
    assert cli_main(['export', NAME, str(tmp_path / 'e')]) == 2  # refused before any work (cli exit codes)
    assert 'nothing to export' in capsys.readouterr().err


# ----- bad input -------------------------------------------------------------------------------------------------
def _create_from(path, **kw):
    return timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay={'file': str(path)}, **kw)


def test_truncated_file_is_named(ckpt, tmp_path):
    _, path, _ = ckpt
    data = path.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 1):
        bad = tmp_path / f'cut{cut}.safetensors'
        bad.write_bytes(data[:cut])
        with pytest.raises(hub.WeightsError, match=f'{bad}.*truncated or corrupted'):
            _create_from(bad)
        model = _model(seed=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(hub.WeightsError, match=str(bad)):
            hub.load_weights(model, bad)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_corrupted_header_is_named(ckpt, tmp_path):
    _, path, _ = ckpt
    data = bytearray(path.read_bytes())
    data[8:20] = b'#' * 12  # the JSON header
    bad = tmp_path / 'hdr.safetensors'
    bad.write_bytes(bytes(data))
    with pytest.raises(hub.WeightsError, match=str(bad)):
        _create_from(bad)


def test_flipped_bytes_fail_the_checksum(ckpt, tmp_path, monkeypatch):
    """A shipped file whose bytes changed after the manifest was written: ChecksumError naming it."""
    _, path, info = ckpt
    shipped = tmp_path / 'gequiv_p4cnn.rotmnist.safetensors'
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: still a readable safetensors file
    shipped.write_bytes(bytes(data))
    entry = {'file': shipped.name, 'sha256': info['sha256'], 'size': info['size'], 'metrics': METRICS}
    monkeypatch.setattr(registry, '_MANIFEST', {f'{NAME}.{TAG}': entry})
    from timm.models import _registry
    monkeypatch.setattr(_registry._model_pretrained_cfgs[f'{NAME}.{TAG}'], 'file', str(shipped))
    with pytest.raises(ChecksumError, match=f"{shipped}: sha256 .* does not match the manifest's {info['sha256']}"):
        timm.create_model(f'{NAME}.{TAG}', pretrained=True)
    with pytest.raises(ChecksumError, match=str(shipped)):
        hub.check_entry(f'{NAME}.{TAG}', entry, folder=tmp_path)
    # the intact bytes load through the same path (the embedded default)
    shutil.copyfile(path, shipped)
    model = timm.create_model(f'{NAME}.{TAG}', pretrained=True).eval()
    assert _sd_equal(model, ckpt[0])
    assert hub.check_entry(f'{NAME}.{TAG}', entry, folder=tmp_path)['file'] == str(shipped)


def test_checkpoint_for_another_architecture(ckpt, tmp_path):
    _, path, _ = ckpt
    with pytest.raises(hub.WeightsError, match=f"{path}: weights are for 'gequiv_p4cnn', not 'gequiv_p4mcnn'"):
        timm.create_model('gequiv_p4mcnn', pretrained=True, pretrained_cfg_overlay={'file': str(path)})
    with pytest.raises(hub.WeightsError, match='weights are for'):
        hub.export('gequiv_z2cnn', tmp_path / 'o', checkpoint=path)
    assert not (tmp_path / 'o' / 'model.safetensors').exists()


def test_missing_unexpected_and_wrong_shape_keys_are_named(ckpt, tmp_path):
    model, _, _ = ckpt
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing = dict(sd)
    del missing['stages.3.conv.weight']
    extra = dict(sd, **{'stages.9.conv.weight': torch.zeros(1)})
    wrong = dict(sd, **{'stages.2.conv.weight': torch.zeros(10, 10, 4, 5, 5)})
    cases = [(missing, r"missing keys \(1\): \['stages.3.conv.weight'\]"),
             (extra, r"unexpected keys \(1\): \['stages.9.conv.weight'\]"),
             (wrong, r"wrong shapes \(1\): \['stages.2.conv.weight: file \(10, 10, 4, 5, 5\) vs model "
                     r"\(10, 10, 4, 3, 3\)'\]")]
    for i, (state, msg) in enumerate(cases):
        f = tmp_path / f'case{i}.safetensors'
        save_file(state, str(f), metadata={'architecture': NAME})
        with pytest.raises(hub.WeightsError, match=f'{f}: does not fit GroupCNN: {msg}') as e:
            _create_from(f)
        # a partial load is named as the way out only where it would load (keys, not shapes)
        assert ('pretrained_strict=False' in str(e.value)) == (i < 2)
        target = _model(seed=5)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(hub.WeightsError, match=msg):
            hub.load_weights(target, f)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), 'half-loaded'


def test_adapted_heads_and_features_still_load(ckpt):
    """num_classes / features_only drop the classifier as timm does; everything else must still match."""
    model, path, _ = ckpt
    m5 = _create_from(path, num_classes=5)
    assert m5.get_classifier().out_features == 5
    assert torch.equal(m5.state_dict()['stages.6.conv.weight'], model.state_dict()['stages.6.conv.weight'])
    feats = _create_from(path, features_only=True)
    assert len(feats(torch.rand(1, 1, 28, 28))) >= 1


def test_pickle_is_refused(ckpt, tmp_path):
    model, _, _ = ckpt
    f = tmp_path / 'model.pth'
    f.write_bytes(b'not read')
    with pytest.raises(hub.WeightsError, match='safetensors only'):
        _create_from(f)
    d = tmp_path / 'dir'
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(hub.build_config(model, NAME, TAG)))
    (d / 'pytorch_model.bin').write_bytes(b'not read either')
    with pytest.raises(hub.WeightsError, match='no model.safetensors'):
        timm.create_model(f'local-dir:{d}', pretrained=True)


def test_keypoint_model_exports_and_reloads(tmp_path):
    """A heatmap model gets timm's config.json (its num_features: the trunk width the headless model pools) and a
    keypoint-detection card."""
    torch.manual_seed(0)
    model = timm.create_model('gequiv_rcn_paper').eval()
    hub.save_weights(model, tmp_path / 'k.safetensors', 'gequiv_rcn_paper', '', 'landmarks/test')
    hub.export('gequiv_rcn_paper', tmp_path / 'out', checkpoint=tmp_path / 'k.safetensors')
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert cfg['architecture'] == 'gequiv_rcn_paper' and cfg['num_features'] == getattr(model, 'num_features', None)
    assert 'label_names' not in cfg
    assert 'pipeline_tag: keypoint-detection' in (tmp_path / 'out' / 'README.md').read_text()
    assert hub.verify_export(tmp_path / 'out', model) == 0.0


def test_fine_tuned_head_exports_with_its_model_args(tmp_path, capsys):
    """A checkpoint trained with num_classes=7: refused against the catalog default, exported with --model-arg,
    and the exported folder rebuilds the 7-class network by itself."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=7).eval()
    hub.save_weights(model, tmp_path / 'ft.safetensors', NAME, 'ft', 'folder/adamw')
    assert cli_main(['export', NAME, str(tmp_path / 'a'), '--checkpoint', str(tmp_path / 'ft.safetensors')]) == 2
    assert "head.fc.weight: file (7, 10) vs model (10, 10)" in capsys.readouterr().err
    assert cli_main(['export', NAME, str(tmp_path / 'b'), '--checkpoint', str(tmp_path / 'ft.safetensors'),
                     '--model-arg', 'num_classes=7']) == 0
    cfg = json.loads((tmp_path / 'b' / 'config.json').read_text())
    assert cfg['num_classes'] == 7 and cfg['model_args']['num_classes'] == 7 and cfg['model_args']['group'] == 'p4'
    assert hub.verify_export(tmp_path / 'b', model) == 0.0
