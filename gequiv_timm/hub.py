"""Weights I/O at the edge: safetensors files with metadata, the weights manifest, and (later) the Hub.

Nothing here ever unpickles: weights are read with ``safetensors.torch`` only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .models._helpers import sha256_file

__all__ = ['save_weights', 'load_weights', 'read_metadata', 'update_manifest', 'WeightsError']


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, for another architecture, or with mismatched keys."""


def save_weights(model: torch.nn.Module, path, architecture: str, tag: str = '', recipe: str = '',
                 extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Save ``model.state_dict()`` as safetensors with metadata; returns ``{file, sha256, size, metadata}``.

    Metadata (all strings): ``architecture``, ``tag``, ``gequiv_timm_version``, ``recipe``, ``format='pt'`` and
    any ``extra`` items (JSON-encoded when not strings).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {'format': 'pt', 'architecture': architecture, 'tag': tag, 'gequiv_timm_version': __version__,
            'recipe': recipe}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    return {'file': path.name, 'sha256': sha256_file(path), 'size': path.stat().st_size, 'metadata': meta}


def read_metadata(path) -> Dict[str, str]:
    """The metadata header of a safetensors file (raises :class:`WeightsError` naming the file)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model: torch.nn.Module, path, architecture: Optional[str] = None, strict: bool = True):
    """Load a safetensors file into ``model``; check architecture, names and shapes first.

    Nothing is copied into the model unless every check passes, so a failure never leaves it half-loaded.
    Returns ``(missing, unexpected)`` key lists (empty when ``strict``).
    """
    meta = read_metadata(path)
    if architecture and meta.get('architecture') and meta['architecture'] != architecture:
        raise WeightsError(f"{path}: weights are for {meta['architecture']!r}, not {architecture!r}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong:
            parts.append(f"wrong shapes {wrong}")
        raise WeightsError(f"{path}: does not fit {type(model).__name__}: " + '; '.join(parts))
    model.load_state_dict(state, strict=strict)
    return missing, unexpected


def update_manifest(manifest_path, key: str, entry: Dict[str, Any]) -> None:
    """Insert/replace ``key`` (``name.tag``) in the JSON manifest, keeping it sorted and stable."""
    p = Path(manifest_path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data[key] = entry
    p.write_text(json.dumps(dict(sorted(data.items())), indent=2, sort_keys=False) + '\n')
