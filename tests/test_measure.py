"""gequiv_timm.measure: the measurements compare and the benchmarks share."""
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from gequiv_timm import measure


def test_count_macs_of_a_conv_and_a_linear():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert measure.count_macs(m) == 4 * 9 * 26 * 26 + 4 * 26 * 26 * 10
    assert m.training  # the mode is restored


def test_train_memory_grows_with_batch():
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    small = measure.train_memory_bytes(m, torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    big = measure.train_memory_bytes(m, torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    n = sum(p.numel() for p in m.parameters()) * 4
    assert small['params'] == big['params'] == n
    assert small['total'] == 4 * n + small['activations']
    # the ReLU output (8x26x26 floats per image) is saved for backward: at least that much per extra image
    assert big['activations'] - small['activations'] >= 6 * 8 * 26 * 26 * 4
    assert all(p.grad is None for p in m.parameters())


def test_round_robin_timing_orders_slow_and_fast():
    t = measure.time_round_robin({'fast': lambda: None, 'slow': lambda: time.sleep(0.01)}, reps=3, warmup=0)
    assert t['slow'] > t['fast'] and t['slow'] >= 0.009


def test_round_robin_rotates_the_order():
    calls = []
    measure.time_round_robin({k: (lambda k=k: calls.append(k)) for k in 'abc'}, reps=3, warmup=0)
    assert calls == list('abc') + list('bca') + list('cab')


def test_invariance_error_tells_invariant_from_not():
    torch.manual_seed(0)
    invariant = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # the mean over the plane: turn invariant
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 1, 8, 8)
    plain(x)
    assert measure.invariance_error(invariant, x) < 1e-6
    assert measure.invariance_error(plain, x) > 1e-3


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='peak resident memory is read from Linux /proc')
def test_peak_rss_counts_a_large_allocation():
    """In a fresh process started as the docstring says (every large tensor its own mmap): in this one, memory freed
    by earlier tests stays resident and a new tensor may reuse it without raising the peak."""
    code = ('import torch; from gequiv_timm import measure; n = 64 * 2 ** 20; '
            'print(measure.peak_rss_bytes(lambda: torch.ones(n // 4)), measure.peak_rss_bytes(lambda: None))')
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    big, nothing = map(int, r.stdout.split()[-2:])
    n = 64 * 2 ** 20  # 64 MiB, written, so resident
    assert big >= 0.9 * n and nothing < 0.1 * n
