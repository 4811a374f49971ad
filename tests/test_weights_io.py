"""gequiv_timm.weights on its own: safetensors round trip, the checks before loading, checksums, the manifest's
atomic write. Plain torch modules only (the module knows nothing of our models)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from gequiv_timm import weights as W


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))


def test_round_trip_with_metadata(tmp_path):
    src, dst = _net(0), _net(1)
    info = W.save_weights(src, tmp_path / 'a' / 'w.safetensors', 'toy', tag='t', recipe='r', extra={'metrics': {'x': 1}})
    path = tmp_path / 'a' / 'w.safetensors'
    assert info['file'] == 'w.safetensors' and info['size'] == path.stat().st_size
    assert info['sha256'] == W.sha256_file(path)
    meta = W.read_metadata(path)
    assert meta['architecture'] == 'toy' and meta['tag'] == 't' and json.loads(meta['metrics']) == {'x': 1}
    assert W.load_weights(dst, path, architecture='toy') == ([], [])
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_checks_run_before_anything_is_copied(tmp_path):
    path = tmp_path / 'w.safetensors'
    W.save_weights(_net(0), path, 'toy')
    target = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(W.WeightsError, match=r'w\.safetensors: does not fit Sequential: wrong shapes'):
        W.load_weights(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(W.WeightsError, match="weights are for 'toy', not 'other'"):
        W.load_weights(_net(), path, architecture='other')


def test_dtype_kind_mismatch_fails_precision_does_not(tmp_path):
    state = dict(_net(0).state_dict())
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    assert W.check_state_dict(half, _net(1), 'half') == ([], [])  # precision: load_state_dict casts
    bad = dict(state)
    bad['1.num_batches_tracked'] = bad['1.num_batches_tracked'].float()
    with pytest.raises(W.WeightsError, match=r"bad: .*wrong dtypes \['1\.num_batches_tracked: file torch\.float32"):
        W.check_state_dict(bad, _net(1), 'bad')


def test_missing_and_unexpected_keys(tmp_path):
    state = dict(_net(0).state_dict())
    state['extra'] = torch.zeros(1)
    del state['0.bias']
    with pytest.raises(W.WeightsError, match=r"missing keys \['0\.bias'\]; unexpected keys \['extra'\]"):
        W.check_state_dict(state, _net(1), 'src')
    assert W.check_state_dict(state, _net(1), 'src', strict=False) == (['0.bias'], ['extra'])


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a safetensors file')
    for fn in (W.read_metadata, W.read_state):
        with pytest.raises(W.WeightsError, match=f'{bad}: not a readable safetensors file'):
            fn(bad)
        with pytest.raises(W.WeightsError, match='no such weights file'):
            fn(tmp_path / 'missing.safetensors')


def test_verify_checksum(tmp_path):
    f = tmp_path / 'f.bin'
    f.write_bytes(b'abc')
    W.verify_checksum(f, W.sha256_file(f))
    W.verify_checksum(f, None)  # nothing to compare with
    with pytest.raises(W.ChecksumError, match=f"{f}: sha256 .* does not match the manifest's 00 for x"):
        W.verify_checksum(f, '00', 'x')


def test_manifest_update_is_sorted_and_atomic(tmp_path, monkeypatch):
    m = tmp_path / 'manifest.json'
    assert W.read_manifest(m) == {}
    W.update_manifest(m, 'b.t', {'file': 'b'})
    W.update_manifest(m, 'a.t', {'file': 'a'})
    assert list(W.read_manifest(m)) == ['a.t', 'b.t']
    good = m.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert m.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual mode, not mkstemp's owner-only 0600

    def crash(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match='disk full'):
        W.update_manifest(m, 'c.t', {'file': 'c'})
    assert m.read_text() == good  # the old manifest, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ['manifest.json']  # no temporary left behind


def test_bad_manifest_is_named(tmp_path):
    m = tmp_path / 'manifest.json'
    m.write_text('{"a.t": ')
    with pytest.raises(W.WeightsError, match=f'{m}: not valid JSON'):
        W.read_manifest(m)
    m.write_text('["a.t"]')
    with pytest.raises(W.WeightsError, match='expected a JSON object'):
        W.read_manifest(m)


def test_old_import_paths_are_the_same_objects():
    from gequiv_timm import hub
    for name in ('save_weights', 'load_weights', 'read_metadata', 'update_manifest', 'WeightsError',
                 'ChecksumError', 'check_state_dict'):
        assert getattr(hub, name) is getattr(W, name), name
