"""Find the data folders ``registry/`` and ``weights/`` from a source checkout or an installed wheel.

In a checkout (and an editable install) they sit beside the package: ``<root>/registry``, ``<root>/weights``.
A wheel carries them inside the package as ``gequiv_timm/_registry`` and ``gequiv_timm/_weights`` (see
``pyproject.toml``). ``GEQUIV_TIMM_REGISTRY`` / ``GEQUIV_TIMM_WEIGHTS`` override both.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ['resource_dir', 'registry_dir', 'weights_dir']

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Path of the ``registry`` or ``weights`` folder; raises FileNotFoundError saying where it looked."""
    if name not in ('registry', 'weights'):
        raise ValueError(f"resource_dir: name must be 'registry' or 'weights', got {name!r}")
    env = os.environ.get(f'GEQUIV_TIMM_{name.upper()}')
    candidates = [Path(env)] if env else []
    candidates += [_PKG / f'_{name}', _PKG.parent / name]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"gequiv_timm: cannot find its {name}/ folder; looked in {', '.join(map(str, candidates))}. "
        f"Reinstall the package, or set GEQUIV_TIMM_{name.upper()} to the folder.")


def registry_dir() -> Path:
    return resource_dir('registry')


def weights_dir() -> Path:
    return resource_dir('weights')
