"""What is verified is what is loaded, whatever the Hub does: a flaky server (404 / 500 on a later request for a
file), a corrupting one (altered bytes under the original ETag), a repo the manifest lists serving other bytes, an
offline or unreachable Hub, a cache without symlinks. The real ``huggingface_hub`` client and timm's real loader
talk to the local stand-in (tests/hub_standin.py, bound to 127.0.0.1) through the endpoint constants.

Each test would fail on the code before issue 15: timm downloaded ``model.safetensors`` a second time, fell back to
``pytorch_model.bin`` on a 404 and unpickled it; ``hf-hub:`` repos (even the manifest's own) were not checked
against any checksum; an offline Hub was reported as "the repo has no model.safetensors".
"""
from __future__ import annotations

import io
import json
import socket
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import gequiv_timm  # noqa: F401
import timm
from gequiv_timm import hub, registry
from gequiv_timm.weights import ChecksumError, WeightsError

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn  # noqa: E402

NAME, TAG = 'gequiv_p4cnn', 'rotmnist'
OURS = registry.hub_id(f'{NAME}.{TAG}')  # gequiv-timm/gequiv_p4cnn.rotmnist


def _weights(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = timm.create_model(NAME).eval()
    buf = io.BytesIO()
    from safetensors.torch import save
    meta = {'format': 'pt', 'architecture': NAME, 'tag': TAG, 'gequiv_timm_version': gequiv_timm.__version__}
    buf.write(save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=meta))
    return model, buf.getvalue()


@pytest.fixture(scope='module')
def server():
    with HubStandIn(token='t', max_lifetime=600, idle_timeout=300) as s:
        yield s


@pytest.fixture(scope='module')
def ckpts():
    a, a_bytes = _weights(0)
    b, b_bytes = _weights(1)
    zeros = io.BytesIO()
    torch.save({k: torch.zeros_like(v) for k, v in a.state_dict().items()}, zeros)  # the pickle timm fell back to
    config = json.dumps(hub.build_config(a, NAME, TAG)).encode()
    return dict(model=a, bytes=a_bytes, other=b, other_bytes=b_bytes, pickle=zeros.getvalue(), config=config)


@pytest.fixture
def at_server(server, monkeypatch):
    """The client talks to the stand-in; huggingface_hub's retry back-off does not sleep."""
    import huggingface_hub.constants as C
    from huggingface_hub.utils import _http
    monkeypatch.setattr(C, 'ENDPOINT', server.url)
    monkeypatch.setattr(C, 'HUGGINGFACE_CO_URL_TEMPLATE', server.url + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', False)
    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith('_')})
    fast.sleep = lambda s: None
    monkeypatch.setattr(_http, 'time', fast)
    return server


@pytest.fixture
def no_unpickling(monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError('something tried to unpickle')
    for mod, attr in ((torch, 'load'), (torch.serialization, 'load'), (pickle, 'load'), (pickle, 'loads')):
        monkeypatch.setattr(mod, attr, refuse)


@pytest.fixture
def tag_from_hub(ckpts, monkeypatch):
    """This installation's manifest lists gequiv_p4cnn.rotmnist with ``ckpts['bytes']``' sha256 but ships no file:
    ``pretrained=True`` on the tag downloads from its repo (registry.hub_id)."""
    import hashlib
    from timm.models import _registry
    entry = {'file': f'{NAME}.{TAG}.safetensors', 'sha256': hashlib.sha256(ckpts['bytes']).hexdigest(),
             'size': len(ckpts['bytes']), 'metrics': {}, 'recipe': 'rotmnist/untrained'}
    monkeypatch.setattr(registry, '_MANIFEST', {f'{NAME}.{TAG}': entry})
    monkeypatch.setattr(registry, '_MANIFEST_ERROR', None)
    monkeypatch.setattr(_registry._model_pretrained_cfgs[f'{NAME}.{TAG}'], 'file', None)
    return entry


def _same(model, ref) -> bool:
    a, b = model.state_dict(), ref.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _requests(server, repo, since=0):
    return [(m, p.split('/resolve/main/', 1)[-1]) for m, p, *_ in server.log[since:] if p.startswith(f'/{repo}/')]


# ----- a flaky server: the verified bytes are loaded once, never a pickle ----------------------------------------
@pytest.mark.parametrize('status', [404, 500])
def test_flaky_hub_never_falls_back_to_a_pickle(at_server, ckpts, tmp_path, no_unpickling, status):
    repo = f'org/flaky{status}'
    at_server.seed(repo, {'config.json': ckpts['config'], 'model.safetensors': ckpts['bytes'],
                          'pytorch_model.bin': ckpts['pickle']})
    at_server.flaky[f'{repo}/model.safetensors'] = (2, status)  # HEAD + GET served, every later request fails
    n = len(at_server.log)
    model = timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'c')
    assert _same(model, ckpts['model'])
    reqs = _requests(at_server, repo, n)
    assert not any('pytorch_model.bin' in p for _, p in reqs), reqs
    assert [r for r in reqs if r[1] == 'model.safetensors'] == [('HEAD', 'model.safetensors'),
                                                                  ('GET', 'model.safetensors')]
    assert model.pretrained_cfg['source'] == 'hf-hub' and model.pretrained_cfg['hf_hub_id'] == repo
    assert 'file' not in model.pretrained_cfg  # the cfg reads as timm resolved it


def test_tag_from_flaky_hub_loads_verified_bytes(at_server, ckpts, tag_from_hub, tmp_path, no_unpickling):
    at_server.seed(OURS, {'config.json': ckpts['config'], 'model.safetensors': ckpts['bytes'],
                          'pytorch_model.bin': ckpts['pickle']})
    at_server.flaky[f'{OURS}/model.safetensors'] = (2, 404)
    try:
        model = timm.create_model(f'{NAME}.{TAG}', pretrained=True, cache_dir=tmp_path / 'c')
    finally:
        del at_server.flaky[f'{OURS}/model.safetensors']
    assert _same(model, ckpts['model'])
    assert model.pretrained_cfg['hf_hub_id'] == OURS and 'file' not in model.pretrained_cfg


# ----- a corrupting server: the Hub's sha256 for other repos, the manifest's for ours ----------------------------
def test_corrupted_bytes_under_the_original_etag_are_refused(at_server, ckpts, tmp_path, monkeypatch):
    import hashlib
    repo = 'org/corrupt'
    at_server.seed(repo, {'config.json': ckpts['config'], 'model.safetensors': ckpts['bytes']})
    at_server.corrupt.add(f'{repo}/model.safetensors')
    sha = hashlib.sha256(ckpts['bytes']).hexdigest()
    with pytest.raises(ChecksumError, match=rf'models--org--corrupt/.*/model\.safetensors: sha256 \w+ does not match '
                                            rf'{sha}, the sha256 its source reports for hf-hub:{repo}'):
        timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'c')
    # offline, the cache still holds the altered bytes under the Hub's sha256: refused again, no request made
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
    n = len(at_server.log)
    with pytest.raises(ChecksumError, match='the sha256 its source reports'):
        timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'c')
    assert len(at_server.log) == n
    # the intact bytes of the same repo load
    at_server.corrupt.discard(f'{repo}/model.safetensors')
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', False)
    assert _same(timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'fresh'), ckpts['model'])


@pytest.mark.parametrize('how', ['hf-hub', 'tag'])
def test_a_repo_the_manifest_lists_must_serve_the_manifest_bytes(at_server, ckpts, tag_from_hub, tmp_path, how):
    """Consistent, well-formed bytes that are not the manifest's (a republished repo, a substituted file) are
    refused whichever way the repo is reached: the model card's own `hf-hub:` line and the tag's default."""
    def load(cache):
        if how == 'hf-hub':
            return timm.create_model(f'hf-hub:{OURS}', pretrained=True, cache_dir=cache)
        return timm.create_model(f'{NAME}.{TAG}', pretrained=True, cache_dir=cache)

    at_server.seed(OURS, {'config.json': ckpts['config'], 'model.safetensors': ckpts['other_bytes']})
    with pytest.raises(ChecksumError, match=rf"sha256 .* does not match the manifest's {tag_from_hub['sha256']} for "
                                            rf"{NAME}.{TAG}, served by hf-hub:{OURS}"):
        load(tmp_path / 'a')
    at_server.seed(OURS, {'model.safetensors': ckpts['bytes']})
    assert _same(load(tmp_path / 'b'), ckpts['model'])
    at_server.corrupt.add(f'{OURS}/model.safetensors')
    try:
        with pytest.raises(ChecksumError, match="does not match the manifest's"):
            load(tmp_path / 'c')
    finally:
        at_server.corrupt.discard(f'{OURS}/model.safetensors')


# ----- offline / unreachable: said as such, with the local way out ----------------------------------------------
def _closed_port() -> int:
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize('how', ['offline', 'closed-port'])
def test_offline_or_unreachable_hub_is_named_with_the_local_way_out(at_server, tag_from_hub, tmp_path,
                                                                     monkeypatch, how):
    import huggingface_hub.constants as C
    if how == 'offline':
        monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
        why = r'offline mode is on \(HF_HUB_OFFLINE\)'
    else:
        url = f'http://127.0.0.1:{_closed_port()}'
        monkeypatch.setattr(C, 'ENDPOINT', url)
        monkeypatch.setattr(C, 'HUGGINGFACE_CO_URL_TEMPLATE', url + '/{repo_id}/resolve/{revision}/{filename}')
        why = rf'the Hub at {url} is unreachable \(ConnectError'
    with pytest.raises(WeightsError, match=rf"hf-hub:{OURS}: cannot download model.safetensors: {why}.*not in the "
                                           rf"local cache.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model(f'{NAME}.{TAG}', pretrained=True, cache_dir=tmp_path / 'empty')


def test_offline_with_a_warm_cache_loads_verified_bytes(at_server, ckpts, tag_from_hub, tmp_path, monkeypatch):
    at_server.seed(OURS, {'config.json': ckpts['config'], 'model.safetensors': ckpts['bytes']})
    timm.create_model(f'{NAME}.{TAG}', pretrained=True, cache_dir=tmp_path / 'c')
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
    n = len(at_server.log)
    assert _same(timm.create_model(f'{NAME}.{TAG}', pretrained=True, cache_dir=tmp_path / 'c'), ckpts['model'])
    assert len(at_server.log) == n


# ----- a cache without symlinks: the Hub is asked for the checksum --------------------------------------------
def test_cache_without_symlinks_asks_the_hub_for_the_checksum(at_server, ckpts, tmp_path, monkeypatch):
    from huggingface_hub import file_download
    monkeypatch.setattr(file_download, 'are_symlinks_supported', lambda *a, **k: False)
    repo = 'org/nolinks'
    at_server.seed(repo, {'config.json': ckpts['config'], 'model.safetensors': ckpts['bytes']})
    model = timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'c')
    assert _same(model, ckpts['model'])
    snap = next((tmp_path / 'c').glob('models--org--nolinks/snapshots/*/model.safetensors'))
    assert not snap.is_symlink()
    at_server.corrupt.add(f'{repo}/model.safetensors')
    try:
        with pytest.raises(ChecksumError, match='the sha256 its source reports'):
            timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'd')
    finally:
        at_server.corrupt.discard(f'{repo}/model.safetensors')
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
    with pytest.raises(WeightsError, match='cannot verify this cached download .* keeps no checksum'):
        timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=tmp_path / 'c')
