"""Push -> pull -> ``timm.create_model('hf-hub:...')`` end to end, with the real ``huggingface_hub`` client and
timm's real loader, against the local Hub stand-in (tests/hub_standin.py) reached through ``HF_ENDPOINT``.

What stays untested here (the stand-in cannot serve it, see hub_standin.py): the Xet transfer that the client
uses instead of git-LFS when ``hf_xet`` is installed (these tests run the client with ``HF_HUB_DISABLE_XET=1``),
Xet downloads, multipart LFS (files over the Hub's multipart threshold), and the Hub's own server-side rules
(permissions beyond one token, rate limits, YAML validation beyond a closed front matter).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gequiv_timm  # noqa: F401
import timm
from gequiv_timm import hub, registry

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = 'hf_standin_SECRET_9f8e7d'
NAME, TAG = 'gequiv_p4cnn', 'rotmnist'
REPO = 'gequiv-timm/gequiv_p4cnn.rotmnist'  # the tag's hf_hub_id: registry.hub_id('gequiv_p4cnn.rotmnist')


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope='module')
def server():
    with HubStandIn(token=TOKEN, max_lifetime=600, idle_timeout=180) as s:
        yield s


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('w')
    torch.manual_seed(0)
    model = timm.create_model(NAME).eval()
    metrics = {'test_error': 0.9, 'seed': 0, 'test_split': 'rotmnist seed 0 (1,000 digits)'}
    info = hub.save_weights(model, d / f'{NAME}.{TAG}.safetensors', NAME, TAG, 'rotmnist/untrained/seed0',
                            extra={'metrics': metrics})
    return model, d / f'{NAME}.{TAG}.safetensors', info, metrics


@pytest.fixture
def no_xet(monkeypatch):
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_DISABLE_XET', True)
    monkeypatch.setenv('HF_TOKEN', TOKEN)


def _env(tmp: Path, server, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp / 'hf_home'), HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1', PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS='1')
    env.update(extra)
    return env


PULL = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    import timm, gequiv_timm
    from huggingface_hub import hf_hub_download
    out = {}
    if sys.argv[1] == 'push':
        from gequiv_timm.cli import main
        # no --repo: the tag's own repo, registry.hub_id (sys.argv[2])
        out['push_rc'] = main(['push', 'gequiv_p4cnn.rotmnist', '--checkpoint', sys.argv[3]])
        os.environ.pop('HF_TOKEN')  # everything below reads the public repo without a token
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    m = timm.create_model('hf-hub:' + sys.argv[2], pretrained=True).eval()
    out['hub_logits'] = m(x).tolist()
    out['hub_cfg_source'] = m.pretrained_cfg.get('source')
    # the registered tag: no local file in this installation, so its hf_hub_id is used (sha256 checked)
    t = timm.create_model('gequiv_p4cnn.rotmnist', pretrained=True).eval()
    out['tag_logits'] = t(x).tolist()
    f = hf_hub_download(sys.argv[2], 'model.safetensors')
    out['cached_sha256'] = hashlib.sha256(open(f, 'rb').read()).hexdigest()
    out['cached_config'] = json.load(open(hf_hub_download(sys.argv[2], 'config.json')))
    print('RESULT' + json.dumps(out))
''')


def _run(args, env, cwd):
    p = subprocess.run([sys.executable, '-c', PULL, *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith('RESULT')][-1]
    return json.loads(line[len('RESULT'):]), p.stdout + p.stderr


def test_push_pull_offline_round_trip(server, ckpt, tmp_path):
    model, path, info, metrics = ckpt
    # this installation lists the tag in its manifest but does not ship the file: pretrained=True must use the Hub
    wdir = tmp_path / 'weights'
    wdir.mkdir()
    entry = {'file': path.name, 'sha256': info['sha256'], 'size': info['size'], 'metrics': metrics,
             'recipe': 'rotmnist/untrained/seed0'}
    (wdir / 'manifest.json').write_text(json.dumps({f'{NAME}.{TAG}': entry}))
    assert registry.hub_id(f'{NAME}.{TAG}') == REPO
    env = _env(tmp_path, server, HF_TOKEN=TOKEN, GEQUIV_TIMM_WEIGHTS=str(wdir))
    n_before = len(server.log)

    out, text = _run(['push', REPO, str(path)], env, tmp_path)
    assert out['push_rc'] == 0
    assert TOKEN not in text, 'the token must never be printed'
    # one commit with the three files; the weights are the checkpoint's bytes
    commits = server.commits(REPO)
    assert len(commits) == 2 and sorted(commits[-1]['files']) == ['README.md', 'config.json', 'model.safetensors']
    files = server.files(REPO)
    assert files['model.safetensors'] == path.read_bytes()
    assert json.loads(files['config.json'])['architecture'] == NAME
    assert f"hf-hub:{REPO}" in files['README.md'].decode()
    # the real client went through create-repo, preupload, LFS batch + PUT, commit, then resolve for the pull
    calls = [(m, p.split('/')[1] if p.startswith('/api/') else p.rsplit('/', 1)[0]) for m, p, *_ in
             server.log[n_before:]]
    assert ('POST', 'api') in calls and any(m == 'PUT' for m, _ in calls)
    writes = [e for e in server.log[n_before:] if e[0] in ('POST', 'PUT') and e[1] != '/api/validate-yaml']
    assert all(e[2] == 200 for e in writes)
    # pull: byte for byte, and the same network
    assert out['cached_sha256'] == info['sha256']
    assert out['hub_cfg_source'] == 'hf-hub'
    assert out['cached_config']['model_args']['group'] == 'p4'
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    assert torch.equal(torch.tensor(out['hub_logits']), expected)
    assert torch.equal(torch.tensor(out['tag_logits']), expected)

    # offline with the warm cache: the same results and not one request to the server
    n_before = len(server.log)
    env_off = _env(tmp_path, server, HF_HUB_OFFLINE='1', GEQUIV_TIMM_WEIGHTS=str(wdir))
    out_off, _ = _run(['pull', REPO], env_off, tmp_path)
    assert len(server.log) == n_before
    assert out_off['cached_sha256'] == info['sha256']
    assert torch.equal(torch.tensor(out_off['hub_logits']), expected)
    assert torch.equal(torch.tensor(out_off['tag_logits']), expected)


def test_failed_upload_keeps_export_and_retry_succeeds(server, ckpt, tmp_path, no_xet):
    model, path, info, _ = ckpt
    export_dir = tmp_path / 'export'
    server.fail['commit'] = 1
    with pytest.raises(hub.PushError, match=f'kept in {export_dir}.*--export-dir {export_dir}') as e:
        hub.push(f'{NAME}.{TAG}', 'org/retry', checkpoint=path, export_dir=export_dir, endpoint=server.url,
                 log=lambda *a: None)
    assert TOKEN not in str(e.value)
    assert sorted(p.name for p in export_dir.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert (export_dir / 'model.safetensors').read_bytes() == path.read_bytes()
    assert len(server.commits('org/retry')) == 1  # the repo exists, nothing was committed
    res = hub.push(f'{NAME}.{TAG}', 'org/retry', checkpoint=path, export_dir=export_dir, endpoint=server.url,
                   log=lambda *a: None)
    assert res.commit_oid == server.commits('org/retry')[-1]['oid']
    assert server.files('org/retry')['model.safetensors'] == path.read_bytes()


def test_a_temporary_export_is_kept_on_failure(server, ckpt, no_xet):
    _, path, _, _ = ckpt
    server.fail['commit'] = 1
    with pytest.raises(hub.PushError) as e:
        hub.push(f'{NAME}.{TAG}', 'org/tmpkeep', checkpoint=path, endpoint=server.url, log=lambda *a: None)
    kept = Path(str(e.value).split('kept in ', 1)[1].split(';', 1)[0])
    try:
        assert (kept / 'model.safetensors').read_bytes() == path.read_bytes()
    finally:
        import shutil
        shutil.rmtree(kept, ignore_errors=True)


def test_push_without_token_fails_clearly(server, ckpt, no_xet, monkeypatch, tmp_path):
    _, path, _, _ = ckpt
    monkeypatch.delenv('HF_TOKEN')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty_home'))  # no saved login either
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_TOKEN_PATH', str(tmp_path / 'empty_home' / 'token'))
    with pytest.raises(hub.PushError, match='hf auth login.*HF_TOKEN'):
        hub.push(f'{NAME}.{TAG}', 'org/noauth', checkpoint=path, endpoint=server.url, log=lambda *a: None)
    assert 'org/noauth' not in server.repos


def test_private_repo_is_not_readable_without_token(server, ckpt, no_xet, tmp_path):
    _, path, _, _ = ckpt
    hub.push(f'{NAME}.{TAG}', 'org/private', private=True, checkpoint=path, endpoint=server.url,
             log=lambda *a: None)
    assert server.repos['org/private']['private']
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download('org/private', 'config.json', endpoint=server.url, token=False, cache_dir=tmp_path / 'c')
    p = hf_hub_download('org/private', 'model.safetensors', endpoint=server.url, token=TOKEN,
                        cache_dir=tmp_path / 'c')
    assert Path(p).read_bytes() == path.read_bytes()


def test_corrupted_download_is_named_and_nothing_loads(server, ckpt, no_xet, tmp_path, monkeypatch):
    """The Hub serves a truncated model.safetensors under the original sha256: the cached file is named (its sha256
    is not the one the Hub reports), no model comes back."""
    _, path, _, _ = ckpt
    hub.push(f'{NAME}.{TAG}', 'org/broken', checkpoint=path, endpoint=server.url, log=lambda *a: None)
    oid = server.repos['org/broken']['commits'][-1]['files']['model.safetensors'][1]
    server.lfs[oid] = server.lfs[oid][:1000]  # truncated on the server, same etag
    import huggingface_hub.constants as C
    # what HF_ENDPOINT sets at import time, set here for this process
    monkeypatch.setattr(C, 'ENDPOINT', server.url)
    monkeypatch.setattr(C, 'HUGGINGFACE_CO_URL_TEMPLATE', server.url + '/{repo_id}/resolve/{revision}/{filename}')
    with pytest.raises(hub.ChecksumError, match=rf'models--org--broken/snapshots/.*/model\.safetensors: sha256 .* does '
                                                rf'not match {oid}, the sha256 its source reports'):
        timm.create_model('hf-hub:org/broken', pretrained=True, cache_dir=tmp_path / 'cache')


def test_xet_upload_is_where_the_stand_in_stops(server, ckpt, tmp_path, monkeypatch):
    """With hf_xet enabled (the client's default) the real client asks the Hub for a Xet write token after the
    preupload call and then talks to a separate CAS service: that part is not served, so it stays untested. The
    push fails cleanly there, with the export kept and nothing committed."""
    pytest.importorskip('hf_xet')
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_DISABLE_XET', False)
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    _, path, _, _ = ckpt
    n = len(server.log)
    with pytest.raises(hub.PushError, match='xet-write-token'):
        hub.push(f'{NAME}.{TAG}', 'org/xet', checkpoint=path, export_dir=tmp_path / 'e', endpoint=server.url,
                 log=lambda *a: None)
    assert [(m, p) for m, p, *_ in server.log[n:]][-2:] == [
        ('POST', '/api/models/org/xet/preupload/main'), ('GET', '/api/models/org/xet/xet-write-token/main')]
    assert len(server.commits('org/xet')) == 1
    assert (tmp_path / 'e' / 'model.safetensors').read_bytes() == path.read_bytes()


def test_repo_without_safetensors_is_refused(server, ckpt, no_xet, tmp_path, monkeypatch):
    """A repo that only has a pickle checkpoint: refused by name, the pickle is never downloaded."""
    from huggingface_hub import CommitOperationAdd, HfApi
    model, _, _, _ = ckpt
    api = HfApi(endpoint=server.url)
    api.create_repo('org/pickle', exist_ok=True)
    cfg = json.dumps(hub.build_config(model, NAME, TAG)).encode()
    api.create_commit('org/pickle', [CommitOperationAdd('config.json', cfg),
                                     CommitOperationAdd('pytorch_model.bin', b'\x80\x04not-a-real-pickle')],
                      commit_message='pickle only')
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'ENDPOINT', server.url)
    monkeypatch.setattr(C, 'HUGGINGFACE_CO_URL_TEMPLATE', server.url + '/{repo_id}/resolve/{revision}/{filename}')
    n = len(server.log)
    with pytest.raises(hub.WeightsError, match='org/pickle: the repo has no model.safetensors'):
        timm.create_model('hf-hub:org/pickle', pretrained=True, cache_dir=tmp_path / 'cache')
    assert not any('pytorch_model.bin' in p for _, p, *_ in server.log[n:])


def test_stand_in_is_bounded_and_stops_by_itself():
    import urllib.error
    import urllib.request
    with HubStandIn(token='t', max_body=1000, max_lifetime=1.5) as s:
        assert s.url.startswith('http://127.0.0.1:')
        req = urllib.request.Request(s.url + '/api/repos/create', data=b'x' * 5000, method='POST',
                                     headers={'Authorization': 'Bearer t'})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 413
        import time
        time.sleep(2.5)
        with pytest.raises(OSError):
            urllib.request.urlopen(s.url + '/api/models/a/b', timeout=2)
