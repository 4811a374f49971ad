"""Weights files: safetensors I/O with metadata, sha256 checks, state-dict checks, the weights manifest.

Everything here works on any ``nn.Module`` and on plain files; it imports nothing of gequiv_timm above the
resource helpers, so the model builders (pretrained loading), the catalog (the manifest), training and the Hub
code all use it from below.

* :func:`save_weights` / :func:`load_weights` / :func:`read_metadata` / :func:`read_state`: safetensors files with
  string metadata (``architecture``, ``tag``, ``recipe``, ...). Nothing here ever unpickles.
* :func:`check_state_dict`: names, shapes, dtypes and values of a state dict against a model, before anything is
  copied into it (the dtype policy below).
* :func:`sha256_file` / :func:`verify_checksum`: a file against the manifest's checksum.
* :func:`read_manifest` / :func:`update_manifest`: the JSON manifest (``weights/manifest.json``); writes are atomic
  (a temporary file in the same folder, then ``os.replace``), so a reader never sees half a manifest. Its entries
  hold data only, from a fixed table of fields (:data:`MANIFEST_FIELDS`); nothing in it names code to run.

The dtype policy (what :func:`check_state_dict` accepts, :data:`DTYPE_POLICY`):

* a floating tensor of the file (float16, bfloat16, float32, float64, ...) loads into a floating parameter or buffer
  of any precision: it is cast to the model's dtype, as ``load_state_dict`` does;
* an integer tensor loads into an integer buffer (e.g. BatchNorm's ``num_batches_tracked``), a bool into a bool;
* refused: any other pairing (an int32 / bool / complex tensor for a float32 weight, a float for an integer
  buffer), a floating tensor holding NaN or +-inf, and values that do not fit the model's dtype (a float64 1e39
  cast to float32 is inf; an int64 beyond int32's range cast to int32 wraps).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ._version import __version__

__all__ = ['WeightsError', 'ChecksumError', 'save_weights', 'load_weights', 'read_metadata', 'read_state',
           'check_state_dict', 'check_finite', 'sha256_file', 'git_blob_sha1', 'verify_checksum', 'verify_digest',
           'read_manifest', 'update_manifest', 'check_manifest_entry', 'MANIFEST_FIELDS', 'DTYPE_POLICY']


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


def git_blob_sha1(path, chunk: int = 1 << 20) -> str:
    """The git object id of a file (``sha1(b"blob <size>\\0" + content)``): what the Hub reports as the ETag of a
    file stored in git rather than LFS."""
    h = hashlib.sha1(b'blob %d\0' % Path(path).stat().st_size)
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


_HEX = re.compile(r'[0-9a-f]+')


def verify_digest(path, digest: str, what: str = '') -> str:
    """Check a file against a digest reported by its source: 64 hex digits are a sha256 (the Hub's LFS object id),
    40 hex digits a git blob id (a file stored in git). Returns the kind checked (``'sha256'`` / ``'git-sha1'``);
    raises :class:`ChecksumError` naming the file when it does not match or the digest is neither."""
    d = (digest or '').strip().strip('"').lower()
    if len(d) == 64 and _HEX.fullmatch(d):
        kind, got = 'sha256', sha256_file(path)
    elif len(d) == 40 and _HEX.fullmatch(d):
        kind, got = 'git-sha1', git_blob_sha1(path)
    else:
        raise ChecksumError(f"{path}: cannot verify it{' (' + what + ')' if what else ''}: its source reports no "
                            f"sha256 or git id (got {digest!r}); download it from a source that does")
    if got != d:
        raise ChecksumError(f"{path}: {kind} {got} does not match {d}, the {kind} its source reports"
                            f"{' for ' + what if what else ''}; the download is corrupted. Delete the file and "
                            f"download it again.")
    return kind


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


#: what :func:`check_state_dict` accepts, in one sentence (error messages quote it)
DTYPE_POLICY = ("a floating tensor loads into a floating parameter or buffer of any precision (cast to the model's "
                "dtype, as load_state_dict does), an integer into an integer buffer, a bool into a bool; NaN, inf and "
                "values that do not fit the model's dtype are refused")


def _bad_values(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the values of ``t`` cannot be loaded (into a tensor of ``dtype``), or None."""
    if t.numel() == 0:
        return None
    if t.is_floating_point():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            return f"{int((~finite).sum())} NaN / inf value(s)"
        if dtype is not None and dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(t.dtype).max:
            peak = float(t.detach().abs().max())
            if peak > torch.finfo(dtype).max:
                return f"values up to {peak:.3g} overflow {dtype} (max {torch.finfo(dtype).max:.3g})"
    elif t.dtype != torch.bool and not t.is_complex() and dtype is not None and dtype != torch.bool and \
            not dtype.is_floating_point and not dtype.is_complex:
        lo, hi = int(t.min()), int(t.max())
        info = torch.iinfo(dtype)
        if lo < info.min or hi > info.max:
            return f"values in [{lo}, {hi}] do not fit {dtype}"
    return None


def _listed(what: str, items: List[str], limit: int = 8) -> str:
    shown = items[:limit]
    more = f" and {len(items) - limit} more" if len(items) > limit else ''
    return f"{what} ({len(items)}): {shown}{more}"


def check_finite(state: Mapping[str, torch.Tensor], source) -> None:
    """Raise :class:`WeightsError` naming ``source`` when a floating tensor of ``state`` holds NaN or inf (a
    diverged or corrupted checkpoint); for the tensors a model-specific filter uses before
    :func:`check_state_dict` sees them."""
    bad = [f"{k}: {why}" for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           for why in [_bad_values(v)] if why]
    if bad:
        raise WeightsError(f"{source}: not loadable: {_listed('bad values', bad)} (the training diverged or the "
                           f"file is corrupted); use another checkpoint")


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source, strict: bool = True,
                     ignore: Iterable[str] = (), partial_hint: str = 'strict=False'
                     ) -> Tuple[List[str], List[str]]:
    """Compare a state dict with ``model``'s before anything is copied: raise :class:`WeightsError` naming
    ``source`` and, each apart, the unexpected keys, the missing keys, the wrong shapes, the wrong dtypes and the bad
    values.

    Wrong shapes, dtypes and values always fail (the dtype policy, :data:`DTYPE_POLICY`: a float16 / bfloat16 /
    float64 file loads into a float32 model, cast as ``load_state_dict`` does; an int32, bool or complex tensor for
    a floating weight does not; nor NaN / inf, nor values that overflow the model's dtype). Missing and unexpected
    keys fail when ``strict`` (a partial load is asked for explicitly with ``strict=False``; the message names that
    option as ``partial_hint``). Keys in ``ignore`` (e.g. a classifier timm is about to drop because
    ``num_classes`` changed) are left out. Returns ``(missing, unexpected)``.
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
    values = [f"{k}: {why}" for k in common if _kind(own[k]) == _kind(got[k])
              for why in [_bad_values(got[k], own[k].dtype)] if why]
    keys_fail = strict and (missing or unexpected)
    if wrong or kinds or values or keys_fail:
        parts = []
        if unexpected:
            parts.append(_listed('unexpected keys', unexpected))
        if missing:
            parts.append(_listed('missing keys', missing))
        if wrong:
            parts.append(_listed('wrong shapes', wrong))
        if kinds:
            parts.append(_listed('wrong dtypes', kinds))
        if values:
            parts.append(_listed('bad values', values))
        if kinds or values:
            fix = f" Policy: {DTYPE_POLICY}. The file is corrupted or not a checkpoint of this model."
        elif wrong:
            fix = " Use the checkpoint with the architecture and arguments it was trained with."
        else:
            fix = (f" Use the checkpoint with the architecture and arguments it was trained with, or pass "
                   f"{partial_hint} to load only the keys that match.")
        raise WeightsError(f"{source}: does not fit {type(model).__name__}: " + '; '.join(parts) + '.' + fix)
    return missing, unexpected


def load_weights(model: torch.nn.Module, path, architecture: Optional[str] = None, strict: bool = True):
    """Load a safetensors file into ``model``; check architecture, names, shapes, dtypes and values first
    (:func:`check_state_dict`).

    Nothing is copied into the model unless every check passes, so a failure never leaves it half-loaded. With
    ``strict=False`` missing and unexpected keys are allowed (a partial load); wrong shapes, dtypes and values are
    still refused. Returns ``(missing, unexpected)`` key lists (empty when ``strict``).
    """
    meta = read_metadata(path)
    if architecture and meta.get('architecture') and meta['architecture'] != architecture:
        raise WeightsError(f"{path}: weights are for {meta['architecture']!r}, not {architecture!r}")
    state = read_state(path)
    missing, unexpected = check_state_dict(state, model, path, strict=strict)
    model.load_state_dict(state, strict=strict)
    return missing, unexpected


# ----- the manifest --------------------------------------------------------------------------------------------
def _is_hex(v, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and _HEX.fullmatch(v) is not None


def _plain_name(v) -> bool:
    return isinstance(v, str) and bool(v) and '/' not in v and '\\' not in v and not v.startswith('.')


#: the fields a manifest entry may have, each with its check and what it must be. Entries are data only: no field
#: names code (the metric a checkpoint is re-measured with comes from the data-set catalog, by its recipe's set).
MANIFEST_FIELDS: Dict[str, Tuple[Any, str]] = {
    'file': (_plain_name, "a file name in the weights folder (no path)"),
    'sha256': (lambda v: _is_hex(v, 64), "64 lowercase hex digits"),
    'size': (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a byte count (int >= 0)"),
    'metrics': (lambda v: isinstance(v, dict), "an object of metric names to values"),
    'recipe': (lambda v: isinstance(v, str), "a string (the recipe id)"),
    'command': (lambda v: isinstance(v, str), "a string (the command that trained it)"),
    'budget': (lambda v: isinstance(v, str), "a string"),
    'label_names': (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    'converted_from_sha256': (lambda v: _is_hex(v, 64), "64 lowercase hex digits"),
}
#: fields older manifests used to name code with; refused with the reason
_CODE_FIELDS = {'evaluator': "the metric is re-measured by the data-set catalog's measurement for the recipe's data "
                             "set (gequiv_timm/data/catalog.py); a manifest names no code"}


def check_manifest_entry(key: str, entry: Any, where='manifest') -> Dict[str, Any]:
    """Check one manifest entry against :data:`MANIFEST_FIELDS`; return it, or raise :class:`WeightsError` naming
    ``where`` (the file), the entry and the field."""
    name, dot, tag = key.partition('.') if isinstance(key, str) else ('', '', '')
    if not (name and dot and tag):
        raise WeightsError(f"{where}: entry {key!r}: keys must be 'name.tag'; restore the file from version control")
    if not isinstance(entry, dict):
        raise WeightsError(f"{where}: entry {key}: expected an object of fields, got {type(entry).__name__}; restore "
                           f"the file from version control")
    for field, value in entry.items():
        if field in _CODE_FIELDS:
            raise WeightsError(f"{where}: entry {key}: field {field!r} is not allowed: {_CODE_FIELDS[field]}. "
                               f"Remove the field.")
        if field not in MANIFEST_FIELDS:
            raise WeightsError(f"{where}: entry {key}: unknown field {field!r}; allowed: {sorted(MANIFEST_FIELDS)}")
        ok, what = MANIFEST_FIELDS[field]
        if not ok(value):
            raise WeightsError(f"{where}: entry {key}: field {field!r} must be {what}, got {value!r}")
    return entry


def read_manifest(path) -> Dict[str, Dict[str, Any]]:
    """A weights manifest (``{"name.tag": {file, sha256, size, metrics, ...}}``); ``{}`` when the file does not
    exist. Raises :class:`WeightsError` naming the file when it cannot be read, is not JSON (e.g. truncated), or an
    entry breaks :func:`check_manifest_entry`."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{p}: not valid JSON ({e}); the manifest is truncated or corrupted: restore it from "
                           f"version control or reinstall the package") from None
    except OSError as e:
        raise WeightsError(f"{p}: cannot read the manifest ({type(e).__name__}: {e.strerror or e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{p}: expected a JSON object mapping 'name.tag' to entries (objects); restore it "
                           f"from version control")
    for key, entry in data.items():
        check_manifest_entry(key, entry, p)
    return data


def update_manifest(manifest_path, key: str, entry: Dict[str, Any]) -> None:
    """Insert/replace ``key`` (``name.tag``) in the JSON manifest, keeping it sorted and stable.

    The entry is checked first (:func:`check_manifest_entry`). The new manifest is written to a temporary file
    beside it and moved over it with ``os.replace``: a reader (or a crash) sees the old manifest or the new one,
    never a partial file.
    """
    p = Path(manifest_path)
    check_manifest_entry(key, entry, p)
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
