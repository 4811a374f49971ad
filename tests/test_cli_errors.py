"""User errors of the ``gequiv-timm`` command, as a class: one line naming the problem and the fix, a non-zero exit
code, no traceback, and before any work.

* a table of argv cases (every case of issue 15 and what fuzzing found), run through :func:`gequiv_timm.cli.main`
  in-process, with the heavy work (training, the comparison's timing, fitting / drawing, card writing) replaced by
  a tripwire: reaching it fails the test, so "refused" also means "refused before any work";
* a few of them through a real ``python -m gequiv_timm.cli`` process (what a shell or CI sees);
* ``--debug`` shows the traceback instead;
* every option of every subcommand, discovered from the parser, with bad values: never a traceback; a number
  option refuses -1, nan, +-inf, a non-number and an empty value;
* unwritable and full output locations at the command level: refused before work, or (a disk that fills during
  training) the weights saved elsewhere and the error says where.
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gequiv_timm  # noqa: F401
import gequiv_timm.compare as C
import gequiv_timm.hub as H
import gequiv_timm.training.recipe as R
import gequiv_timm.viz as V
from gequiv_timm.cli import build_parser, main
from gequiv_timm.data.catalog import DATASETS, DataBundle
from gequiv_timm.training import TrainingDiverged
from gequiv_timm.weights import load_weights, read_metadata

ROOT = os.geteuid() == 0
SMALL = ['--max-steps', '1', '--limit-train', '32', '--limit-eval', '16', '--no-progress', '--device', 'cpu']


class WorkStarted(Exception):
    """The command got past its checks and started working."""


def _started(*a, **k):
    raise WorkStarted()


@pytest.fixture
def no_work(monkeypatch):
    """Tripwires on the work every command does after its checks."""
    for mod, name in ((R, 'train'), (C, '_measure_costs'), (V, '_fit'), (V, 'plot_stn'), (H, 'write_cards')):
        monkeypatch.setattr(mod, name, _started)


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output a case accepts lands here
    (tmp_path / 'afile').write_text('not a folder')
    (tmp_path / 'adir').mkdir()
    (tmp_path / 'adir.safetensors').mkdir()
    (tmp_path / 'rep.md').mkdir()
    (tmp_path / 'notjson.json').write_text('{"truncated": ')
    (tmp_path / 'list.json').write_text('[1, 2]')
    (tmp_path / 'garbage.safetensors').write_bytes(b'\x00' * 64)
    ro = tmp_path / 'ro'
    ro.mkdir()
    if ROOT:  # chmod does not stop root: a read-only bind of the folder where mounting works, else /sys
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=16k', 'tmpfs', str(ro)], capture_output=True)
        if r.returncode:
            ro = Path('/sys')
    else:
        ro.chmod(0o500)
    yield {'tmp': str(tmp_path), 'ro': str(ro)}
    if ROOT and str(ro) != '/sys':
        subprocess.run(['umount', str(ro)], capture_output=True)
    elif not ROOT:
        ro.chmod(0o700)


def _one_line_error(rc, out, err, code, match):
    assert 'Traceback' not in out + err, err
    assert rc == code, (rc, err)
    ours = [ln for ln in err.splitlines() if ln.startswith('gequiv-timm')]
    assert len(ours) == 1, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 3, err
    assert re.search(match, ours[0]), (match, ours[0])


# (id, argv with {tmp} / {ro}, exit code, what the one line must say)
CASES = [
    # issue 15, item 12
    ('export-missing-checkpoint', ['export', 'gequiv_p4cnn', '{tmp}/e', '--checkpoint', '/missing.safetensors'], 2,
     r'--checkpoint /missing\.safetensors: no such weights file'),
    ('export-bogus-model-arg', ['export', 'gequiv_p4cnn.rotmnist', '{tmp}/e', '--model-arg', 'bogus=1'], 2,
     r'unknown model argument bogus for gequiv_p4cnn \(--model-arg\); it accepts .*widths'),
    ('train-bogus-model-kwarg', ['train', 'gequiv_p4cnn', '--model-kwargs', 'bogus=1', *SMALL], 2,
     r'unknown model argument bogus for gequiv_p4cnn \(--model-kwargs\)'),
    ('train-num-classes-below-data', ['train', 'gequiv_p4cnn', '--num-classes', '3', *SMALL], 2,
     r'--num-classes 3 is fewer than the 10 classes of rotmnist.*give at least 10'),
    ('check-manifest-not-json', ['check', '--manifest', '{tmp}/notjson.json'], 2, r'notjson\.json: not valid JSON'),
    ('compare-lr-negative', ['compare', '--lr', '-1'], 2, r'--lr must be a positive finite number, got -1'),
    ('compare-timing-reps-0', ['compare', '--timing-reps', '0'], 2, r'--timing-reps must be at least 1'),
    ('compare-sweep-digits-negative', ['compare', '--sweep-digits', '-1'], 2, r'--sweep-digits must be in \[1, 1000\]'),
    ('compare-threads-negative', ['compare', '--threads', '-1'], 2, r'--threads must be >= 0'),
    ('compare-batch-size-0', ['compare', '--batch-size', '0'], 2, r'--batch-size must be at least 1, got 0'),
    ('stn-viz-num-negative', ['stn-viz', '--num', '-3', '--out', '{tmp}/s.png'], 2, r'--num must be at least 1'),
    # issue 15, item 13
    ('check-manifest-missing', ['check', '--manifest', '/typo.json'], 2, r'--manifest /typo\.json: no such'),
    ('check-manifest-folder', ['check', '--manifest', '{tmp}/adir'], 2, r'is a folder'),
    ('check-manifest-not-a-mapping', ['check', '--manifest', '{tmp}/list.json'], 2, r'list\.json: expected a JSON'),
    # issue 15, item 11: output locations, refused before any work
    ('train-out-under-a-file', ['train', 'gequiv_p4cnn', '--out', '{tmp}/afile/x.safetensors', *SMALL], 2,
     r'--out .*afile/x\.safetensors: .*afile is a file, not a folder'),
    ('train-out-is-a-folder', ['train', 'gequiv_p4cnn', '--out', '{tmp}/adir.safetensors', *SMALL], 2,
     r'is a folder, not a file'),
    ('train-out-readonly', ['train', 'gequiv_p4cnn', '--out', '{ro}/x.safetensors', *SMALL], 2,
     r'--out .*x\.safetensors: cannot write in the folder'),
    ('train-checkpoint-dir-is-a-file', ['train', 'gequiv_p4cnn', '--checkpoint-dir', '{tmp}/afile', *SMALL], 2,
     r'--checkpoint-dir .*afile: is a file, not a folder'),
    ('train-checkpoint-dir-readonly', ['train', 'gequiv_p4cnn', '--checkpoint-dir', '{ro}/ck', *SMALL], 2,
     r'--checkpoint-dir .*: cannot write'),
    ('train-metrics-log-is-a-folder', ['train', 'gequiv_p4cnn', '--metrics-log', '{tmp}/adir', *SMALL], 2,
     r'--metrics-log .*adir: is a folder'),
    ('train-manifest-readonly', ['train', 'gequiv_p4cnn', '--out', '{tmp}/w.safetensors', '--tag', 't',
                                 '--manifest', '{ro}/m.json', *SMALL], 2, r'--manifest .*m\.json: cannot write'),
    ('train-manifest-broken', ['train', 'gequiv_p4cnn', '--out', '{tmp}/w.safetensors', '--tag', 't',
                               '--manifest', '{tmp}/notjson.json', *SMALL], 2, r'notjson\.json: not valid JSON'),
    ('export-dir-is-a-file', ['export', 'gequiv_p4cnn.rotmnist', '{tmp}/afile'], 2, r'DIR .*afile: is a file'),
    ('export-dir-readonly', ['export', 'gequiv_p4cnn.rotmnist', '{ro}/e'], 2, r'DIR .*: cannot write'),
    ('push-export-dir-is-a-file', ['push', 'gequiv_p4cnn.rotmnist', '--dry-run', '--export-dir', '{tmp}/afile'], 2,
     r'--export-dir .*afile: is a file'),
    ('stn-viz-out-under-a-file', ['stn-viz', '--out', '{tmp}/afile/s.png'], 2, r'--out .*afile is a file'),
    ('stn-viz-out-is-a-folder', ['stn-viz', '--out', '{tmp}/adir'], 2, r'--out .*adir: is a folder'),
    ('stn-viz-out-not-png', ['stn-viz', '--out', '{tmp}/s.jpg'], 2, r'must end in \.png'),
    ('compare-out-is-a-file', ['compare', '--out', '{tmp}/afile'], 2, r'--out .*afile: is a file'),
    ('compare-out-readonly', ['compare', '--out', '{ro}/c'], 2, r'--out .*: cannot write'),
    ('compare-report-name-is-a-folder', ['compare', '--out', '{tmp}', '--name', 'rep'], 2, r'rep\.md: is a folder'),
    # found by fuzzing the options (and reading what each one does with odd values)
    ('train-unknown-model', ['train', 'gequiv_nope', *SMALL], 2, r"unknown model 'gequiv_nope'"),
    ('train-kwargs-not-key-value', ['train', 'gequiv_p4cnn', '--model-kwargs', 'x', *SMALL], 2,
     r'--model-kwargs expects key=value'),
    ('train-kwargs-num-classes', ['train', 'gequiv_p4cnn', '--model-kwargs', 'num_classes=3', *SMALL], 2,
     r'use --num-classes instead'),
    ('train-kwargs-checkpoint-path', ['train', 'gequiv_p4cnn', '--model-kwargs', 'checkpoint_path="/x"', *SMALL], 2,
     r'use --initial-checkpoint instead'),
    ('train-kwargs-rejected-value', ['train', 'gequiv_p4cnn', '--model-kwargs', 'global_pool="x"', *SMALL], 2,
     r"--model-kwargs: gequiv_p4cnn rejects \{'global_pool': 'x'\}"),
    # the arguments every timm model takes, also where a timm backbone sits behind a new stem (it was a torch
    # traceback for in_chans=0 and a silent build for drop_rate=2)
    ('train-stem-in-chans-0', ['train', 'gequiv_p4_resnet18', '--model-kwargs', 'in_chans=0', *SMALL], 2,
     r"--model-kwargs: gequiv_p4_resnet18 rejects \{'in_chans': 0\}: in_chans must be an int >= 1, got 0$"),
    ('train-stem-drop-rate-2', ['train', 'gequiv_p4_resnet18', '--model-kwargs', 'drop_rate=2', *SMALL], 2,
     r"gequiv_p4_resnet18 rejects \{'drop_rate': 2\}: drop_rate must be a finite number in \[0\.0, 1\.0\), got 2$"),
    ('train-stem-drop-rate-neg', ['train', 'gequiv_p4_resnet18', '--model-kwargs', 'drop_rate=-1', *SMALL], 2,
     r"drop_rate must be a finite number in \[0\.0, 1\.0\), got -1$"),
    ('train-stem-drop-path-rate', ['train', 'gequiv_p4_convnext_tiny', '--model-kwargs', 'drop_path_rate=2', *SMALL],
     2, r"drop_path_rate must be a finite number in \[0\.0, 1\.0\), got 2$"),
    ('train-pde-stem-in-chans-0', ['train', 'gequiv_pde_resnet18', '--model-kwargs', 'in_chans=0', *SMALL], 2,
     r"gequiv_pde_resnet18 rejects \{'in_chans': 0\}: in_chans must be an int >= 1, got 0$"),
    # a limit larger than the set is refused with the set's size (it silently used the whole set)
    ('train-limit-train-over-set', ['train', 'gequiv_p4cnn', '--data', 'rotmnist-upright', *SMALL,
                                    '--limit-train', '99999'], 2,
     r"--limit-train\) 99999 is more than the [\d,]+ samples of rotmnist-upright's training set; pass at most \d+"),
    ('train-limit-eval-over-set', ['train', 'gequiv_p4cnn', '--data', 'rotmnist-upright', *SMALL,
                                   '--limit-eval', '99999'], 2,
     r"--limit-eval\) 99999 is more than the [\d,]+ samples of rotmnist-upright's evaluation set; pass at most \d+"),
    ('train-unknown-opt', ['train', 'gequiv_p4cnn', '--opt', 'bogus', *SMALL], 2, r'--opt bogus: .*list_optimizers'),
    ('train-unknown-sched', ['train', 'gequiv_p4cnn', '--sched', 'bogus', *SMALL], 2, r'--sched bogus'),
    ('train-sched-needs-epochs', ['train', 'gequiv_p4cnn', '--sched', 'plateau', *SMALL], 2, r'--sched plateau'),
    ('train-missing-initial-checkpoint', ['train', 'gequiv_p4cnn', '--initial-checkpoint', '/m.safetensors', *SMALL],
     2, r'--initial-checkpoint /m\.safetensors: no such'),
    ('train-resume-missing-folder', ['train', 'gequiv_p4cnn', '--resume', '{tmp}/nope', *SMALL], 2,
     r'--resume .*nope: no such folder'),
    ('train-fp16-on-cpu', ['train', 'gequiv_p4cnn', '--amp', 'fp16', *SMALL], 2, r'--amp fp16 needs a CUDA device'),
    ('train-unknown-data', ['train', 'gequiv_p4cnn', '--data', '{tmp}/nope', *SMALL], 2, r'--data'),
    ('train-empty-data', ['train', 'gequiv_p4cnn', '--data', '', *SMALL], 2, r'argument --data: an empty value'),
    ('train-empty-out', ['train', 'gequiv_p4cnn', '--out', '', *SMALL], 2, r'argument --out: an empty value'),
    ('train-bad-float', ['train', 'gequiv_p4cnn', '--lr', 'x', *SMALL], 2, r"argument --lr: invalid float value"),
    ('train-unknown-option', ['train', 'gequiv_p4cnn', '--bogus', *SMALL], 2, r'unrecognized arguments: --bogus'),
    ('unknown-command', ['bogus'], 2, r"invalid choice: 'bogus'"),
    ('export-garbage-checkpoint', ['export', 'gequiv_p4cnn', '{tmp}/e', '--checkpoint', '{tmp}/garbage.safetensors'],
     2, r'garbage\.safetensors: not a readable safetensors file'),
    ('export-checkpoint-is-a-folder', ['export', 'gequiv_p4cnn', '{tmp}/e', '--checkpoint', '{tmp}/adir'], 2,
     r'--checkpoint .*adir: is a folder'),
    ('export-empty-checkpoint', ['export', 'gequiv_p4cnn.rotmnist', '{tmp}/e', '--checkpoint', ''], 2,
     r'argument --checkpoint: an empty value'),
    ('export-unknown-tag', ['export', 'gequiv_p4cnn.nope', '{tmp}/e'], 2, r'gequiv_p4cnn\.nope'),
    ('export-repo-not-org-name', ['export', 'gequiv_p4cnn.rotmnist', '{tmp}/e', '--repo', 'x'], 2,
     r'--repo must be a Hub repo id ORG/NAME'),
    ('push-repo-not-org-name', ['push', 'gequiv_p4cnn.rotmnist', '--dry-run', '--repo', 'a/b/c'], 2,
     r'--repo must be a Hub repo id ORG/NAME'),
    ('push-missing-checkpoint', ['push', 'gequiv_p4cnn.rotmnist', '--dry-run', '--checkpoint', '/m.safetensors'], 2,
     r'--checkpoint /m\.safetensors: no such'),
    ('check-empty-manifest-arg', ['check', '--manifest', ''], 2, r'argument --manifest: an empty value'),
    ('check-write-cards-with-manifest', ['check', '--write-cards', '--manifest', '{tmp}/list.json'], 2,
     r'--write-cards works on the package manifest only'),
    ('compare-unknown-model', ['compare', '--models', 'gequiv_nope', '--out', '{tmp}/c'], 2,
     r"unknown model\(s\) \['gequiv_nope'\]"),
    ('compare-sweep-digits-over', ['compare', '--sweep-digits', '1001'], 2, r'--sweep-digits must be in'),
    ('compare-train-digits-over', ['compare', '--train-digits', '4001'], 2, r'--train-digits must be in \[0, 4000\]'),
    ('compare-lr-nan', ['compare', '--lr', 'nan'], 2, r'--lr must be a positive finite number'),
    ('compare-seed-negative', ['compare', '--seed', '-1'], 2, r'--seed must be in'),
    ('compare-workers-negative', ['compare', '--workers', '-1'], 2, r'--workers must be >= 0'),
    ('compare-name-with-slash', ['compare', '--name', 'a/b'], 2, r'--name must be a plain file name'),
    ('compare-protocol', ['compare', '--protocols', 'sideways'], 2, r'--protocols must be'),
    ('stn-viz-num-0', ['stn-viz', '--num', '0', '--out', '{tmp}/s.png'], 2, r'--num must be at least 1'),
    ('stn-viz-num-over', ['stn-viz', '--num', '1000000', '--out', '{tmp}/s.png'], 2,
     r'num \(--num\) is 1000000, but protocol RTS has \d+ test images'),
    ('stn-viz-grid-1', ['stn-viz', '--grid', '1', '--out', '{tmp}/s.png'], 2, r'--grid must be in \[2, 64\]'),
    ('stn-viz-not-an-stn', ['stn-viz', '--model', 'gequiv_p4cnn', '--out', '{tmp}/s.png'], 2,
     r'has no spatial transformer'),
    ('stn-viz-missing-checkpoint', ['stn-viz', '--checkpoint', '/m.safetensors', '--out', '{tmp}/s.png'], 2,
     r'--checkpoint /m\.safetensors: no such'),
    ('list-write-without-measure', ['list', '--write'], 2, r'--write stores measurements; add --measure'),
]


def _argv(argv, places):
    return [a.format(**places) for a in argv]


@pytest.mark.parametrize('argv,code,match', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_before_any_work(argv, code, match, places, no_work, capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(_argv(argv, places))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    _one_line_error(rc, out, err, code, match)
    tmp = Path(places['tmp'])
    assert not any(tmp.rglob('*.part')) and not (tmp / 'e').exists() and not (tmp / 's.png').exists()


def test_check_fails_on_a_name_not_in_the_manifest_and_passes_an_empty_manifest(tmp_path, capsys):
    assert main(['check', 'gequiv_nope.tag']) == 1  # a failed check: exit 1, a CI gate fails
    err = capsys.readouterr().err
    assert 'gequiv_nope.tag: not in the manifest' in err and 'Traceback' not in err
    empty = tmp_path / 'manifest.json'
    empty.write_text('{}')
    assert main(['check', '--manifest', str(empty)]) == 0  # valid and empty: nothing to check, said so
    assert f'the manifest {empty} lists no checkpoints: nothing to check' in capsys.readouterr().out
    assert main(['check', 'gequiv_p4cnn.rotmnist', '--manifest', str(empty)]) == 1


def test_check_write_cards_refuses_an_unwritable_cards_folder(places, no_work, monkeypatch, capsys):
    cards = Path(places['ro']) / 'cards'
    monkeypatch.setattr(H, 'card_path', lambda name_tag, folder=None: cards / f'{name_tag}.md')
    rc = main(['check', '--write-cards', 'gequiv_p4cnn.rotmnist'])  # write_cards is a tripwire: refused before it
    out, err = capsys.readouterr()
    _one_line_error(rc, out, err, 2, r'--write-cards .*cards: cannot write in the folder')


def test_a_diverging_loss_is_one_line_exit_1(capsys):
    # a real divergence: a learning rate of 1e30 turns the loss into NaN within a few steps
    rc = main(['train', 'gequiv_p4cnn', '--lr', '1e30', '--max-steps', '4', '--batch-size', '16', '--limit-train',
               '64', '--limit-eval', '16', '--no-progress', '--device', 'cpu'])
    out, err = capsys.readouterr()
    _one_line_error(rc, out, err, 1, r'training diverged: the loss is (nan|inf) at step \d+\. Lower the learning')


def test_debug_shows_the_traceback(places, no_work, capsys):
    from gequiv_timm.compare import CompareError
    with pytest.raises(CompareError, match='--lr must be'):
        main(['--debug', 'compare', '--lr', '-1'])
    with pytest.raises(ValueError, match='unknown model argument bogus'):
        main(['train', 'gequiv_p4cnn', '--model-kwargs', 'bogus=1', '--debug'])
    assert main(['compare', '--lr', '-1']) == 2  # and without it, one line
    assert '--lr must be' in capsys.readouterr().err


def test_a_bug_is_not_hidden(monkeypatch):
    # only user-facing errors become one line: a programming error keeps its traceback
    import gequiv_timm.cli.check as check_cli
    monkeypatch.setattr(check_cli, '_manifest', lambda args: (_ for _ in ()).throw(AttributeError('bug')))
    with pytest.raises(AttributeError, match='bug'):
        main(['check'])


SUBPROCESS = {  # ~10 s each on a shared 2-core machine (a fresh interpreter imports torch and timm): two by
    # default, the others under -m slow (the in-process table covers the same cases)
    'check-manifest-missing': ['check', '--manifest', '/typo.json'],
    'train-bogus-model-kwarg': ['train', 'gequiv_p4cnn', '--model-kwargs', 'bogus=1', *SMALL],
    'export-missing-checkpoint': ['export', 'gequiv_p4cnn', 'e', '--checkpoint', '/missing.safetensors'],
    'compare-lr-negative': ['compare', '--lr', '-1'],
}
SLOW_SUBPROCESS = {'export-missing-checkpoint', 'compare-lr-negative'}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SUBPROCESS else n
                                  for n in SUBPROCESS])
def test_user_error_in_a_real_process(name, tmp_path):
    code, match = {c[0]: c[2:] for c in CASES}[name]
    r = subprocess.run([sys.executable, '-m', 'gequiv_timm.cli', *SUBPROCESS[name]], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1'))
    _one_line_error(r.returncode, r.stdout, r.stderr, code, match)
    assert list(tmp_path.iterdir()) == []


def test_debug_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'gequiv_timm.cli', '--debug', 'check', '--manifest', '/typo.json'],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and 'Traceback (most recent call last)' in r.stderr
    assert 'ValueError: --manifest /typo.json: no such manifest file' in r.stderr


# ----- every option of every subcommand, with bad values -----------------------------------------------------------
BASE = {
    'train': ['train', 'gequiv_p4cnn', '--device', 'cpu', '--no-progress'],
    'compare': ['compare', '--models', 'gequiv_p4cnn', '--no-plots', '--no-progress', '--out', '{tmp}/c'],
    'export': ['export', 'gequiv_p4cnn.rotmnist', '{tmp}/e'],
    'push': ['push', 'gequiv_p4cnn.rotmnist', '--dry-run'],
    'check': ['check'],
    'stn-viz': ['stn-viz', '--out', '{tmp}/s.png'],
}
REFUSED_BY_NUMBERS = ['-1', 'nan', 'inf', '-inf', 'x', '']
OTHER_VALUES = ['0', '1e9', '99999999999', '-']


def _options():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for cmd in BASE:
        for act in sub.choices[cmd]._actions:
            if act.option_strings and act.nargs != 0 and act.dest not in ('help', 'debug'):
                out.append((cmd, act.option_strings[-1], act.type in (int, float)))
    return out


OPTIONS = _options()


@pytest.fixture
def fuzz_env(monkeypatch, no_work):
    """Beyond the tripwires: tiny stand-ins for data loading and the export / push / check work."""
    def tiny(name, **k):
        if str(name).lower() not in DATASETS:
            raise ValueError(f'--data {name!r} is neither a built-in set nor a folder')
        return DataBundle(torch.utils.data.TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4).long()), None)

    monkeypatch.setattr(R, 'load_data', tiny)
    for name in ('export', 'push', 'check_entry'):
        monkeypatch.setattr(H, name, _started)
    monkeypatch.setattr(V, '_images', _started)


def test_the_option_table_is_read():
    assert len(OPTIONS) > 60 and ('compare', '--lr', True) in OPTIONS and ('stn-viz', '--num', True) in OPTIONS
    assert ('train', '--out', False) in OPTIONS and ('export', '--checkpoint', False) in OPTIONS


@pytest.mark.parametrize('cmd,option,number', OPTIONS, ids=[f'{c}{o}' for c, o, _ in OPTIONS])
def test_every_option_refuses_bad_values_in_one_line(cmd, option, number, places, fuzz_env, capsys):
    for value in REFUSED_BY_NUMBERS + OTHER_VALUES:
        argv = _argv(BASE[cmd], places) + [option, value]
        threads = torch.get_num_threads()
        try:
            rc = main(argv)
        except WorkStarted:
            rc = None  # accepted: the command got to its work
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        assert 'Traceback' not in out + err, (argv, err)
        assert rc in (None, 0, 1, 2), (argv, rc)
        if number and value in REFUSED_BY_NUMBERS:
            assert rc == 2, (argv, rc, err)
        if rc:
            assert len([ln for ln in err.splitlines() if ln.startswith('gequiv-timm')]) == 1, (argv, err)


# ----- output locations that fail while being written ----------------------------------------------------------
def test_full_disk_after_training_saves_the_weights_elsewhere_and_says_where(tmp_path, monkeypatch, capsys):
    rescue = tmp_path / 'tmp'
    rescue.mkdir()
    monkeypatch.setattr('tempfile.tempdir', str(rescue))
    out_dir = tmp_path / 'out'
    real = R.save_weights

    def full_disk(model, path, *a, **k):  # the disk holding --out filled up during training
        if Path(path).parent == out_dir:
            Path(path).write_bytes(b'half a file')
            raise OSError(28, 'No space left on device')
        return real(model, path, *a, **k)

    monkeypatch.setattr(R, 'save_weights', full_disk)
    rc = main(['train', 'gequiv_p4cnn', '--out', str(out_dir / 'w.safetensors'), '--tag', 't', *SMALL])
    out, err = capsys.readouterr()
    _one_line_error(rc, out, err, 1, r'--out .*w\.safetensors: cannot write \(No space left on device; free some space')
    saved = Path(re.search(r'saved to (\S+) instead', err).group(1))
    assert saved.parent == rescue / 'gequiv-timm-rescue' and saved.name.startswith('gequiv_p4cnn.t-')
    assert read_metadata(saved)['architecture'] == 'gequiv_p4cnn'
    import timm
    load_weights(timm.create_model('gequiv_p4cnn', num_classes=10, in_chans=1), saved)  # strict: every tensor
    assert list(out_dir.iterdir()) == []  # the half-written temporary was removed


def test_a_real_full_disk_after_training(tmp_path, monkeypatch, capsys):
    if not ROOT:
        pytest.skip('mounting a small tmpfs needs root')
    full = tmp_path / 'full'
    full.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(full)]).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        monkeypatch.setattr('tempfile.tempdir', str(tmp_path))
        # gequiv_p4cnn's weights are ~90 KB: the check before training passes (the folder is writable), the write
        # after training fails for real (safetensors reports the full disk in its own error type)
        rc = main(['train', 'gequiv_p4cnn', '--out', str(full / 'w.safetensors'), *SMALL])
        out, err = capsys.readouterr()
        _one_line_error(rc, out, err, 1, r'No space left on device.*saved to .*gequiv-timm-rescue')
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(['umount', str(full)])


def test_export_to_a_full_disk_leaves_no_part_file(tmp_path, capsys):
    if not ROOT:
        pytest.skip('mounting a small tmpfs needs root (tests/test_outputs.py simulates ENOSPC for the writers)')
    full = tmp_path / 'full'
    full.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(full)]).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        rc = main(['export', 'gequiv_p4cnn.rotmnist', str(full / 'e')])  # ~90 KB of weights on a 64 KiB disk
        out, err = capsys.readouterr()
        assert rc != 0 and 'Traceback' not in err and 'No space left on device' in err, err
        assert not [p.name for p in (full / 'e').iterdir() if p.name.endswith('.part')]
    finally:
        subprocess.run(['umount', str(full)])


def test_diverged_is_exit_1_and_a_refusal_exit_2(monkeypatch, capsys):
    # the exit-code rule as a class: the command ran and failed -> 1; it was refused -> 2
    monkeypatch.setattr(R, 'train', lambda *a, **k: (_ for _ in ()).throw(TrainingDiverged(3, float('inf'))))
    assert main(['train', 'gequiv_p4cnn', *SMALL]) == 1
    assert main(['train', 'gequiv_p4cnn', '--lr', '-1', *SMALL]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith('gequiv-timm train: training diverged: the loss is inf at step 3')
    assert err[-1] == 'gequiv-timm train: --lr must be a positive number, got -1.0'
