"""Shared plumbing for the timm-facing recipes: building through ``build_model_with_cfg`` and pretrained checks."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from timm.models import build_model_with_cfg

__all__ = ['create_gequiv_model', 'adapt_input_conv_nd', 'sha256_file', 'verify_checksum', 'ChecksumError']


class ChecksumError(RuntimeError):
    """A weights file whose sha256 does not match the manifest."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
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
        raise ChecksumError(f"{path}: sha256 {got} does not match the manifest's {expected}{' for ' + what if what else ''}"
                            f"; the file is corrupted or was replaced. Delete it and reinstall / re-download.")


def adapt_input_conv_nd(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Adapt a first-layer weight ``[C_out, C_in, ...]`` (any rank >= 3, e.g. GrouPy's 5-D) to ``in_chans``.

    As timm's ``adapt_input_conv``: going to 1 channel sums the input channels; going to more channels repeats
    them and rescales so the response to a constant image keeps its size.
    """
    c_in = weight.shape[1]
    if c_in == in_chans:
        return weight
    dtype = weight.dtype
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // c_in)
        w = w.repeat(1, reps, *([1] * (w.dim() - 2)))[:, :in_chans]
        w = w * (c_in / float(in_chans))
    return w.to(dtype)


def _pretrained_file(pretrained_cfg) -> Optional[str]:
    if pretrained_cfg is None:
        return None
    get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else (lambda k, d=None: getattr(pretrained_cfg, k, d))
    if get('source', '') == 'hf-hub':
        return None
    return get('file', None)


def create_gequiv_model(model_cls, variant: str, pretrained: bool = False, *,
                        first_conv: Optional[str] = None, feature_cfg: Optional[Dict[str, Any]] = None,
                        pretrained_filter_fn: Optional[Callable] = None, **kwargs):
    """``build_model_with_cfg`` with the house defaults.

    * features through timm's getter wrapper (the model's ``forward_intermediates``), so ``features_only=True``
      works for every model;
    * ``first_conv`` names a first layer whose weight may be 5-D (GrouPy layout): its input channels are adapted
      to ``in_chans`` here (timm's own adaptation only handles 4-D weights);
    * a local weights file is checked against the manifest's sha256 before it is read.
    """
    feature_cfg = dict(feature_cls='getter', **(feature_cfg or {}))
    in_chans = kwargs.get('in_chans', None)

    def _filter(state_dict, model):
        if pretrained_filter_fn is not None:
            state_dict = pretrained_filter_fn(state_dict, model)
        if first_conv and in_chans is not None:
            key = first_conv + '.weight'
            if key in state_dict and state_dict[key].shape[1] != in_chans:
                state_dict[key] = adapt_input_conv_nd(in_chans, state_dict[key])
        return state_dict

    if pretrained:
        _check_pretrained_file(variant, kwargs)
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                pretrained_filter_fn=_filter, **kwargs)


def _check_pretrained_file(variant: str, kwargs: Dict[str, Any]) -> None:
    """Verify the sha256 of the local weights the builder is about to read (if the manifest lists one)."""
    from timm.models import get_pretrained_cfg
    from .. import registry
    cfg = kwargs.get('pretrained_cfg', None)
    tag = None
    if cfg is None or isinstance(cfg, str):
        name = variant + (f'.{cfg}' if isinstance(cfg, str) and cfg else '')
        cfg = get_pretrained_cfg(name, allow_unregistered=True)
        tag = getattr(cfg, 'tag', None) if cfg is not None else None
    else:
        tag = cfg.get('tag', None) if isinstance(cfg, dict) else getattr(cfg, 'tag', None)
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if 'file' in overlay:
        return  # the user points at their own file
    path = _pretrained_file(cfg)
    if not path:
        return
    entry = registry.manifest_entry(f'{variant}.{tag}') if tag else None
    if entry and Path(path).name == entry.get('file'):
        verify_checksum(path, entry.get('sha256'), f'{variant}.{tag}')
