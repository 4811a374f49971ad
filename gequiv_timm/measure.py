"""Measuring models side by side: MACs, train memory, round-robin timing and quarter-turn invariance.

One implementation for ``gequiv-timm compare`` and the benchmarks (``benchmarks/``), so that a number in a
benchmark table and one in the comparison table are measured the same way. Nothing here trains or reports; the
functions take a model (or zero-argument callables) and return plain numbers.

* :func:`count_macs`: multiply-accumulates of one forward pass (``torch.utils.flop_counter``);
* :func:`train_memory_bytes`: the memory of one train step, counted (parameters, gradients, AdamW state and the
  tensors autograd saves), device independent and deterministic;
* :func:`peak_rss_bytes`: the process's measured peak resident memory while a callable runs (Linux);
* :func:`time_round_robin`: median seconds per call of several candidates, timed in rotating rounds;
* :func:`invariance_error`: max abs change of a model's output under 90 degree turns of its input.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers.checks import check_equivariance

__all__ = ['count_macs', 'invariance_error', 'peak_rss_bytes', 'time_round_robin', 'train_memory_bytes']


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 1, 28, 28)) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (eval mode, no grad), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; MACs = FLOPs / 2).

    The input is zeros of the model's first parameter's dtype and device; the model's train / eval mode is restored.
    """
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.parameters())
    x = torch.zeros(*input_size, dtype=p.dtype, device=p.device)
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was)
    return int(counter.get_total_flops() // 2)


def train_memory_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Bytes held at the peak of one train step: parameters + gradients + AdamW state (2 per parameter) + the
    distinct tensors autograd saves for backward (counted by storage, so views are not double counted).

    ``x``: a batch of inputs; ``y``: class indices ``[B]`` (the loss is cross-entropy). Returns ``params``,
    ``grads``, ``optimizer``, ``activations`` and ``total`` in bytes. The model is left in train mode with no
    gradients. This is device independent and deterministic (a CPU has no allocator peak counter); it is the memory
    that grows with batch size and with the way a layer builds its filters.
    """
    storages: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            pass
        return t

    model.train()
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    saved = sum(n for ptr, n in storages.items() if ptr not in param_ptrs)
    return dict(params=params, grads=params, optimizer=2 * params, activations=saved,
                total=4 * params + saved)


def _proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line: peak_rss_bytes needs Linux")


def peak_rss_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident bytes of this process above the level before ``fn()`` runs, measured by the kernel (Linux:
    ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``, which is read after the call).

    The result of ``fn()`` is held until the peak is read, so an output counts. Meaningful for one allocation
    pattern only in a process started with ``MALLOC_MMAP_THRESHOLD_`` set (e.g. ``65536``): then every large tensor
    is its own mmap, freed memory goes back to the OS at once, and the peak is ``fn``'s own rather than what the
    allocator kept from earlier work. Raises ``RuntimeError`` where ``/proc`` is not there.
    """
    import gc
    gc.collect()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak resident memory ({e}): peak_rss_bytes needs Linux /proc") from None
    base = _proc_status_bytes('VmRSS')
    keep = fn()
    peak = _proc_status_bytes('VmHWM')
    del keep
    return peak - base


def time_round_robin(fns: dict[str, Callable[[], Any]], reps: int = 10, warmup: int = 2, inner: int = 1
                     ) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin (one turn of each per round, the
    order rotated every round) so that a machine shared with other jobs, and whatever one candidate leaves behind
    for the next (freed memory, cold caches), hits every entry alike. ``inner`` calls are timed together.

    Report ratios between the entries of one call, not absolute times: the absolute ones depend on the machine's
    load at the time.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            f = fns[k]
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def invariance_error(model: nn.Module, x: torch.Tensor) -> float:
    """Max abs change of the output when ``x`` (``[B, C, H, W]``, square) is turned by 90, 180 and 270 degrees
    (eval mode): 0 up to float rounding for a model whose output is invariant to quarter turns."""
    model.eval()
    return float(check_equivariance(model, x, lambda t, k: torch.rot90(t, k, dims=(-2, -1)), lambda y, k: y,
                                    (1, 2, 3), name='invariance_error'))
