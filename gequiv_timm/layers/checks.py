"""The one input-kind check and the one equivariance check, used by every layer, stem and model.

Error policy (every input check of gequiv_timm follows it):

* ``TypeError``: the input is the wrong *kind* of thing: not a ``torch.Tensor``, or a tensor whose dtype is not
  floating point (e.g. uint8 images, integer labels passed as an image). :func:`check_float_tensor` raises these.
* ``ValueError``: a floating point tensor of the wrong *shape* or *content*: rank, channels, group axis, spatial
  size, non-finite values. Each layer raises these itself, naming the layer, what it expected, what it got and
  what to do.

:func:`check_equivariance` measures ``f(g . x)`` against ``g . f(x)`` for any set of group elements and returns an
:class:`EquivarianceError`: a float (the absolute error ``max_g max |f(g x) - g f(x)|``) that also carries the
relative error (divided by ``max |f(x)|``) and the error of each element; it raises when a given ``atol`` /
``rtol`` is exceeded. Group layers, PDE layers, the equivariant stem and the escnn baselines all answer through
it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch

__all__ = ['check_float_tensor', 'check_equivariance', 'EquivarianceError']


def check_float_tensor(x: Any, name: str, expected: str = 'a tensor') -> None:
    """Raise ``TypeError`` unless ``x`` is a floating point ``torch.Tensor`` (the kind check of the policy above).

    ``name`` is the layer or model (the message starts with it); ``expected`` describes the input, e.g.
    ``'an image batch [B, 3, H, W]'``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected {expected} as a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor, got dtype {x.dtype}; convert it with x.float() "
                        f"(and scale uint8 images to [0, 1], then normalise as the model's pretrained_cfg says)")


class EquivarianceError(float):
    """The absolute equivariance error ``max_g max |f(g x) - g f(x)|`` (the float value), with

    * ``relative``: the same divided by ``max |f(x)|`` (scale free),
    * ``per_element``: ``{g: absolute error}`` for each element checked.
    """

    relative: float
    per_element: Dict[Any, float]

    def __new__(cls, absolute: float, relative: float, per_element: Dict[Any, float]):
        obj = super().__new__(cls, absolute)
        obj.relative = float(relative)
        obj.per_element = dict(per_element)
        return obj

    @property
    def absolute(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"EquivarianceError(absolute={float(self):.3g}, relative={self.relative:.3g})"


@torch.no_grad()
def check_equivariance(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       act_in: Callable[[torch.Tensor, Any], torch.Tensor],
                       act_out: Callable[[torch.Tensor, Any], torch.Tensor], elements: Iterable[Any], *,
                       atol: Optional[float] = None, rtol: Optional[float] = None,
                       name: str = 'check_equivariance') -> EquivarianceError:
    """``max_g |f(act_in(x, g)) - act_out(f(x), g)|`` over ``elements`` (any subset of the group).

    Args:
        f: the module or function (called as is: put a module in eval mode first if its train mode is not
            equivariant, e.g. batch norm over a batch of one).
        x: the input.
        act_in, act_out: how element ``g`` acts on an input and on an output (for an invariant ``f``,
            ``act_out`` returns its argument unchanged).
        elements: the group elements to check (e.g. ``group.elements()``, or the quarter turns).
        atol, rtol: when given, an ``AssertionError`` naming ``name`` is raised if the absolute / relative error
            exceeds it.

    Returns an :class:`EquivarianceError` (a float: the absolute error; ``.relative``, ``.per_element``).
    """
    fx = f(x)
    scale = fx.detach().abs().max().item() if fx.numel() else 0.0
    per = {}
    for g in elements:
        d = f(act_in(x, g)) - act_out(fx, g)
        per[g] = d.abs().max().item() if d.numel() else 0.0
    err = max(per.values(), default=0.0)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float('inf'))
    out = EquivarianceError(err, rel, per)
    if atol is not None and err > atol:
        raise AssertionError(f"{name}: equivariance error {err:.3g} > atol {atol:.3g} (relative {rel:.3g})")
    if rtol is not None and rel > rtol:
        raise AssertionError(f"{name}: relative equivariance error {rel:.3g} > rtol {rtol:.3g} (absolute {err:.3g})")
    return out
