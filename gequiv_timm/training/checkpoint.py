"""Resumable checkpoints: atomic folders of weights (safetensors), training state and every rank's RNG state, each
with a manifest of sizes and sha256 written last; verified resume, the settings fingerprint, atomic pruning."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.nn as nn
from safetensors import SafetensorError

from ..weights import load_weights, save_weights, sha256_file
from .distributed import DistInfo, all_sum
from .state import CHECKPOINT_FORMAT, load_state, rng_state, save_state, set_rng_state

__all__ = ['CheckpointManager', 'CheckpointError', 'CheckpointCorruptError', 'NoIntactCheckpointError',
           'ResumeMismatchError', 'MANIFEST', 'verify_checkpoint', 'find_checkpoint', 'read_checkpoint',
           'restore_rng', 'fingerprint_value', 'compare_fingerprints']

MANIFEST = 'manifest.json'
_STEP = re.compile(r'step_(\d{8})')  # a published checkpoint folder: exactly this name
_TMP = '.tmp'  # step_00000100.tmp: a checkpoint being written (a leftover if the writer died)
_TRASH = '.trash-'  # .trash-step_00000100-<pid>-<ns>: a folder being deleted (a leftover if the deleter died)
_REQUIRED = ('model.safetensors', 'state.safetensors', 'rng-rank0.safetensors')
# what reading a damaged file can raise: safetensors' own error, the file system's, a bad JSON tree in the header
_READ_ERRORS = (SafetensorError, OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError)


# ----- errors ----------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from. One line naming the folder (or file) and the fix."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint folder with a missing, truncated or changed file (``.folder``, ``.file``, ``.reason``)."""

    def __init__(self, folder: Path, file: str, reason: str, fix: str = ''):
        self.folder, self.file, self.reason = Path(folder), file, reason
        super().__init__(f"resume: checkpoint {folder} is damaged: {file}: {reason}" + (f". {fix}" if fix else ''))


class NoIntactCheckpointError(CheckpointError):
    """``--resume`` found checkpoints in a folder but none of them is intact (``.root``, ``.damaged``)."""

    def __init__(self, root: Path, damaged: List[CheckpointCorruptError]):
        self.root, self.damaged = Path(root), damaged
        what = '; '.join(f"{e.folder.name}: {e.file}: {e.reason}" for e in damaged)
        super().__init__(f"resume: no intact checkpoint in {root} ({what}). Start again without --resume in a new "
                         f"--checkpoint-dir, or move the damaged folders away")


class ResumeMismatchError(CheckpointError):
    """A checkpoint made with other settings (``.changes``: ``{name: (checkpoint value, current value)}``)."""

    def __init__(self, where: Path, changes: Dict[str, Tuple[Any, Any]]):
        self.where, self.changes = Path(where), changes
        super().__init__(f"resume: checkpoint {where} was made with different settings: " + '; '.join(
            f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in changes.items()) +
            ". Resume with the same settings, or start a new --checkpoint-dir.")


# ----- the settings fingerprint ------------------------------------------------------------------------------
def fingerprint_value(v: Any) -> Any:
    """A setting as the fingerprint stores it: numbers, strings, booleans and None as they are; anything else
    (lists, dicts, dtypes, paths) as its sorted JSON text, so it compares equal after a round trip."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, sort_keys=True, default=str)


def compare_fingerprints(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{name: (old, new)}`` for every setting whose value differs (a setting missing on one side is None)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


# ----- one checkpoint folder ---------------------------------------------------------------------------------
def _step_of(p: Path) -> Optional[int]:
    m = _STEP.fullmatch(p.name)
    return int(m.group(1)) if m else None


def _one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


def _check_file(folder: Path, name: str, rec: Dict[str, Any]) -> None:
    f = folder / name
    if not f.is_file():
        raise CheckpointCorruptError(folder, name, 'missing')
    size = f.stat().st_size
    if size != rec.get('size'):
        raise CheckpointCorruptError(folder, name, f"{size} bytes, the manifest says {rec.get('size')} (truncated "
                                                   f"or replaced)")
    if sha256_file(f) != rec.get('sha256'):
        raise CheckpointCorruptError(folder, name, "sha256 differs from the manifest's (the bytes changed)")
    try:
        if name == 'model.safetensors':
            from safetensors.torch import load_file
            load_file(str(f))
        else:
            st = load_state(f)
            keys = ('rng',) if name.startswith('rng-rank') else ('format', 'step', 'epoch', 'pos', 'optimizer')
            missing = [k for k in keys if k not in st]
            if missing:
                raise ValueError(f"no {', '.join(missing)} in it")
    except CheckpointError:
        raise
    except _READ_ERRORS as e:  # damage; the reason goes into the one-line message
        raise CheckpointCorruptError(folder, name, f"unreadable ({_one_line(e)})") from None


def _read_manifest(folder: Path) -> Dict[str, Any]:
    man = folder / MANIFEST
    if not man.is_file():
        try:
            fmt = load_state(folder / 'state.safetensors').get('format')
        except _READ_ERRORS:
            fmt = None  # unreadable too: the manifest is what is reported missing
        if fmt and fmt != CHECKPOINT_FORMAT:
            raise CheckpointCorruptError(folder, 'state.safetensors', f"written by an older gequiv_timm (checkpoint "
                                         f"format {fmt}, this version resumes {CHECKPOINT_FORMAT}); use its "
                                         f"model.safetensors as --initial-checkpoint of a new run")
        raise CheckpointCorruptError(folder, MANIFEST, 'missing (the checkpoint was not completely written)')
    try:
        data = json.loads(man.read_text())
        files = data['files']
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("'files' is not a table of files")
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, not JSON, no table of files
        raise CheckpointCorruptError(folder, MANIFEST, f"unreadable ({_one_line(e)})") from None
    if data.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointCorruptError(folder, MANIFEST, f"checkpoint format {data.get('format')!r}, this version "
                                     f"resumes {CHECKPOINT_FORMAT!r}")
    return data


def verify_checkpoint(folder) -> None:
    """Check checkpoint ``folder`` completely before anything is loaded from it: its ``manifest.json`` (written
    last) is readable and names the weights, the state and rank 0's RNG file; every file it names exists with the
    recorded size and sha256 and reads back (every tensor of the weights; the state and RNG trees).

    Raises :class:`CheckpointCorruptError` naming the first damaged file and why.
    """
    folder = Path(folder)
    data = _read_manifest(folder)
    for name in _REQUIRED:
        if name not in data['files']:
            raise CheckpointCorruptError(folder, name, 'not listed in manifest.json')
    for name, rec in sorted(data['files'].items()):
        _check_file(folder, name, rec)


def _write_manifest(folder: Path, step: int) -> None:
    """``folder/manifest.json``: the format, the step and every file's size and sha256 (written last)."""
    files = {f.name: {'size': f.stat().st_size, 'sha256': sha256_file(f)} for f in sorted(folder.iterdir())}
    tmp = folder / (MANIFEST + '.part')
    tmp.write_text(json.dumps({'format': CHECKPOINT_FORMAT, 'step': step, 'files': files}, indent=1) + '\n')
    os.replace(tmp, folder / MANIFEST)


def _fsync_dir(path: Path) -> None:
    if hasattr(os, 'O_DIRECTORY'):  # POSIX; Windows has no directory handles to flush
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    """Checkpoints in ``root/step_00000100/`` with ``model.safetensors`` (the weights, loadable on their own by
    :func:`gequiv_timm.weights.load_weights` or ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``),
    ``state.safetensors`` (optimizer, scheduler, AMP scaler, progress, the settings fingerprint),
    ``rng-rank{r}.safetensors`` (python / numpy / torch RNG of every rank) and ``manifest.json`` (the size and
    sha256 of each of them, written last).

    * Writing: into ``step_00000100.tmp/``, the manifest last, every file fsynced, then renamed into place and
      ``root/latest`` replaced atomically: a process killed at any moment (``kill -9``) leaves the previous
      checkpoints intact and at worst a ``.tmp`` folder.
    * Pruning (the newest ``keep`` stay): a folder is first renamed to a hidden ``.trash-...`` name in ``root``
      (atomic), then deleted; a kill in between leaves only trash, never a half-deleted ``step_`` folder.
    * :meth:`clean_leftovers` (run when training starts) removes ``.tmp`` and ``.trash-`` folders.
    * :meth:`newest_intact` (what ``--resume`` uses) verifies candidates newest first and skips damaged ones,
      saying which and why.

    One training run per ``root`` at a time.
    """

    def __init__(self, root, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def _dir(self, step: int) -> Path:
        return self.root / f'step_{step:08d}'

    def complete(self) -> List[Path]:
        """Published checkpoint folders (renamed into place; not necessarily intact), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _step_of(p) is not None and p.is_dir()),
                      key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        """The newest published checkpoint folder, or None. Not verified: see :meth:`newest_intact`."""
        cands = self.candidates()
        return cands[0] if cands else None

    def candidates(self) -> List[Path]:
        """Published folders, newest (highest step) first. ``root/latest`` (the name of the last one written) is
        for people and for recognising a checkpoint root; a kill between the rename of a new folder and the update
        of ``latest`` leaves it one behind, so the order comes from the folder names."""
        return self.complete()[::-1]

    def newest_intact(self, say: Callable[[str], None] = lambda line: None) -> Optional[Path]:
        """The newest checkpoint that passes :func:`verify_checkpoint`; each damaged one on the way is reported
        as one line through ``say``. None when there is no checkpoint at all; :class:`NoIntactCheckpointError`
        when there are some but none is intact."""
        damaged: List[CheckpointCorruptError] = []
        for p in self.candidates():
            try:
                verify_checkpoint(p)
            except CheckpointCorruptError as e:
                damaged.append(e)
                say(f"resume: skipping damaged checkpoint {p} ({e.file}: {e.reason})")
                continue
            return p
        if damaged:
            raise NoIntactCheckpointError(self.root, damaged)
        return None

    def leftovers(self) -> List[Path]:
        """``.tmp`` (interrupted writes) and ``.trash-`` (interrupted deletions) entries in ``root``."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(_TRASH) or p.name == 'latest.tmp' or
                      (p.name.startswith('step_') and p.name.endswith(_TMP)))

    def clean_leftovers(self) -> List[str]:
        """Remove :meth:`leftovers`; returns their names."""
        gone = []
        for p in self.leftovers():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p.name)
        return gone

    def _discard(self, folder: Path) -> None:
        """Delete ``folder`` atomically: rename it to a trash name next to it, then delete the trash."""
        trash = self.root / f'{_TRASH}{folder.name}-{os.getpid()}-{time.monotonic_ns()}'
        os.replace(folder, trash)
        shutil.rmtree(trash)

    def _fresh_tmp(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            self._discard(tmp)
        tmp.mkdir()

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        _write_manifest(tmp, step)
        for f in tmp.iterdir():
            with open(f, 'rb') as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a resumed run re-reaching it)
            self._discard(final)
        os.replace(tmp, final)
        ptr_tmp = self.root / 'latest.tmp'
        ptr_tmp.write_text(final.name + '\n')
        os.replace(ptr_tmp, self.root / 'latest')
        _fsync_dir(self.root)
        for old in [p for p in self.complete() if p != final][:-(self.keep - 1) or None]:
            self._discard(old)

    def save(self, step: int, model: nn.Module, state: Dict[str, Any], dist: DistInfo, architecture: str = '',
             rng: Optional[Dict[str, Any]] = None) -> None:
        """Write checkpoint ``step`` (collective: every rank calls it; rank 0 writes weights, state, manifest)."""
        final = self._dir(step)
        tmp = self.root / f'{final.name}{_TMP}'
        if dist.is_main:
            self._fresh_tmp(tmp)
        dist.barrier()
        save_state(tmp / f'rng-rank{dist.rank}.safetensors', {'rng': rng or rng_state(dist.device)})
        dist.barrier()
        if dist.is_main:
            save_weights(model, tmp / 'model.safetensors', architecture, recipe='checkpoint',
                         extra={'step': str(step)})
            save_state(tmp / 'state.safetensors', state)
            self._publish(tmp, final, step)
        dist.barrier()


# ----- resume --------------------------------------------------------------------------------------------------
def _is_root(where: Path) -> bool:
    return (where / 'latest').is_file() or any(_step_of(p) is not None for p in where.iterdir())


def find_checkpoint(resume: Optional[str], manager: Optional[CheckpointManager],
                    say: Callable[[str], None] = lambda line: None, dist: Optional[DistInfo] = None
                    ) -> Optional[Path]:
    """The verified checkpoint folder ``resume`` names.

    * ``'auto'``: the newest intact one in ``manager`` (None when there is none yet); damaged newer ones are
      skipped, one line each through ``say``; :class:`NoIntactCheckpointError` when none is intact.
    * a checkpoint root (a folder of ``step_`` folders): the same, in that folder.
    * a checkpoint folder: itself, fully verified; :class:`CheckpointCorruptError` naming the damaged file
      when it is not intact (another one is never picked instead of the folder the user named).

    Under ``torchrun`` every rank verifies and the ranks must agree on the step.
    """
    if not resume:
        return None
    if resume == 'auto':
        if manager is None:
            raise ValueError("resume='auto' needs a checkpoint_dir to look in")
        where = manager.newest_intact(say)
    else:
        where = Path(resume)
        if not where.is_dir():
            raise FileNotFoundError(f"resume: {where} is not a checkpoint folder (no such folder)")
        if _step_of(where) is None and _is_root(where):
            where = CheckpointManager(where).newest_intact(say)
            if where is None:
                raise FileNotFoundError(f"resume: {resume} holds no checkpoint folder")
        elif not ((where / MANIFEST).exists() or (where / 'state.safetensors').exists()):
            raise FileNotFoundError(f"resume: {where} is not a checkpoint folder (no {MANIFEST} or "
                                    f"state.safetensors in it)")
        else:
            try:
                verify_checkpoint(where)
            except CheckpointCorruptError as e:
                older = [p.name for p in CheckpointManager(where.parent).candidates() if p.name < where.name]
                raise CheckpointCorruptError(e.folder, e.file, e.reason, (
                    f"Resume from an older checkpoint (--resume {where.parent / older[0]})" if older else
                    "Start again without --resume")) from None
    if dist is not None and dist.distributed:
        mine = -1 if where is None else _step_of(where) or 0
        if all_sum([mine], dist)[0] != mine * dist.world_size:
            raise CheckpointError(f"resume: the processes chose different checkpoints in {resume} (a shared "
                                  f"folder is needed: every process must see the same files)")
    return where


def read_checkpoint(where: Path, fingerprint: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Load the weights of checkpoint ``where`` into ``model`` and return its training state, after checking the
    format and that it was made with the same settings (``fingerprint``: :class:`ResumeMismatchError` naming each
    changed setting with both values)."""
    st = load_state(where / 'state.safetensors')
    if st.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(f"resume: {where} has checkpoint format {st.get('format')!r}, this version resumes "
                              f"{CHECKPOINT_FORMAT!r}; use its model.safetensors as --initial-checkpoint of a new "
                              f"run")
    changes = compare_fingerprints(st.get('fingerprint', {}), fingerprint)
    if changes:
        raise ResumeMismatchError(where, changes)
    load_weights(model, where / 'model.safetensors')
    return st


def restore_rng(where: Path, dist: DistInfo) -> None:
    """This rank's RNG state from checkpoint ``where``."""
    rng_file = where / f'rng-rank{dist.rank}.safetensors'
    if not rng_file.is_file():
        raise CheckpointCorruptError(where, rng_file.name, f"missing (the checkpoint has no RNG state for rank "
                                                           f"{dist.rank})")
    set_rng_state(load_state(rng_file)['rng'], dist.device)
