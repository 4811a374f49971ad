"""What the benchmark scripts share besides the package's measurements (:mod:`gequiv_timm.measure`: round-robin
timing, MACs, train memory, peak resident memory): the target verdict, writing a result, and the train-step
callables of a layer-against-escnn comparison."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def verdict(ratio: float, target: float) -> str:
    """``'OK'`` when a measured ratio is at most its target, else ``'MISS'``."""
    return 'OK' if ratio <= target else 'MISS'


def report(text: str, results: Any, out: str | None = None) -> None:
    """Print the markdown ``text``; with ``out``, also write it there and ``results`` as JSON beside it."""
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + '\n')
        path.with_suffix('.json').write_text(json.dumps(results, indent=1) + '\n')


def layer_train_steps(ours, esc, x5, field_type, padding: int = 1) -> dict:
    """The three callables a layer benchmark times side by side, each one train step (forward + backward of the
    output's sum): ``'ours'`` (the filter bank expanded from the weights every call), ``'escnn'`` (escnn's layer on
    the same fields and input) and ``'floor'`` (one ``F.conv2d`` with ``ours``'s expanded bank as a fixed leaf).
    ``x5``: ``[B, C, |G|, H, W]``; both layers are put in train mode."""
    import torch.nn.functional as F

    from gequiv_timm.models.escnn_baselines import import_escnn
    _, enn = import_escnn()
    xf = x5.flatten(1, 2)
    xg = enn.GeometricTensor(xf.clone(), field_type)
    w = ours.expanded_weight().detach().clone().requires_grad_(True)
    ours.train()
    esc.train()

    def ours_train():
        ours.zero_grad(set_to_none=True)
        ours(x5).sum().backward()

    def esc_train():
        esc.zero_grad(set_to_none=True)
        esc(xg).tensor.sum().backward()

    def floor_train():
        w.grad = None
        F.conv2d(xf, w, None, 1, padding).sum().backward()

    return {'ours': ours_train, 'escnn': esc_train, 'floor': floor_train}
