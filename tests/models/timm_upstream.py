"""timm's own ``tests/test_models.py``, imported unchanged from the sdist of the installed timm (a helper of
``tests/models/test_timm_models_upstream.py`` and ``tests/models/test_timm_contract.py``; not a test file itself).

``make test`` downloads the sdist once into ``.cache/timm-sdist/``; its ``tests/`` folder is unpacked next to it on
first use. timm defines ``test_model_forward_fx_torchscript`` only when ``GITHUB_ACTIONS`` is unset and trims its
exclude lists for GitHub's runners, so the module is imported with ``GITHUB_ACTIONS`` unset: the same tests run on
every host.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import sys
import tarfile
from pathlib import Path

import timm

import gequiv_timm  # noqa: F401  (registers the gequiv_ models before timm's module lists them)

ROOT = Path(__file__).resolve().parents[2]
SDIST_DIR = ROOT / '.cache' / 'timm-sdist'
MODULE_NAME = 'timm_upstream_test_models'
# the two tests parametrised over the registry that are left out: they download ImageNet weights
DESELECTED = ('test_model_load_pretrained', 'test_model_features_pretrained')


def upstream_file() -> Path:
    """``tests/test_models.py`` of the installed timm's sdist, unpacked next to the archive on first use."""
    version = timm.__version__
    unpacked = SDIST_DIR / f'timm-{version}' / 'tests'
    if not (unpacked / 'test_models.py').is_file():
        archive = SDIST_DIR / f'timm-{version}.tar.gz'
        if not archive.is_file():
            raise RuntimeError(
                f"timm {version}'s source distribution is not in {SDIST_DIR}: run `make test`, or "
                f"`pip download --no-deps --no-binary :all: timm=={version} -d {SDIST_DIR}`")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/') and m.isfile()]
            tar.extractall(SDIST_DIR, members=members, filter='data')
    return unpacked / 'test_models.py'


def load():
    """timm's test module (imported once per process)."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, upstream_file())
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.pop('GITHUB_ACTIONS', None)
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ['GITHUB_ACTIONS'] = saved
    sys.modules[MODULE_NAME] = module
    return module


def model_param(fn):
    """The ``parametrize('model_name', [...])`` mark of an upstream test, or None."""
    for mark in getattr(fn, 'pytestmark', ()):
        if mark.name == 'parametrize' and mark.args and mark.args[0] == 'model_name':
            return mark
    return None


def selected(module) -> dict:
    """timm test name -> the ``gequiv_*`` models timm's own selection gives it (tests parametrised over the
    registry, less ``DESELECTED``; its tests written for named timm models are not ours to run)."""
    out = {}
    for name, fn in vars(module).items():
        if not (name.startswith('test_') and callable(fn)) or name in DESELECTED:
            continue
        mark = model_param(fn)
        if mark is None:
            continue
        ours = [m for m in mark.args[1] if isinstance(m, str) and fnmatch.fnmatch(m, 'gequiv_*')]
        if ours:
            out[name] = ours
    return out
