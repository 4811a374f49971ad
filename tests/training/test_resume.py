"""Checkpoints and resume of `gequiv-timm train`: a run killed with SIGKILL and resumed ends with the same weights as
an uninterrupted one; a crash while a checkpoint is being written leaves the previous one usable; the state files
hold no pickle."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gequiv_timm.train as T
from gequiv_timm.cli import main

ROOT = Path(__file__).resolve().parents[2]
# 96 digits, batch 16: 6 steps per epoch, 12 steps in all; a 3-stage P4CNN keeps each step a few ms
COMMON = ['train', 'gequiv_p4cnn', '--epochs', '2', '--batch-size', '16', '--limit-train', '96', '--limit-eval', '40',
          '--threads', '1', '--no-progress', '--model-kwargs', 'widths=[4,4,4]', '--log-every', '1', '--seed', '3']
KILL_AT = 8
EVERY = 3

_KILLER = f"""
import os, signal, sys
import gequiv_timm.training.recipe as R
_train = R.train
def train(*a, **k):
    def on_step(step, rec):
        if step == {KILL_AT}:
            os.kill(os.getpid(), signal.SIGKILL)
    return _train(*a, on_step=on_step, **k)
R.train = train
from gequiv_timm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _weights(path):
    return load_file(str(path))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume: max {(a[k].float() - b[k].float()).abs().max()}"


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('ref') / 'ref.safetensors'
    assert main(COMMON + ['--out', str(out)]) == 0
    return _weights(out)


def test_kill9_then_resume_gives_the_same_weights(tmp_path, uninterrupted, capsys):
    ck, log = tmp_path / 'ck', tmp_path / 'log.jsonl'
    args = COMMON + ['--checkpoint-dir', str(ck), '--checkpoint-every', str(EVERY), '--metrics-log', str(log)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', _KILLER] + args + ['--out', str(tmp_path / 'never.safetensors')],
                          env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / 'never.safetensors').exists()
    latest = T.CheckpointManager(ck).latest()
    assert latest is not None
    step = int(latest.name.split('_')[1])
    assert KILL_AT - step <= EVERY, f"lost {KILL_AT - step} steps, more than --checkpoint-every {EVERY}"
    steps_logged = [json.loads(x)['step'] for x in log.read_text().splitlines()]
    assert max(steps_logged) == KILL_AT  # the log saw steps beyond the checkpoint before the kill

    out = tmp_path / 'resumed.safetensors'
    assert main(args + ['--resume', '--out', str(out)]) == 0
    assert f'resumed from {latest} (step {step}' in capsys.readouterr().err
    _assert_same(_weights(out), uninterrupted)
    # the log reads like one run: every step once, in order, then the final evaluation
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r['step'] for r in rows if r['kind'] == 'step'] == list(range(1, 13))
    assert rows[-1]['kind'] == 'final'
    # at most --keep-checkpoints (2) complete checkpoints, the newest at the end
    done = T.CheckpointManager(ck).complete()
    assert [p.name for p in done] == ['step_00000009', 'step_00000012']


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted, monkeypatch, capsys):
    ck = tmp_path / 'ck'
    args = COMMON + ['--checkpoint-dir', str(ck), '--checkpoint-every', str(EVERY)]
    real = T.save_state

    def failing(path, state):
        if Path(path).name == 'state.safetensors' and state['step'] == 6:
            Path(path).write_bytes(b'half a file')
            raise OSError(28, 'No space left on device (simulated)')
        return real(path, state)

    import gequiv_timm.training.checkpoint as C
    monkeypatch.setattr(C, 'save_state', failing)
    capsys.readouterr()
    try:  # the run stops: with the OSError, or (the command's one-line report of user errors) a non-zero status
        rc = main(args)
    except OSError as e:
        assert 'simulated' in str(e)
    else:
        assert rc != 0 and 'No space left on device (simulated)' in capsys.readouterr().err
    monkeypatch.setattr(C, 'save_state', real)
    mgr = T.CheckpointManager(ck)
    assert mgr.latest().name == 'step_00000003'
    assert (ck / 'step_00000006.tmp').exists()  # the half-written one never became a checkpoint
    out = tmp_path / 'resumed.safetensors'
    capsys.readouterr()
    assert main(args + ['--resume', '--out', str(out)]) == 0
    assert '(step 3, epoch 0, batch 3)' in capsys.readouterr().err
    assert not (ck / 'step_00000006.tmp').exists()
    _assert_same(_weights(out), uninterrupted)


def test_resume_refuses_other_settings(tmp_path, capsys):
    ck = tmp_path / 'ck'
    args = ['--checkpoint-dir', str(ck), '--checkpoint-every', '2', '--max-steps', '2']
    assert main(COMMON + args) == 0
    other = [a if a != '16' else '8' for a in COMMON]  # another batch size changes the data order
    assert main(other + args + ['--resume']) == 2
    err = capsys.readouterr().err
    assert 'batch_size' in err and 'checkpoint 16 vs now 8' in err


def test_resume_auto_with_no_checkpoint_starts_fresh_and_explicit_folder_must_exist(tmp_path, capsys):
    assert main(COMMON + ['--checkpoint-dir', str(tmp_path / 'empty'), '--resume', '--max-steps', '1']) == 0
    assert main(COMMON + ['--resume', str(tmp_path / 'nothing-here'), '--max-steps', '1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / 'nothing-here') in err[0] and 'no such folder' in err[0]


def test_state_files_roundtrip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {'optimizer': opt.state_dict(), 'inf': math.inf, 'nan': float('nan'), 'tuple': (1, 'a', None),
             'np': np.random.RandomState(0).get_state(), 'nested': {1: [torch.arange(3), {'x': 2.5}]}}
    T.save_state(tmp_path / 's.safetensors', state)
    raw = (tmp_path / 's.safetensors').read_bytes()
    assert b'\x80\x04' not in raw[:16] and b'pickle' not in raw  # a safetensors header, no pickle protocol
    back = T.load_state(tmp_path / 's.safetensors')
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(back['optimizer'])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2['param_groups'][0]['lr'] == 1e-3 and tuple(s2['param_groups'][0]['betas']) == (0.8, 0.95)
    for k in s1['state'][0]:
        assert torch.equal(s1['state'][0][k], s2['state'][0][k])
    assert back['inf'] == math.inf and math.isnan(back['nan']) and back['tuple'] == (1, 'a', None)
    np_state = back['np']
    assert np_state[0] == 'MT19937' and np_state[1].dtype == np.uint32
    np.testing.assert_array_equal(np_state[1], state['np'][1])
    assert torch.equal(back['nested'][1][0], torch.arange(3)) and back['nested'][1][1] == {'x': 2.5}
    with pytest.raises(TypeError, match='without pickle'):
        T.save_state(tmp_path / 'bad.safetensors', {'obj': object()})
    from gequiv_timm.hub import save_weights
    save_weights(model, tmp_path / 'w.safetensors', 'linear')
    with pytest.raises(ValueError, match='not a gequiv_timm training-state file'):
        T.load_state(tmp_path / 'w.safetensors')
