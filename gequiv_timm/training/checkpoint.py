"""Resumable checkpoints: atomic folders of weights (safetensors), training state and every rank's RNG state."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.nn as nn

from ..weights import load_weights, save_weights
from .distributed import DistInfo
from .state import CHECKPOINT_FORMAT, load_state, rng_state, save_state, set_rng_state

__all__ = ['CheckpointManager', 'find_checkpoint', 'read_checkpoint', 'restore_rng']


class CheckpointManager:
    """Checkpoints in ``root/step_00000100/`` with ``model.safetensors`` (the weights, loadable on their own by
    :func:`gequiv_timm.weights.load_weights` or ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``),
    ``state.safetensors`` (optimizer, scheduler, AMP scaler, progress, config) and ``rng-rank{r}.safetensors``
    (python / numpy / torch RNG of every rank).

    A checkpoint is written into a temporary folder and renamed into place, then ``root/latest`` is replaced
    atomically, so a process killed at any moment (``kill -9``) leaves the previous checkpoint intact.
    """

    def __init__(self, root, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def _dir(self, step: int) -> Path:
        return self.root / f'step_{step:08d}'

    def complete(self) -> List[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        out = [p for p in self.root.glob('step_*') if p.is_dir() and '.tmp' not in p.name and
               (p / 'model.safetensors').exists() and (p / 'state.safetensors').exists()]
        return sorted(out, key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint folder, or None."""
        ptr = self.root / 'latest'
        if ptr.exists():
            p = self.root / ptr.read_text().strip()
            if p in self.complete():
                return p
        done = self.complete()
        return done[-1] if done else None

    def _fresh_tmp(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob('step_*.tmp'):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def _publish(self, tmp: Path, final: Path) -> None:
        for f in tmp.iterdir():
            with open(f, 'rb') as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = self.root / 'latest.tmp'
        ptr_tmp.write_text(final.name + '\n')
        os.replace(ptr_tmp, self.root / 'latest')
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def save(self, step: int, model: nn.Module, state: Dict[str, Any], dist: DistInfo, architecture: str = '',
             rng: Optional[Dict[str, Any]] = None) -> None:
        """Write checkpoint ``step`` (collective: every rank calls it; rank 0 writes weights and state)."""
        final = self._dir(step)
        tmp = self.root / f'{final.name}.tmp'
        if dist.is_main:
            self._fresh_tmp(tmp)
        dist.barrier()
        save_state(tmp / f'rng-rank{dist.rank}.safetensors', {'rng': rng or rng_state(dist.device)})
        dist.barrier()
        if dist.is_main:
            save_weights(model, tmp / 'model.safetensors', architecture, recipe='checkpoint',
                         extra={'step': str(step)})
            save_state(tmp / 'state.safetensors', state)
            self._publish(tmp, final)
        dist.barrier()


def find_checkpoint(resume: Optional[str], manager: Optional[CheckpointManager]) -> Optional[Path]:
    """The folder ``resume`` names: ``'auto'``: the newest in ``manager`` (None when there is none yet); a
    checkpoint root: its newest; a checkpoint folder: itself. Errors name the fix."""
    if not resume:
        return None
    if resume == 'auto':
        if manager is None:
            raise ValueError("resume='auto' needs a checkpoint_dir to look in")
        return manager.latest()
    where = Path(resume)
    if (where / 'latest').exists():
        where = CheckpointManager(where).latest() or where  # a checkpoint folder's root: its newest one
    if not (where / 'state.safetensors').exists():
        raise FileNotFoundError(f"resume: {where} is not a checkpoint folder (no state.safetensors in it)")
    return where


def read_checkpoint(where: Path, fingerprint: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Load the weights of checkpoint ``where`` into ``model`` and return its training state, after checking the
    format and that it was made with the same settings (``fingerprint``)."""
    st = load_state(where / 'state.safetensors')
    if st.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f"resume: {where} has checkpoint format {st.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}")
    old = st.get('fingerprint', {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        raise ValueError(f"resume: checkpoint {where} was made with different settings: " + '; '.join(
            f"{k}: checkpoint {old.get(k)!r} vs now {fingerprint.get(k)!r}" for k in diff) +
            ". Resume with the same settings, or start a new --checkpoint-dir.")
    load_weights(model, where / 'model.safetensors')
    return st


def restore_rng(where: Path, dist: DistInfo) -> None:
    """This rank's RNG state from checkpoint ``where`` (if it saved one)."""
    rng_file = where / f'rng-rank{dist.rank}.safetensors'
    if rng_file.exists():
        set_rng_state(load_state(rng_file)['rng'], dist.device)
