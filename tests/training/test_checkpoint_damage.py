"""Checkpoints that can be trusted (issue 15, items 8 and 10).

* Damage: every kind of damaged file in the newest checkpoint is caught by the verification (manifest sizes and
  sha256, every file read back) and ``--resume`` continues from the newest intact one, saying which one it skipped
  and why, to the same weights as an uninterrupted run; none intact, or a damaged folder the user named, is one
  clear error.
* kill -9: a process killed while a checkpoint is written (weights, state, manifest, rename) or while an old one
  is pruned leaves no half-deleted step folder; the next run removes the leftovers and ends bit-identical.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gequiv_timm.training as T
from gequiv_timm.cli import main
from gequiv_timm.training.checkpoint import CheckpointCorruptError, verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# 96 digits, batch 16: 6 steps per epoch, 12 in all; checkpoints at 3, 6, 9, 12 (every 3 and at epoch ends)
COMMON = ['train', 'gequiv_p4cnn', '--epochs', '2', '--batch-size', '16', '--limit-train', '96', '--limit-eval', '40',
          '--threads', '1', '--device', 'cpu', '--no-progress', '--model-kwargs', 'widths=[4,4,4]', '--log-every', '1',
          '--seed', '3', '--checkpoint-every', '3']


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume: max {(a[k].float() - b[k].float()).abs().max()}"


def _clean(ck: Path, keep: int):
    """Only ``latest`` and ``keep`` intact step folders are left in ``ck``."""
    names = sorted(p.name for p in ck.iterdir())
    steps = [n for n in names if n != 'latest']
    assert names == sorted(steps + ['latest']) and len(steps) == keep, names
    assert T.CheckpointManager(ck).leftovers() == []
    for n in steps:
        assert n.startswith('step_') and not n.endswith('.tmp')
        verify_checkpoint(ck / n)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run with 3 kept checkpoints: its final weights and its checkpoint folder (6, 9, 12)."""
    base = tmp_path_factory.mktemp('ref')
    assert main(COMMON + ['--checkpoint-dir', str(base / 'ck'), '--keep-checkpoints', '3',
                          '--out', str(base / 'ref.safetensors')]) == 0
    assert [p.name for p in T.CheckpointManager(base / 'ck').complete()] == [
        'step_00000006', 'step_00000009', 'step_00000012']
    return load_file(str(base / 'ref.safetensors')), base / 'ck'


# ----- damage: one function per kind, each returning the file the verification must name --------------------------
def _truncate(name):
    def damage(folder: Path) -> str:
        f = folder / name
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
        return name
    return damage


def _flip_last_byte(folder: Path) -> str:
    f = folder / 'model.safetensors'
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x40  # a bit of the last tensor: the file still parses, only the sha256 tells
    f.write_bytes(bytes(raw))
    load_file(str(f))
    return 'model.safetensors'


def _delete(name):
    def damage(folder: Path) -> str:
        (folder / name).unlink()
        return name
    return damage


def _garble_manifest(folder: Path) -> str:
    f = folder / 'manifest.json'
    f.write_text(f.read_text()[:40])
    return 'manifest.json'


def _manifest_lies(folder: Path) -> str:
    """A manifest without the RNG file: a checkpoint that cannot restore the random state is not intact."""
    f = folder / 'manifest.json'
    data = json.loads(f.read_text())
    del data['files']['rng-rank0.safetensors']
    f.write_text(json.dumps(data))
    return 'rng-rank0.safetensors'


DAMAGE = {
    'truncated state': _truncate('state.safetensors'),
    'truncated rng': _truncate('rng-rank0.safetensors'),
    'truncated weights': _truncate('model.safetensors'),
    'flipped weight bit': _flip_last_byte,
    'missing rng': _delete('rng-rank0.safetensors'),
    'missing state': _delete('state.safetensors'),
    'missing manifest': _delete('manifest.json'),
    'garbled manifest': _garble_manifest,
    'manifest without rng': _manifest_lies,
}


@pytest.mark.parametrize('kind', list(DAMAGE))
def test_verification_names_the_damaged_file(kind, reference, tmp_path):
    folder = tmp_path / 'step_00000012'
    shutil.copytree(reference[1] / 'step_00000012', folder)
    verify_checkpoint(folder)  # intact before
    name = DAMAGE[kind](folder)
    with pytest.raises(CheckpointCorruptError) as info:
        verify_checkpoint(folder)
    assert info.value.file == name and info.value.folder == folder
    assert isinstance(info.value, ValueError) and '\n' not in str(info.value)


@pytest.mark.parametrize('kind', ['truncated state', 'truncated rng', 'flipped weight bit', 'garbled manifest'])
def test_resume_skips_a_damaged_newest_checkpoint(kind, reference, tmp_path, capsys):
    ref, src = reference
    ck = tmp_path / 'ck'
    shutil.copytree(src, ck)
    name = DAMAGE[kind](ck / 'step_00000012')
    DAMAGE['truncated state'](ck / 'step_00000009')  # the two newest are damaged: resume from the third
    out = tmp_path / 'resumed.safetensors'
    capsys.readouterr()
    assert main(COMMON + ['--checkpoint-dir', str(ck), '--resume', '--out', str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    skipped = [x for x in err if x.startswith('resume: skipping damaged checkpoint')]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"resume: skipping damaged checkpoint {ck / 'step_00000012'} ({name}: ")
    assert skipped[1].startswith(f"resume: skipping damaged checkpoint {ck / 'step_00000009'} (state.safetensors: ")
    assert any(x.startswith(f"resumed from {ck / 'step_00000006'} (step 6,") for x in err)
    _assert_same(load_file(str(out)), ref)
    _clean(ck, 2)  # the damaged ones were replaced (12) or pruned (9)


def test_no_intact_checkpoint_and_a_damaged_named_folder_are_one_line_errors(reference, tmp_path, capsys):
    ck = tmp_path / 'ck'
    shutil.copytree(reference[1], ck)
    for step in (6, 9, 12):
        DAMAGE['truncated rng'](ck / f'step_{step:08d}')
    capsys.readouterr()
    assert main(COMMON + ['--checkpoint-dir', str(ck), '--resume']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([x for x in err if 'skipping damaged' in x]) == 3
    assert err[-1].startswith(f'gequiv-timm train: resume: no intact checkpoint in {ck} (')
    assert 'step_00000006: rng-rank0.safetensors: ' in err[-1] and 'new --checkpoint-dir' in err[-1]
    with pytest.raises(T.NoIntactCheckpointError):
        T.CheckpointManager(ck).newest_intact()

    # a folder the user named is used or refused, never replaced by another one
    ck2 = tmp_path / 'ck2'
    shutil.copytree(reference[1], ck2)
    DAMAGE['flipped weight bit'](ck2 / 'step_00000012')
    assert main(COMMON + ['--resume', str(ck2 / 'step_00000012')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'resumed from' not in err[0]
    assert err[0] == (f"gequiv-timm train: resume: checkpoint {ck2 / 'step_00000012'} is damaged: model.safetensors: "
                      f"sha256 differs from the manifest's (the bytes changed). Resume from an older checkpoint "
                      f"(--resume {ck2 / 'step_00000009'})")
    # naming the root instead is like --resume with --checkpoint-dir: the newest intact one, said aloud
    out = tmp_path / 'r.safetensors'
    assert main(COMMON + ['--max-steps', '10', '--resume', str(ck2), '--out', str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {ck2 / 'step_00000012'} (model.safetensors: sha256" in err
    assert f"resumed from {ck2 / 'step_00000009'} (step 9," in err


def test_checkpoint_from_an_older_version_is_named_as_such(reference, tmp_path):
    folder = tmp_path / 'step_00000012'
    shutil.copytree(reference[1] / 'step_00000012', folder)
    (folder / 'manifest.json').unlink()
    st = T.load_state(folder / 'state.safetensors')
    st['format'] = 'gequiv_timm.train/1'
    T.save_state(folder / 'state.safetensors', st)
    with pytest.raises(CheckpointCorruptError, match=r'older gequiv_timm \(checkpoint format gequiv_timm.train/1'):
        verify_checkpoint(folder)


# ----- kill -9 while writing and while pruning --------------------------------------------------------------------
# The child trains the same run with one checkpoint function wrapped (test-only, in the child script: the package
# has no crash hooks) so that it SIGKILLs itself at one moment of the step-9 checkpoint.
KILL_STEP = 9
_CHILD = r"""
import os, shutil, signal, sys
from pathlib import Path
import gequiv_timm.training.checkpoint as C

point, step = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def half(path):
    p = Path(path)
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])

if point == 'weights':  # the weights file half written
    real_w = C.save_weights
    def save_weights(model, path, *a, **k):
        out = real_w(model, path, *a, **k)
        if k['extra']['step'] == str(step):
            half(path); die()
        return out
    C.save_weights = save_weights
elif point == 'state':  # the state file half written
    real_s = C.save_state
    def save_state(path, state):
        real_s(path, state)
        if Path(path).name == 'state.safetensors' and state['step'] == step:
            half(path); die()
    C.save_state = save_state
elif point == 'manifest':  # the manifest (the last file) half written
    real_m = C._write_manifest
    def write_manifest(folder, s):
        if s == step:
            (Path(folder) / 'manifest.json').write_text('{"format": "gequiv_timm.tr'); die()
        real_m(folder, s)
    C._write_manifest = write_manifest
elif point == 'rename':  # the new folder in place, `latest` not yet updated
    real_r = os.replace
    def replace(src, dst):
        real_r(src, dst)
        if Path(dst).name == f'step_{step:08d}':
            die()
    os.replace = replace
elif point == 'prune':  # pruning step 3 (after step 9 was published): one file deleted, then the kill
    real_t = shutil.rmtree
    def rmtree(path, *a, **k):
        if 'step_00000003' in str(path):
            sorted(Path(path).iterdir())[0].unlink(); die()
        real_t(path, *a, **k)
    shutil.rmtree = rmtree
else:
    raise SystemExit(f'unknown kill point {point}')

from gequiv_timm.cli import main
sys.exit(main(sys.argv[3:]))
"""
POINTS = {  # kill point -> (the newest intact checkpoint after the kill, what the kill leaves behind)
    'weights': (6, 'step_00000009.tmp'),
    'state': (6, 'step_00000009.tmp'),
    'manifest': (6, 'step_00000009.tmp'),
    'rename': (9, None),
    'prune': (9, '.trash-step_00000003-'),
}


@pytest.fixture(scope='module')
def killed(tmp_path_factory):
    """Every kill point's child process, started together (they import torch at the same time)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    runs = {}
    for point in POINTS:
        d = tmp_path_factory.mktemp(f'kill-{point}')
        args = COMMON + ['--checkpoint-dir', str(d / 'ck'), '--out', str(d / 'never.safetensors')]
        runs[point] = (d, subprocess.Popen([sys.executable, '-c', _CHILD, point, str(KILL_STEP)] + args, env=env,
                                           cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield runs
    for _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize('point', list(POINTS))
def test_kill9_while_checkpointing_then_resume_is_bit_identical(point, killed, reference, capsys):
    d, proc = killed[point]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    ck = d / 'ck'
    assert not (d / 'never.safetensors').exists()
    newest, leftover = POINTS[point]
    names = sorted(p.name for p in ck.iterdir())
    if leftover:  # the kill happened where it was meant to
        assert any(n.startswith(leftover) for n in names), names
    assert not (ck / 'step_00000003').exists() or point != 'prune'  # never a half-deleted step folder
    assert T.CheckpointManager(ck).newest_intact().name == f'step_{newest:08d}'

    out = d / 'resumed.safetensors'
    capsys.readouterr()
    assert main(COMMON + ['--checkpoint-dir', str(ck), '--resume', '--out', str(out)]) == 0
    err = capsys.readouterr().err
    if leftover:
        assert f'removed leftovers of an interrupted write or prune in {ck}: {leftover}' in err
    assert f"resumed from {ck / f'step_{newest:08d}'} (step {newest}," in err
    _assert_same(load_file(str(out)), reference[0])
    _clean(ck, 2)
