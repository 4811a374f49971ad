"""What the benchmark scripts share besides the package's measurements (:mod:`gequiv_timm.measure`: round-robin
timing, MACs, train memory, peak resident memory): the target verdict, writing a result, the callables of a
layer-against-escnn comparison (:func:`layer_step_fns`), timing in shuffled rounds, and the ``--device`` option (CPU, or
CUDA when a GPU is present: callables are then synchronised, and results name the GPU)."""
from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable


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


def add_device_arg(ap) -> None:
    """``--device`` (``cpu`` by default, ``cuda`` / ``cuda:N`` on a GPU machine)."""
    ap.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda[:N]': where the benchmark runs")


def resolve_device(name: str):
    """The ``torch.device`` for ``--device``; a SystemExit with one line when CUDA is asked for and absent."""
    import torch
    dev = torch.device(name)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); use "
                         f"--device cpu, or run on a GPU machine (benchmarks/gpu_check.sh)")
    if dev.type not in ('cpu', 'cuda'):
        raise SystemExit(f"--device {name}: only 'cpu' and 'cuda[:N]' are supported")
    return dev


def device_label(dev, threads: int | None = None) -> str:
    """``'NVIDIA H200'`` for a GPU; ``'CPU (x86_64, 2 threads)'`` otherwise."""
    import torch
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev)
    t = threads if threads is not None else torch.get_num_threads()
    return f"CPU ({platform.machine()}, {t} thread{'s' if t != 1 else ''})"


def synced(fns: dict[str, Callable[[], Any]], dev) -> dict[str, Callable[[], Any]]:
    """On CUDA, each callable followed by ``torch.cuda.synchronize`` (so a timing covers the kernels it queued);
    unchanged on the CPU."""
    if dev.type != 'cuda':
        return fns
    import torch

    def wrap(f):
        def g():
            out = f()
            torch.cuda.synchronize(dev)
            return out
        return g
    return {k: wrap(f) for k, f in fns.items()}


def shuffled_round_robin(fns: dict[str, Callable[[], Any]], reps: int, seed: int = 0, warmup: int = 3,
                         inner: int = 1, raw: dict | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds (this process, all threads) per call of each callable, timed in rounds of
    ``inner`` calls each, in a fresh random order every round (seeded): unlike a rotated order, no candidate
    always runs right after the same other one (what a candidate leaves behind, e.g. freed memory or cold caches,
    falls on all alike). CPU time is less sensitive than wall time to other jobs on a shared machine. With ``raw``
    (a dict), the per-round times are left in ``raw['wall']`` / ``raw['cpu']`` for :func:`paired_ratio`."""
    rng = random.Random(seed)
    keys = list(fns)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(reps):
        rng.shuffle(keys)
        for k in keys:
            f = fns[k]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                f()
            wall[k].append((time.perf_counter() - t) / inner)
            cpu[k].append((time.process_time() - c) / inner)
    if raw is not None:
        raw['wall'], raw['cpu'] = wall, cpu
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of ``a``'s time over ``b``'s in the same round: robust to the machine's load
    drifting between rounds (both sides of a ratio are measured within one round)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def escnn_field_type(group: str, fields: int):
    """escnn's regular field type of ``fields`` fields on the group named as in :mod:`gequiv_timm.layers.groups`
    (``'p4'`` / ``'cN'``: ``rot2dOnR2(N)``; ``'p4m'`` / ``'dN'``: ``flipRot2dOnR2(N)``)."""
    from gequiv_timm.layers import get_group
    from gequiv_timm.models.escnn_baselines import import_escnn
    gspaces, enn = import_escnn()
    g = get_group(group)
    gs = gspaces.flipRot2dOnR2(g.rotations) if g.mirror else gspaces.rot2dOnR2(g.rotations)
    return enn.FieldType(gs, fields * [gs.regular_repr])


def no_grad_call(f: Callable[[], Any]) -> Callable[[], Any]:
    """``f`` called under ``torch.no_grad()`` (an eval-mode candidate for the round-robin timers)."""
    def h():
        import torch
        with torch.no_grad():
            return f()
    return h


def layer_step_fns(group: str, fields: int, batch: int, size: int, mode: str, dev, bias: bool = True,
                   kernel_size: int = 3, seed: int = 0) -> dict[str, Callable[[], Any]]:
    """The callables a layer benchmark times side by side on ``group`` (``fields`` regular fields in and out,
    ``kernel_size``, 'same' padding, ``batch x |G| fields x size x size``, on ``dev``): ``'ours'``
    (:class:`~gequiv_timm.layers.GroupConv2d`), ``'escnn'`` (``R2Conv`` on the same fields) and ``'floor'`` (one
    ``F.conv2d`` with our expanded bank and bias as fixed tensors).

    ``mode='train'``: one step of an inner layer, forward and backward with a dense upstream gradient (a fixed
    random tensor of the output's shape, as the next layer would send), gradients for the weights *and* the input.
    ``mode='eval'``: eval mode, no grad. Both layers get the mode they are timed in."""
    import torch
    import torch.nn.functional as F

    from gequiv_timm.layers import GroupConv2d, get_group
    from gequiv_timm.models.escnn_baselines import import_escnn
    _, enn = import_escnn()
    g = get_group(group)
    torch.manual_seed(seed)
    pad = kernel_size // 2
    ours = GroupConv2d(fields, fields, kernel_size, g, g, padding=pad, bias=bias).to(dev)
    ft = escnn_field_type(group, fields)
    esc = enn.R2Conv(ft, ft, kernel_size, padding=pad, bias=bias).to(dev)
    x5 = torch.randn(batch, fields, g.order, size, size, device=dev)
    xf = x5.flatten(1, 2).clone()
    w = ours.expanded_weight().detach().clone()
    b = ours.expanded_bias().detach().clone() if bias else None
    if mode == 'eval':
        ours.eval()
        esc.eval()
        return {'ours': no_grad_call(lambda: ours(x5)), 'escnn': no_grad_call(lambda: esc(enn.GeometricTensor(xf, ft))),
                'floor': no_grad_call(lambda: F.conv2d(xf, w, b, 1, pad))}
    if mode != 'train':
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    ours.train()
    esc.train()
    x5.requires_grad_(True)
    xf.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    gy = torch.randn(batch, fields * g.order, size, size, device=dev)
    gy5 = gy.view(batch, fields, g.order, size, size)

    def ours_train():
        ours.zero_grad(set_to_none=True)
        x5.grad = None
        ours(x5).backward(gy5)

    def esc_train():
        esc.zero_grad(set_to_none=True)
        xf.grad = None
        esc(enn.GeometricTensor(xf, ft)).tensor.backward(gy)

    def floor_train():
        w.grad = xf.grad = None
        if b is not None:
            b.grad = None
        F.conv2d(xf, w, b, 1, pad).backward(gy)

    return {'ours': ours_train, 'escnn': esc_train, 'floor': floor_train}
