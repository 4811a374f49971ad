"""`gequiv-timm compare`: a tiny end-to-end run, reproducibility, standings, the error exits and the helpers."""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import timm
from torch import nn

from gequiv_timm import compare, registry
from gequiv_timm.cli import compare as compare_cli

pytest.importorskip('mlxtend')


def make_args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    compare_cli.add_arguments(p)
    argv = ['--models', 'gequiv_p4cnn', '--budget', '1', '--train-digits', '96', '--sweep-digits', '20',
            '--timing-reps', '1', '--threads', '1', '--workers', '1', '--no-progress', '--out', str(tmp_path / 'out')]
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
    rc = compare_cli.run(args)
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
    # the report times itself and says how it ran
    t = rep['run_time']
    assert rep['threads'] == t['threads'] == 1 and rep['workers'] == t['workers'] == 1
    assert t['wall_seconds'] > 0 and t['cpu_seconds'] > 0 and set(t['per_model']) == set(rep['models'])
    assert sum(c for _, c in t['per_model'].values()) <= t['cpu_seconds']
    assert '## Run time' in md and '1 torch thread(s) per process, 1 worker process(es)' in md
    # no escnn model in this run: nothing to stand against, and no goal is declared met
    assert rep['standings'] == {'best': [], 'pairs': []}
    assert 'nothing to stand against' in md and 'Goals' not in md and not re.search(r'\bmet\b', md)
    for f in ('compare_accuracy_vs_angle.png', 'compare_error_vs_params.png'):
        assert (out / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_same_seed_reproduces(tiny_run, tmp_path):
    _, out = tiny_run
    first = json.loads((out / 'compare.json').read_text())
    args = make_args(tmp_path, no_plots=True, protocols='rotated', name='again')
    assert compare_cli.run(args) == 0
    assert not (tmp_path / 'out' / 'compare.json').exists()
    second = json.loads((tmp_path / 'out' / 'again.json').read_text())
    assert 'upright_error_mean' not in second['models']['gequiv_p4cnn']
    for m in first['models']:
        for key in ('test_error_mean', 'params', 'macs', 'rotated_angle_accuracy'):
            assert first['models'][m][key] == second['models'][m][key], (m, key)


# the fields of a report that must repeat bit for bit (everything but the clocks)
_EXACT = ('test_error', 'rotated_final_train_loss', 'rotated_angle_accuracy', 'inv90')


def _exact_fields(rep):
    out = {}
    for m, r in rep['models'].items():
        out[m] = {k: r['runs'][0][k] for k in _EXACT}
        out[m].update(params=r['params'], macs=r['macs'], train_memory_mib=r['train_memory_mib'])
    return out


def test_fresh_processes_repeat_bit_for_bit_whatever_the_worker_count(tmp_path):
    """Two fresh processes, one training in-process and one with two spawned workers (jobs in another order, other
    processes): every number but the clocks is identical, not close. An escnn model is in, for its basis solver."""
    pytest.importorskip('escnn')
    reps = []
    for workers in (1, 2):
        cmd = [sys.executable, '-m', 'gequiv_timm.cli', 'compare', '--models', 'gequiv_p4cnn,gequiv_escnn_c4cnn',
               '--protocols', 'rotated', '--budget', '1', '--train-digits', '128', '--sweep-digits', '12',
               '--timing-reps', '1', '--workers', str(workers), '--no-plots', '--no-progress',
               '--out', str(tmp_path), '--name', f'w{workers}']
        env = dict(os.environ, OMP_NUM_THREADS='1')
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        reps.append(json.loads((tmp_path / f'w{workers}.json').read_text()))
    a, b = reps
    assert (a['threads'], a['workers'], b['threads'], b['workers']) == (1, 1, 1, 2)
    assert a['deterministic_algorithms'] and b['deterministic_algorithms']
    assert _exact_fields(a) == _exact_fields(b)
    # and the run did train: the errors are not all the same (a broken pipeline could repeat trivially)
    assert len({r['runs'][0]['rotated_final_train_loss'] for r in a['models'].values()}) == 3


def _agg(errors, spreads=None):
    """A fake aggregate: model -> {'rotated': error, 'upright': error}; spreads default to binomial at n=1000."""
    agg = {}
    for m, errs in errors.items():
        rec = dict(params=22000, macs=1e7, train_step_s=0.1, train_memory_mib=40.0)
        for protocol, e in errs.items():
            key = compare.PROTOCOLS[protocol][0]
            rec[f'{key}_mean'] = e
            rec[f'{key}_spread'] = (spreads or {}).get(m, compare.spread([e], 1000))
        agg[m] = rec
    return agg


def test_standings_report_losses_ties_and_wins_per_protocol():
    agg = _agg({'gequiv_z2cnn': {'rotated': 0.17, 'upright': 0.62},
                'gequiv_p4cnn': {'rotated': 0.066, 'upright': 0.189},
                'gequiv_p4mcnn': {'rotated': 0.156, 'upright': 0.209},
                'gequiv_escnn_c4cnn': {'rotated': 0.075, 'upright': 0.228},
                'gequiv_escnn_c8cnn': {'rotated': 0.077, 'upright': 0.063},
                'gequiv_escnn_d4cnn': {'rotated': 0.163, 'upright': 0.244}})
    st = compare._standings(agg)
    best = {(r['protocol'], r['theirs']): r for r in st['best']}
    assert len(best) == 6 and {r['ours'] for r in st['best']} == {'gequiv_p4cnn'}
    # the upright protocol's loss to C8 is reported as a loss, with its numbers
    up8 = best[('upright', 'gequiv_escnn_c8cnn')]
    assert up8['standing'] == 'loss' and math.isclose(up8['gap'], 0.126)
    # a gap inside the combined spread is a tie, not a win (and never "met")
    assert best[('rotated', 'gequiv_escnn_c8cnn')]['standing'] == 'tie'
    assert best[('rotated', 'gequiv_escnn_c4cnn')]['standing'] == 'tie'
    assert best[('rotated', 'gequiv_escnn_d4cnn')]['standing'] == 'win'
    assert best[('upright', 'gequiv_escnn_c4cnn')]['standing'] == 'win'
    # like-for-like pairs on both protocols
    pairs = {(r['ours'], r['protocol']): r['standing'] for r in st['pairs']}
    assert pairs == {('gequiv_p4cnn', 'rotated'): 'tie', ('gequiv_p4cnn', 'upright'): 'win',
                     ('gequiv_p4mcnn', 'rotated'): 'tie', ('gequiv_p4mcnn', 'upright'): 'win'}
    md = '\n'.join(compare._markdown_standings(st, 'binomial standard error, one seed'))
    row = '| trained upright, tested on rotated digits | `gequiv_p4cnn` | `gequiv_escnn_c8cnn` | 18.9 | 6.3 | +12.6 |'
    assert row + ' 1.5 | **loss** |' in md
    assert 'trained upright, tested on rotated digits: `gequiv_p4cnn` against 3 escnn model(s): 2 win(s), 0 tie(s), ' \
        '1 loss(es)' in md
    assert 'rotated digits: `gequiv_p4cnn` against 3 escnn model(s): 1 win(s), 2 tie(s), 0 loss(es)' in md
    assert 'Goals' not in md and not re.search(r'\bmet\b', md)


def test_standings_pick_our_best_per_protocol():
    agg = _agg({'gequiv_z2cnn': {'rotated': 0.30, 'upright': 0.10},
                'gequiv_p4cnn': {'rotated': 0.05, 'upright': 0.40},
                'gequiv_escnn_c8cnn': {'rotated': 0.20, 'upright': 0.20}})
    st = compare._standings(agg)
    assert [(r['protocol'], r['ours'], r['standing']) for r in st['best']] == [
        ('rotated', 'gequiv_p4cnn', 'win'), ('upright', 'gequiv_z2cnn', 'win')]
    assert st['pairs'] == []


def test_unknown_model_exits_2(tmp_path, capsys):
    assert compare_cli.run(make_args(tmp_path, models='gequiv_p4cnn,gequiv_nope')) == 2
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
    assert compare_cli.run(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert 'gequiv_p4cnn cannot be compared here' in err and '(2, 3)' in err


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert compare_cli.run(make_args(tmp_path, out=str(blocker / 'sub'))) == 2
    assert 'a_file is a file, not a folder' in capsys.readouterr().err  # gequiv_timm.outputs' check


def test_missing_extra_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(registry.EXTRAS, 'escnn', 'escnn_not_installed_xyz')
    assert compare_cli.run(make_args(tmp_path, models='gequiv_escnn_c4cnn')) == 2
    assert "pip install 'gequiv_timm[escnn]'" in capsys.readouterr().err


def test_bad_numbers_exit_2(tmp_path, capsys):
    assert compare_cli.run(make_args(tmp_path, budget=0)) == 2
    assert compare_cli.run(make_args(tmp_path, protocols='sideways')) == 2
    assert compare_cli.run(make_args(tmp_path, name='../x')) == 2
    err = capsys.readouterr().err
    assert '--budget must be at least 1' in err and '--protocols' in err and '--name' in err


def test_cli_wiring(tmp_path, capsys):
    from gequiv_timm import cli
    assert cli.main(['compare', '--models', 'gequiv_nope', '--out', str(tmp_path)]) == 2
    assert 'unknown model' in capsys.readouterr().err


def test_default_models_follow_the_registry():
    names = compare.default_models()
    assert names[:4] == ['gequiv_z2cnn', 'gequiv_p4cnn', 'gequiv_c8cnn', 'gequiv_c16cnn']
    assert set(compare.ESCNN_MODELS) <= set(names)
    assert not set(compare.EXTENDED_MODELS) & set(names)
    everything = compare._parse_models('all')
    assert set(names) <= set(everything)
    assert {m for m in compare.EXTENDED_MODELS if m in timm.list_models('gequiv_*')} <= set(everything)


# ----- helpers ------------------------------------------------------------------------------------------------
def test_spread_and_tie_rule():
    assert math.isclose(compare.spread([0.1], 1000), math.sqrt(0.1 * 0.9 / 1000))
    assert math.isclose(compare.spread([0.1, 0.12, 0.11], 1000), 0.01)
    assert compare.verdict('a', 0.100, 0.01, 'b', 0.110, 0.01) == 'tie'
    assert compare.verdict('a', 0.100, 0.005, 'b', 0.120, 0.005) == 'a wins'
    assert compare.verdict('a', 0.130, 0.005, 'b', 0.100, 0.005) == 'b wins'
    assert compare.standing(0.100, 0.01, 0.110, 0.01) == 'tie'
    assert compare.standing(0.100, 0.005, 0.120, 0.005) == 'win'
    assert compare.standing(0.189, 0.012, 0.063, 0.008) == 'loss'



def test_library_takes_plain_arguments(tmp_path):
    """The library runs from a CompareConfig (no argparse); sequences and comma-separated strings are the same."""
    cfg = compare.CompareConfig(models=['gequiv_p4cnn', 'gequiv_p4mcnn'], protocols=('rotated',), out=tmp_path)
    assert cfg == compare.CompareConfig(models='gequiv_p4cnn,gequiv_p4mcnn', protocols='rotated', out=tmp_path)
    assert cfg.check() == ['rotated']
    with pytest.raises(compare.CompareError, match='--budget must be at least 1'):
        compare.run_comparison(compare.CompareConfig(budget=0, out=tmp_path))
    assert not any(tmp_path.iterdir())  # checked before any work


def test_report_command_parses_back_to_the_same_config(tmp_path):
    args = make_args(tmp_path, seeds=3, lr=0.01, name='x', no_plots=True)
    cfg = compare_cli.config_from_args(args)
    argv = shlex.split(cfg.command())[2:]  # drop 'gequiv-timm compare'
    p = argparse.ArgumentParser()
    compare_cli.add_arguments(p)
    again = compare_cli.config_from_args(p.parse_args(argv + ['--no-plots', '--no-progress']))
    assert again == cfg
