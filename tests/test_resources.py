"""registry/ and weights/ are found from a source checkout and from an installed wheel.

The wheel test builds the real wheel (hatchling, as pyproject.toml says), installs it into a temporary folder and
imports it from a subprocess whose cwd is elsewhere, so neither the checkout nor the editable install can help.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gequiv_timm import _resources

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_finds_the_folders_beside_the_package():
    assert _resources.registry_dir() == ROOT / 'registry'
    assert _resources.weights_dir() == ROOT / 'weights'


def test_env_override_and_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv('GEQUIV_TIMM_WEIGHTS', str(tmp_path))
    assert _resources.weights_dir() == tmp_path
    monkeypatch.setenv('GEQUIV_TIMM_WEIGHTS', str(tmp_path / 'nope'))
    monkeypatch.setattr(_resources, '_PKG', tmp_path / 'pkg')  # neither _weights nor ../weights exist there
    with pytest.raises(FileNotFoundError, match='GEQUIV_TIMM_WEIGHTS'):
        _resources.weights_dir()


PROBE = r'''
import json, os, sys
import torch
import gequiv_timm, timm
from gequiv_timm import _resources, registry
out = {'module': gequiv_timm.__file__, 'registry': str(_resources.registry_dir()),
       'weights': str(_resources.weights_dir()), 'models': timm.list_models('gequiv_*'),
       'manifest': sorted(registry.manifest()), 'loaded': []}
for key, e in registry.manifest().items():
    if e.get('file'):
        m = timm.create_model(key, pretrained=True)  # the embedded copy, HF_HUB_OFFLINE=1
        out['loaded'].append([key, m.pretrained_cfg.get('file')])
print('RESULT' + json.dumps(out))
'''


def test_installed_wheel_finds_registry_and_weights(tmp_path):
    wheel_dir, target, cwd = tmp_path / 'wheel', tmp_path / 'site', tmp_path / 'elsewhere'
    cwd.mkdir()
    build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                            '-w', str(wheel_dir), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (whl,) = wheel_dir.glob('gequiv_timm-*.whl')
    names = zipfile.ZipFile(whl).namelist()
    assert 'gequiv_timm/_registry/gcnn.toml' in names and 'gequiv_timm/_weights/manifest.json' in names
    manifest = json.loads((ROOT / 'weights' / 'manifest.json').read_text())
    for e in manifest.values():
        if e.get('file'):
            assert f"gequiv_timm/_weights/{e['file']}" in names
    inst = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', '--target',
                           str(target), str(whl)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if not k.startswith(('GEQUIV_TIMM_', 'HF_'))}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, '-c', PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('RESULT')][-1][len('RESULT'):])
    pkg = target / 'gequiv_timm'
    assert Path(out['module']).parent == pkg, 'the subprocess imported another copy of gequiv_timm'
    assert out['registry'] == str(pkg / '_registry') and out['weights'] == str(pkg / '_weights')
    assert 'gequiv_p4cnn' in out['models']
    assert out['manifest'] == sorted(manifest)
    assert sorted(k for k, _ in out['loaded']) == sorted(k for k, e in manifest.items() if e.get('file'))
    for key, f in out['loaded']:
        assert Path(f).parent == pkg / '_weights', f"{key} loaded from {f}, not the wheel's copy"
