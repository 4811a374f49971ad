"""A broken package manifest (truncated, garbage, a field naming code) is a clear error naming the file wherever
it is needed, and breaks nothing else: ``import gequiv_timm`` works, models build, ``gequiv-timm list`` lists them
and says the manifest is broken; pretrained loading of a tag and ``gequiv-timm check`` refuse with the file named,
before any download. Always on a copy of the package's weights folder (``GEQUIV_TIMM_WEIGHTS`` or a patched
``registry.weights_dir``): the real ``weights/manifest.json`` is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gequiv_timm  # noqa: F401
import timm
from gequiv_timm import hub, registry
from gequiv_timm._resources import weights_dir
from gequiv_timm.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {
    'truncated': lambda text: text[:len(text) // 2],
    'garbage': lambda text: '\x00\x01 not json at all',
    'evaluator': lambda text: json.dumps({k: dict(v, evaluator='antigravity:fly')
                                          for k, v in json.loads(text).items()}),
}


def _copy(tmp_path: Path, how: str) -> Path:
    d = tmp_path / 'weights'
    shutil.copytree(weights_dir(), d)
    m = d / 'manifest.json'
    m.write_text(BROKEN[how](m.read_text(encoding='utf-8')), encoding='utf-8')
    return m


@pytest.fixture
def broken(tmp_path, monkeypatch, request):
    m = _copy(tmp_path, request.param)
    monkeypatch.setattr(registry, 'weights_dir', lambda: m.parent)
    monkeypatch.setattr(registry, '_MANIFEST', None)
    monkeypatch.setattr(registry, '_MANIFEST_ERROR', None)
    return m


@pytest.mark.parametrize('broken', list(BROKEN), indirect=True)
def test_a_broken_manifest_is_named_where_it_is_needed(broken, monkeypatch):
    assert str(broken) in registry.manifest_problem()
    assert registry.manifest(strict=False) == {}
    timm.create_model('gequiv_p4cnn')  # building needs no manifest
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError('nothing may be downloaded while the manifest is broken')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_download)
    for call in (lambda: timm.create_model('gequiv_p4cnn.rotmnist', pretrained=True),
                 lambda: registry.manifest(),
                 lambda: hub.export('gequiv_p4cnn.rotmnist', broken.parent / 'out'),
                 lambda: registry.hub_repos()):
        with pytest.raises(WeightsError, match=rf'{broken}: '):
            call()


def test_import_list_and_check_with_a_truncated_package_manifest(tmp_path):
    m = _copy(tmp_path, 'truncated')
    code = ('import contextlib, io, json, timm, gequiv_timm\n'
            'from gequiv_timm import registry\n'
            'from gequiv_timm.cli import main\n'
            'out = {"problem": registry.manifest_problem(), "n_models": len(timm.list_models("gequiv_*"))}\n'
            'timm.create_model("gequiv_p4cnn")\n'
            'try:\n'
            '    timm.create_model("gequiv_p4cnn.rotmnist", pretrained=True)\n'
            'except Exception as e:\n'
            '    out["pretrained"] = f"{type(e).__name__}: {e}"\n'
            'for cmd in ("list", "check"):\n'
            '    o, e = io.StringIO(), io.StringIO()\n'
            '    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):\n'
            '        rc = main([cmd])\n'
            '    out[cmd] = [rc, o.getvalue(), e.getvalue()]\n'
            'print("RESULT" + json.dumps(out))\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'GEQUIV_TIMM_'))}
    env.update(GEQUIV_TIMM_WEIGHTS=str(m.parent), HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1',
               HF_HOME=str(tmp_path / 'hf'))
    p = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('RESULT')][-1][len('RESULT'):])
    assert str(m) in out['problem'] and 'not valid JSON' in out['problem']
    assert out['n_models'] > 20
    assert out['pretrained'].startswith(f'WeightsError: {m}: not valid JSON')
    rc, stdout, stderr = out['list']
    assert rc == 1 and 'gequiv_p4cnn ' in stdout and str(m) in stderr and 'Traceback' not in stderr
    rc, stdout, stderr = out['check']
    assert rc != 0 and str(m) in stderr and 'Traceback' not in stderr and len(stderr.strip().splitlines()) == 1
