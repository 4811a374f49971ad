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
    info = W.save_weights(src, tmp_path / 'a' / 'w.safetensors', 'toy', tag='t', recipe='r',
                          extra={'metrics': {'x': 1}})
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
    with pytest.raises(W.WeightsError,
                       match=r"bad: .*wrong dtypes \(1\): \['1\.num_batches_tracked: file torch\.float32"):
        W.check_state_dict(bad, _net(1), 'bad')


# the dtype policy (weights.DTYPE_POLICY), one case per class: precisions of the same kind load (cast), other kinds
# and bad values are refused, by load_weights and check_state_dict alike, before anything is copied
_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize('dtype', _FLOATS, ids=str)
def test_float_precisions_load_cast_to_the_model_dtype(tmp_path, dtype):
    src = _net(0)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in src.state_dict().items()}
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / 'w.safetensors'))
    dst = _net(1)
    assert W.load_weights(dst, tmp_path / 'w.safetensors') == ([], [])
    for k, v in dst.state_dict().items():
        assert v.dtype == src.state_dict()[k].dtype, k  # the model keeps its dtype
        assert torch.equal(v, state[k].to(v.dtype)), k   # holding the file's values, cast


def _refused(name, make, match):
    return pytest.param(make, match, id=name)


_BAD = [
    _refused('int32-weights', lambda s: {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in s.items()},
             r"wrong dtypes \(\d+\): \['0\.bias: file torch\.int32 vs model torch\.float32'"),
    _refused('bool-weights', lambda s: {k: v.bool() if v.is_floating_point() else v for k, v in s.items()},
             r"wrong dtypes .*file torch\.bool vs model torch\.float32"),
    _refused('complex-weight', lambda s: dict(s, **{'0.weight': s['0.weight'].to(torch.complex64)}),
             r"wrong dtypes \(1\): \['0\.weight: file torch\.complex64"),
    _refused('float-counter', lambda s: dict(s, **{'1.num_batches_tracked': s['1.num_batches_tracked'].double()}),
             r"wrong dtypes \(1\): \['1\.num_batches_tracked: file torch\.float64 vs model torch\.int64"),
    _refused('nan', lambda s: dict(s, **{'0.weight': s['0.weight'].index_fill(0, torch.tensor([0]), float('nan'))}),
             r"bad values \(1\): \['0\.weight: 9 NaN / inf value\(s\)'\]"),
    _refused('inf', lambda s: dict(s, **{'1.running_var': s['1.running_var'] + float('inf')}),
             r"bad values \(1\): \['1\.running_var: 3 NaN / inf"),
    _refused('float64-overflow', lambda s: dict(s, **{'0.bias': s['0.bias'].double() * 1e300}),
             r"bad values \(1\): \['0\.bias: values up to .*e\+\d+ overflow torch\.float32"),
]


@pytest.mark.parametrize('make, match', _BAD)
def test_dtype_policy_refuses_before_copying(tmp_path, make, match):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in _net(0).state_dict().items()}
    state['0.bias'] = state['0.bias'] + 1.0  # no zeros: 1e300 * 0 would stay finite
    f = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in make(state).items()}, str(f))
    target = _net(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(W.WeightsError, match=rf"{f}: does not fit Sequential: {match}.*Policy: a floating tensor"):
        W.load_weights(target, f)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), 'half-loaded'
    with pytest.raises(W.WeightsError, match=match):
        W.check_state_dict(make(state), target, 'x', strict=False)  # a partial load refuses them too


def test_integer_buffers_must_fit_the_model_dtype():
    net = nn.Module()
    net.register_buffer('n', torch.zeros(2, dtype=torch.int32))
    W.check_state_dict({'n': torch.tensor([1, 2], dtype=torch.int64)}, net, 'ok')  # fits: cast
    with pytest.raises(W.WeightsError, match=r"bad values \(1\): \['n: values in \[1, 4294967296\] do not fit "
                                             r"torch\.int32'\]"):
        W.check_state_dict({'n': torch.tensor([1, 2 ** 32], dtype=torch.int64)}, net, 'x')


def test_check_finite_names_the_tensors():
    W.check_finite({'a': torch.ones(2), 'n': torch.tensor([3])}, 'f')
    with pytest.raises(W.WeightsError, match=r"f: not loadable: bad values \(1\): \['a: 1 NaN / inf value\(s\)'\]"):
        W.check_finite({'a': torch.tensor([1.0, float('-inf')])}, 'f')


def test_long_key_lists_stay_one_readable_line():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(20)])
    with pytest.raises(W.WeightsError) as e:
        W.check_state_dict({}, net, 'empty')
    msg = str(e.value)
    assert '\n' not in msg and 'missing keys (40): [' in msg and 'and 32 more' in msg


def test_missing_and_unexpected_keys(tmp_path):
    state = dict(_net(0).state_dict())
    state['extra'] = torch.zeros(1)
    del state['0.bias']
    with pytest.raises(W.WeightsError, match=r"unexpected keys \(1\): \['extra'\]; missing keys \(1\): \['0\.bias'\]"
                                            r".*or pass strict=False"):
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


_SHA = 'ab' * 32
_MANIFEST_CASES = [
    pytest.param('{"a.t": ', r'not valid JSON .*truncated or corrupted', id='truncated'),
    pytest.param('\x00\xff garbage', r'not valid JSON', id='garbage'),
    pytest.param('["a.t"]', r'expected a JSON object', id='a-list'),
    pytest.param('{"at": {}}', r"entry 'at': keys must be 'name.tag'", id='key-without-tag'),
    pytest.param('{"a.t": 3}', r'entry a.t: expected an object of fields, got int', id='entry-not-object'),
    pytest.param('{"a.t": {"evaluator": "antigravity:fly"}}', r"entry a.t: field 'evaluator' is not allowed: .*a "
                 r"manifest names no code", id='evaluator'),
    pytest.param('{"a.t": {"hook": "os:system"}}', r"entry a.t: unknown field 'hook'; allowed: \['budget'",
                 id='unknown'),
    pytest.param('{"a.t": {"file": "../../etc/passwd"}}', r"field 'file' must be a file name in the weights folder",
                 id='file-with-path'),
    pytest.param('{"a.t": {"sha256": "xyz"}}', r"field 'sha256' must be 64 lowercase hex digits", id='bad-sha'),
    pytest.param('{"a.t": {"size": "12"}}', r"field 'size' must be a byte count", id='size-string'),
    pytest.param('{"a.t": {"metrics": [1]}}', r"field 'metrics' must be an object", id='metrics-list'),
]


@pytest.mark.parametrize('text, match', _MANIFEST_CASES)
def test_bad_manifest_is_named(tmp_path, text, match):
    m = tmp_path / 'manifest.json'
    m.write_text(text, encoding='latin-1')
    with pytest.raises(W.WeightsError, match=f'{m}: .*{match}'):
        W.read_manifest(m)
    # and it is never overwritten by an update (which reads it first)
    with pytest.raises(W.WeightsError):
        W.update_manifest(m, 'b.t', {'file': 'b'})
    assert m.read_text(encoding='latin-1') == text


def test_manifest_fields_are_a_fixed_table(tmp_path):
    good = {'file': 'x.safetensors', 'sha256': _SHA, 'size': 3, 'metrics': {'test_error': 0.1}, 'recipe': 'r',
            'command': 'c', 'budget': 'b', 'label_names': ['a'], 'converted_from_sha256': _SHA}
    assert set(good) == set(W.MANIFEST_FIELDS)
    W.update_manifest(tmp_path / 'm.json', 'a.t', good)
    assert W.read_manifest(tmp_path / 'm.json') == {'a.t': good}
    # an update with a field outside the table is refused before the file is touched
    before = (tmp_path / 'm.json').read_text()
    with pytest.raises(W.WeightsError, match="field 'evaluator' is not allowed"):
        W.update_manifest(tmp_path / 'm.json', 'b.t', {'file': 'b', 'evaluator': 'x:y'})
    assert (tmp_path / 'm.json').read_text() == before


def test_unreadable_manifest_is_named(tmp_path):
    d = tmp_path / 'manifest.json'
    d.mkdir()
    with pytest.raises(W.WeightsError, match=f'{d}: cannot read the manifest'):
        W.read_manifest(d)


def test_verify_digest_sha256_and_git_id(tmp_path):
    import hashlib
    import shutil
    import subprocess
    f = tmp_path / 'f.bin'
    f.write_bytes(b'some bytes\x00\x01')
    W.verify_digest(f, hashlib.sha256(f.read_bytes()).hexdigest())
    if shutil.which('git'):  # git's own object id, computed by git
        gid = subprocess.run(['git', 'hash-object', str(f)], capture_output=True, text=True, check=True).stdout.strip()
        assert W.git_blob_sha1(f) == gid
    assert W.verify_digest(f, f'"{W.git_blob_sha1(f)}"') == 'git-sha1'  # an ETag header keeps its quotes
    with pytest.raises(W.ChecksumError, match=f'{f}: sha256 .* does not match 0+, the sha256 its source reports'):
        W.verify_digest(f, '0' * 64)
    with pytest.raises(W.ChecksumError, match=f'{f}: git-sha1 .* does not match'):
        W.verify_digest(f, '0' * 40)
    with pytest.raises(W.ChecksumError, match="reports no sha256 or git id"):
        W.verify_digest(f, 'W/"abc"')


def test_old_import_paths_are_the_same_objects():
    from gequiv_timm import hub
    for name in ('save_weights', 'load_weights', 'read_metadata', 'update_manifest', 'WeightsError',
                 'ChecksumError', 'check_state_dict'):
        assert getattr(hub, name) is getattr(W, name), name
