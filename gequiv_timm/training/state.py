"""Pickle-free training-state files (safetensors tensors + a JSON tree in the header) and RNG state capture."""
from __future__ import annotations

import json
import math
import random
from typing import Any, Dict

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ['CHECKPOINT_FORMAT', 'save_state', 'load_state', 'rng_state', 'set_rng_state']

CHECKPOINT_FORMAT = 'gequiv_timm.train/2'  # 2: manifest.json in every folder, the full settings fingerprint


def _encode_container(obj, prefix: str, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"checkpoint state: key {k!r} at {prefix!r} is not a str or int")
            out.append([k, _encode(v, f'{prefix}.{k}', tensors)])
        return {'__dict__': out}
    if isinstance(obj, tuple):
        return {'__tuple__': [_encode(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]}
    return [_encode(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]


def _encode(obj, prefix: str, tensors: Dict[str, torch.Tensor]):
    """Turn nested python/torch/numpy state into JSON plus a flat dict of tensors (no pickle anywhere)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {'__tensor__': prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in 'ui' else obj.copy())
        return {'__ndarray__': prefix, 'dtype': str(obj.dtype)}
    if isinstance(obj, (dict, tuple, list)):
        return _encode_container(obj, prefix, tensors)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {'__float__': repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} at {prefix!r} without pickle")


def _decode(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if '__tensor__' in obj:
        return tensors[obj['__tensor__']]
    if '__ndarray__' in obj:
        return tensors[obj['__ndarray__']].numpy().astype(np.dtype(obj['dtype']))
    if '__dict__' in obj:
        return {k: _decode(v, tensors) for k, v in obj['__dict__']}
    if '__tuple__' in obj:
        return tuple(_decode(v, tensors) for v in obj['__tuple__'])
    if '__float__' in obj:
        return float(obj['__float__'])
    raise ValueError(f"checkpoint state: unknown record {sorted(obj)}")


def save_state(path, state: Dict[str, Any]) -> None:
    """Write nested training state (tensors, numbers, strings, lists, dicts, tuples, numpy arrays) to one
    safetensors file: tensors as tensors, the structure as JSON in the header. Read back with :func:`load_state`.
    """
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(state, 's', tensors)
    save_file(tensors, str(path), metadata={'format': 'pt', 'gequiv_timm_state': json.dumps(tree),
                                            'checkpoint_format': CHECKPOINT_FORMAT})


def load_state(path) -> Dict[str, Any]:
    """Read a file written by :func:`save_state` (safetensors + JSON; nothing is unpickled)."""
    with safe_open(str(path), framework='pt') as f:
        meta = dict(f.metadata() or {})
    if 'gequiv_timm_state' not in meta:
        raise ValueError(f"{path}: not a gequiv_timm training-state file (no 'gequiv_timm_state' header)")
    return _decode(json.loads(meta['gequiv_timm_state']), load_file(str(path)))


def rng_state(device: torch.device) -> Dict[str, Any]:
    """The python / numpy / torch (and this device's CUDA) RNG state of the process."""
    st = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        st['cuda'] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured (after a round trip through :func:`save_state`)."""
    py = st['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(st['numpy']))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and device.type == 'cuda':
        torch.cuda.set_rng_state(st['cuda'], device)
