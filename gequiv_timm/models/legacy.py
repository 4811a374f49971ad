"""Converting p4m weights written before the switch to GrouPy's p4m element order.

Until 0.1.0, element ``(m, r)`` of p4m was labelled ``R^r M'^m`` with a left-right mirror ``M'``; GrouPy (and this
package now) labels it ``M^m R^r`` with an up-down mirror ``M`` (see :mod:`gequiv_timm.layers.groups`). The two
labellings differ by the permutation :func:`~gequiv_timm.layers.groups.p4m_legacy_permutation` (4 and 6 swap), so
a network's old weights convert *exactly* by relabelling the ``|G_in|`` axis of every p4m group-to-group
convolution; lifting convolutions, group batch norm and group pooling need nothing. The converted network computes
the same logits (to float rounding: the folded channels are summed in another order).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn as nn

from ..layers.gconv import GroupConv2d
from ..layers.groups import p4m_legacy_permutation

__all__ = ['convert_legacy_p4m_state_dict']


def convert_legacy_p4m_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Return a copy of ``state`` (a pre-0.1.0 state dict of ``model``'s architecture) in GrouPy's p4m labels.

    Every ``GroupConv2d`` of ``model`` with a p4m group input (weight ``[C_out, C_in, 8, k, k]``) has its weight's
    group axis relabelled. Applying it twice gives back the original (the permutation is an involution).

    Raises:
        ValueError: when a p4m group axis of ``model`` reaches a layer that is not a group layer (an equivariant
            stem in ``mode='equivariant'`` folds the group axis into the channels of the next plain convolution,
            whose input channels would need relabelling too): convert such a model by hand, or retrain it.
    """
    for name, mod in model.named_modules():
        group = getattr(mod, 'group', None)
        if getattr(mod, 'mode', None) == 'equivariant' and getattr(group, 'name', group) == 'p4m':
            raise ValueError(f"convert_legacy_p4m_state_dict: {name} hands folded p4m maps to plain layers; only "
                             f"networks that keep p4m maps inside group layers convert by relabelling")
    perm = torch.tensor(p4m_legacy_permutation())
    out = {k: v.clone() for k, v in state.items()}
    for name, mod in model.named_modules():
        if isinstance(mod, GroupConv2d) and mod.in_group.name == 'p4m' and not mod.in_planar:
            key = f'{name}.weight' if name else 'weight'
            if key not in out:
                raise KeyError(f"convert_legacy_p4m_state_dict: the state dict has no {key!r}; is it for this model?")
            w = out[key]
            if w.dim() != 5 or w.shape[2] != 8:
                raise ValueError(f"convert_legacy_p4m_state_dict: {key} has shape {tuple(w.shape)}, expected "
                                 f"[C_out, C_in, 8, k, k]")
            new = torch.empty_like(w)
            new[:, :, perm] = w
            out[key] = new
    return out
