"""Weights files: safetensors I/O with metadata, sha256 checks, state-dict checks, the weights manifest.

Everything here works on any ``nn.Module`` and on plain files; it imports nothing of gequiv_timm above the
resource helpers, so the model builders (pretrained loading), the catalog (the manifest), training and the Hub
code all use it from below.

* :func:`save_weights` / :func:`load_weights` / :func:`read_metadata` / :func:`read_state`: safetensors files with
  string metadata (``architecture``, ``tag``, ``recipe``, ...). Nothing here ever unpickles.
* :func:`check_state_dict`: names, shapes and dtype kinds of a state dict against a model, before anything is
  copied into it.
* :func:`sha256_file` / :func:`verify_checksum`: a file against the manifest's checksum.
* :func:`read_manifest` / :func:`update_manifest`: the JSON manifest (``weights/manifest.json``); writes are atomic
  (a temporary file in the same folder, then ``os.replace``), so a reader never sees half a manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ._version import __version__

__all__ = ['WeightsError', 'ChecksumError', 'save_weights', 'load_weights', 'read_metadata', 'read_state',
           'check_state_dict', 'sha256_file', 'verify_checksum', 'read_manifest', 'update_manifest']


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, for another architecture, or with mismatched keys."""


class ChecksumError(RuntimeError):
    """A weights file whose sha256 (or size) does not match the manifest."""


# ----- checksums -----------------------------------------------------------------------------------------------
def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path, expected: Optional[str], what: str = '') -> None:
    """Raise :class:`ChecksumError` naming the file when its sha256 is not ``expected`` (None: skip)."""
    if not expected:
        return
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{path}: sha256 {got} does not match the manifest's {expected}"
                            f"{' for ' + what if what else ''}; the file is corrupted or was replaced. Delete it and "
                            f"reinstall / re-download.")


# ----- safetensors files ---------------------------------------------------------------------------------------
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
    _shareable(path)
    return {'file': path.name, 'sha256': sha256_file(path), 'size': path.stat().st_size, 'metadata': meta}


def _shareable(path) -> None:
    """safetensors (and mkstemp) write files owner-only (0600); weights and the manifest are meant to be shared
    (they ship in the wheel), so give them the usual mode for a new file under the process umask (0644 under
    umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _unreadable(path, e) -> WeightsError:
    return WeightsError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupted. "
                        f"Delete it and export / download it again.")


def read_metadata(path) -> Dict[str, str]:
    """The metadata header of a safetensors file (raises :class:`WeightsError` naming the file)."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework='pt') as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def read_state(path) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (raises :class:`WeightsError` naming the file)."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None


def _kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return 'complex'
    if t.is_floating_point():
        return 'float'
    return 'bool' if t.dtype == torch.bool else 'integer'


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source, strict: bool = True,
                     ignore: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """Compare a state dict with ``model``'s: raise :class:`WeightsError` naming ``source`` and the keys.

    Wrong shapes and wrong dtype kinds (a float tensor where the model has integers, ...) always fail; a different
    precision of the same kind is fine (``load_state_dict`` casts it). Missing / unexpected keys fail when
    ``strict``. Keys in ``ignore`` (e.g. a classifier timm is about to drop because ``num_classes`` changed) are
    left out of the comparison. Returns ``(missing, unexpected)``.
    """
    ignore = set(ignore)
    own = {k: v for k, v in model.state_dict().items() if k not in ignore}
    got = {k: v for k, v in state.items() if k not in ignore}
    missing = sorted(set(own) - set(got))
    unexpected = sorted(set(got) - set(own))
    common = sorted(set(own) & set(got))
    wrong = [f"{k}: file {tuple(got[k].shape)} vs model {tuple(own[k].shape)}"
             for k in common if tuple(own[k].shape) != tuple(got[k].shape)]
    kinds = [f"{k}: file {got[k].dtype} vs model {own[k].dtype}" for k in common if _kind(own[k]) != _kind(got[k])]
    if wrong or kinds or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong:
            parts.append(f"wrong shapes {wrong}")
        if kinds:
            parts.append(f"wrong dtypes {kinds}")
        raise WeightsError(f"{source}: does not fit {type(model).__name__}: " + '; '.join(parts) +
                           ". Use the checkpoint with the architecture and arguments it was trained with.")
    return missing, unexpected


def load_weights(model: torch.nn.Module, path, architecture: Optional[str] = None, strict: bool = True):
    """Load a safetensors file into ``model``; check architecture, names, shapes and dtype kinds first.

    Nothing is copied into the model unless every check passes, so a failure never leaves it half-loaded.
    Returns ``(missing, unexpected)`` key lists (empty when ``strict``).
    """
    meta = read_metadata(path)
    if architecture and meta.get('architecture') and meta['architecture'] != architecture:
        raise WeightsError(f"{path}: weights are for {meta['architecture']!r}, not {architecture!r}")
    state = read_state(path)
    missing, unexpected = check_state_dict(state, model, path, strict=strict)
    model.load_state_dict(state, strict=strict)
    return missing, unexpected


# ----- the manifest --------------------------------------------------------------------------------------------
def read_manifest(path) -> Dict[str, Dict[str, Any]]:
    """A weights manifest (``{"name.tag": {file, sha256, size, metrics, ...}}``); ``{}`` when the file does not
    exist. Raises :class:`WeightsError` naming the file when it is not a JSON object of entries."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{p}: not valid JSON ({e}); restore it from version control") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise WeightsError(f"{p}: expected a JSON object mapping 'name.tag' to entries (objects); restore it "
                           f"from version control")
    return data


def update_manifest(manifest_path, key: str, entry: Dict[str, Any]) -> None:
    """Insert/replace ``key`` (``name.tag``) in the JSON manifest, keeping it sorted and stable.

    The new manifest is written to a temporary file beside it and moved over it with ``os.replace``: a reader (or
    a crash) sees the old manifest or the new one, never a partial file.
    """
    p = Path(manifest_path)
    data = read_manifest(p)
    data[key] = entry
    text = json.dumps(dict(sorted(data.items())), indent=2, sort_keys=False) + '\n'
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{p.name}.', suffix='.tmp', dir=p.parent)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _shareable(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
