"""benchmarks/bench_canon.py: its measurements and its goal verdicts on small inputs (the benchmark itself trains
resnet18s for many CPU-minutes; here only its code paths run)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('bench_canon', ROOT / 'benchmarks' / 'bench_canon.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _MeanLinear(nn.Module):
    """Global average pool then a linear map: invariant to every rotation that keeps the pixels' values (quarter
    turns exactly); not to a 45-degree turn (interpolation and the cut corners change the mean)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 10)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_rotation_augment_keeps_the_background_black(bench):
    from gequiv_timm.data import standardize
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0
    xs = standardize(x)
    out = bench.rotation_augment(xs, torch.Generator().manual_seed(0))
    corners = out[..., :3, :3]
    assert torch.allclose(corners, torch.full_like(corners, float(standardize(torch.zeros(1)))))
    assert not torch.allclose(out, xs)  # random angles: the digits did turn


def test_invariance_measures_zero_for_an_invariant_model_and_not_otherwise(bench):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    inv = bench.invariance(_MeanLinear(), x)
    assert inv['inv90'] < 1e-5 and inv['inv90_rel'] < 1e-5
    assert inv['inv45'] > 1e-4  # a 45-degree turn changes the mean
    flat = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    assert bench.invariance(flat, x)['inv90_rel'] > 0.1


def _record(seed, rotated, upright):
    return dict(seed=seed, rotated_error=rotated, upright_error=upright, inv90=0.0, inv90_rel=0.0, inv45=1.0,
                inv45_rel=0.1, angle_accuracy=[1 - rotated] * len(bench_angles()), train_seconds=1.0)


def bench_angles():
    from gequiv_timm.compare import ANGLES
    return ANGLES


@pytest.mark.parametrize('gap, latency, want', [(0.003, 1.1, ('OK', 'OK')), (0.008, 1.1, ('MISS', 'OK')),
                                                (0.003, 1.3, ('OK', 'MISS'))])
def test_goals_can_fail(bench, gap, latency, want):
    rows = ['plain', 'canon_joint']
    per_seed = [{'plain': _record(s, 0.6, 0.02), 'canon_joint': _record(s, 0.2, 0.02 + gap)} for s in (0, 1)]
    costs = {r: dict(params=10, trainable_params=10, macs=1e6, train_step_s=0.1, latency_b1_s=0.01,
                     train_step_ratio=1.0, latency_ratio=1.0) for r in rows}
    costs['canon_joint']['latency_ratio'] = latency
    agg = bench.aggregate(rows, per_seed, costs, n_test=1000)
    assert agg['canon_joint']['upright_error_mean'] == pytest.approx(0.02 + gap)
    verdicts = [g['verdict'] for g in bench.goals(agg)]
    assert tuple(verdicts) == want


def test_a_tiny_run_writes_table_json_and_plot(bench, tmp_path, monkeypatch):
    """The whole pipeline with a small CNN for the backbone, 64 train digits, one epoch: every canonicalizing row
    and the augmentation row (the stem and STN rows build resnet18 variants and are left to the benchmark)."""
    pytest.importorskip('matplotlib')
    pytest.importorskip('mlxtend')
    monkeypatch.setattr(bench, 'BACKBONE', 'gequiv_z2cnn')
    bench.main(['--seeds', '1', '--rows', 'plain,canon_frozen,canon_joint,group_avg,rot_aug', '--epochs', '1',
                '--train-digits', '64', '--sweep-digits', '8', '--inv-digits', '4', '--timing-reps', '1',
                '--out', str(tmp_path)])
    rep = json.loads((tmp_path / 'canon.json').read_text())
    assert set(rep['rows']) == {'plain', 'canon_frozen', 'canon_joint', 'group_avg', 'rot_aug'}
    for row in ('canon_frozen', 'canon_joint', 'group_avg'):  # exactly invariant to quarter turns
        assert rep['rows'][row]['inv90_rel_mean'] < 1e-5, row
    assert rep['rows']['plain']['inv90_rel_mean'] > 1e-3
    assert rep['rows']['canon_frozen']['trainable_params'] < rep['rows']['canon_frozen']['params']
    assert (tmp_path / 'canon_accuracy_vs_angle.png').stat().st_size > 1000
    assert '| (c) |' in (tmp_path / 'canon.md').read_text()
