"""Output locations (:mod:`gequiv_timm.outputs`): checked before any work, written atomically.

Unwritable folders are made for real: ``chmod 0o500`` for a regular user; as root (chmod does not stop root) a
read-only tmpfs mount when the process may mount, else ``/sys`` (root cannot create files there). A full disk is a
real 64 KiB tmpfs when mounting is allowed, and in every case a simulated ``ENOSPC`` from the file's ``write``.
"""
import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from gequiv_timm import outputs
from gequiv_timm.outputs import (
    OutputError,
    atomic_copy,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    check_output_file,
)

ROOT = os.geteuid() == 0


def _mount_tmpfs(where: Path, opts: str) -> bool:
    if not ROOT:
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(where)], capture_output=True)
    return r.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(['umount', str(where)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody here can create files in (see the module docstring for how)."""
    d = tmp_path / 'ro'
    if not ROOT:
        d.mkdir()
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
    elif _mount_tmpfs(d, 'ro,size=64k'):
        yield d
        _umount(d)
    else:
        yield Path('/sys')


@pytest.fixture
def full_dir(tmp_path):
    """A 64 KiB tmpfs (a disk that fills), or skip when this process may not mount one."""
    d = tmp_path / 'full'
    if not _mount_tmpfs(d, 'size=64k'):
        pytest.skip('cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN); simulated ENOSPC covers it')
    yield d
    _umount(d)


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith('.'))


# ----- the checks: one case per kind of bad location, for a file and for a folder ------------------------------
@pytest.fixture
def places(tmp_path, readonly_dir):
    """``{kind: (path, what the message says)}``, shared by the file and the folder checks."""
    (tmp_path / 'afile').write_text('x')
    (tmp_path / 'adir').mkdir()
    return {
        'parent_is_a_file': (tmp_path / 'afile' / 'x.bin', 'is a file, not a folder'),
        'grandparent_is_a_file': (tmp_path / 'afile' / 'sub' / 'x.bin', 'is a file, not a folder'),
        'readonly_folder': (readonly_dir / 'x.bin', 'cannot write in the folder'),
        'readonly_folder_nested': (readonly_dir / 'new' / 'x.bin', 'cannot write in the folder'),
        'empty': ('', 'an empty path'),
        'a_folder_where_a_file_is_wanted': (tmp_path / 'adir', 'is a folder, not a file'),
        'a_file_where_a_folder_is_wanted': (tmp_path / 'afile', 'is a file, not a folder'),
    }


COMMON = ['parent_is_a_file', 'grandparent_is_a_file', 'readonly_folder', 'readonly_folder_nested', 'empty']


def _refused(check, what, path, match, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputError, match=match) as e:
        check(path, what)
    msg = str(e.value)
    assert msg.startswith(what) and '\n' not in msg and isinstance(e.value, ValueError)
    if path:
        assert str(path) in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the check creates nothing


@pytest.mark.parametrize('kind', COMMON + ['a_folder_where_a_file_is_wanted'])
def test_check_output_file_refuses(kind, places, tmp_path):
    _refused(check_output_file, '--out', *places[kind], tmp_path)


@pytest.mark.parametrize('kind', COMMON + ['a_file_where_a_folder_is_wanted'])
def test_check_output_dir_refuses(kind, places, tmp_path):
    _refused(check_output_dir, '--checkpoint-dir', *places[kind], tmp_path)


def test_check_output_file_suffix_and_accepts(tmp_path):
    with pytest.raises(OutputError, match=r'must end in \.safetensors; e\.g\. .*model\.safetensors'):
        check_output_file(tmp_path / 'model.pt', '--out', suffix='.safetensors')
    with pytest.raises(OutputError, match=r'must end in \.csv or \.jsonl'):
        check_output_file(tmp_path / 'log.txt', '--metrics-log', suffix=('.csv', '.jsonl'))
    # accepted: a new file, a file in folders still to be made, an existing file (overwritten later), any case
    existing = tmp_path / 'old.safetensors'
    existing.write_bytes(b'x')
    for p in (tmp_path / 'new.safetensors', tmp_path / 'a' / 'b' / 'c.safetensors', existing,
              tmp_path / 'UP.SAFETENSORS'):
        assert check_output_file(p, '--out', suffix='.safetensors') == p
    assert not (tmp_path / 'a').exists()  # nothing created
    assert _leftovers(tmp_path) == []  # the write probe is removed
    assert check_output_dir(tmp_path, 'DIR') == tmp_path and check_output_dir(tmp_path / 'x' / 'y', 'DIR')
    assert _leftovers(tmp_path) == [] and not (tmp_path / 'x').exists()


# ----- atomic writes ---------------------------------------------------------------------------------------------
def test_atomic_writes_replace_whole_files(tmp_path):
    t = tmp_path / 'sub' / 'a.txt'
    atomic_write_text(t, 'hello')
    assert t.read_text() == 'hello'
    atomic_write_bytes(t, b'world')
    assert t.read_bytes() == b'world'
    umask = os.umask(0)
    os.umask(umask)
    assert (t.stat().st_mode & 0o777) == 0o666 & ~umask  # a shareable file, not mkstemp's 0600
    c = atomic_copy(t, tmp_path / 'b.txt')
    assert c.read_bytes() == b'world'
    assert _leftovers(t.parent) == [] and _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError):  # a missing source is the source's error; nothing is written
        atomic_copy(tmp_path / 'missing', tmp_path / 'c.txt')
    assert not (tmp_path / 'c.txt').exists() and _leftovers(tmp_path) == []


class _FullDisk:
    """A file object whose write stores half of the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize('writer', ['bytes', 'text', 'copy'])
def test_full_disk_keeps_the_old_file_and_leaves_no_temporary(writer, tmp_path, monkeypatch):
    target = tmp_path / 'model.safetensors'
    target.write_bytes(b'old')
    src = tmp_path / 'src.bin'
    src.write_bytes(b'n' * 4096)
    real_open = open

    def full_open(path, mode='r', *a, **k):
        f = real_open(path, mode, *a, **k)
        return _FullDisk(f) if 'w' in mode and Path(path).name.endswith('.part') else f

    monkeypatch.setattr(outputs, 'open', full_open, raising=False)
    with pytest.raises(OutputError) as e:
        if writer == 'bytes':
            atomic_write_bytes(target, b'n' * 4096, '--out')
        elif writer == 'text':
            atomic_write_text(target, 'n' * 4096, '--out')
        else:
            atomic_copy(src, target, '--out')
    msg = str(e.value)
    assert msg.startswith(f'--out {target}: cannot write (No space left on device; free some space'), msg
    assert target.read_bytes() == b'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.safetensors', 'src.bin']


def test_a_real_full_disk(full_dir):
    target = full_dir / 'big.bin'
    with pytest.raises(OutputError, match='No space left on device'):
        atomic_write_bytes(target, b'x' * (1 << 20), '--out')
    assert list(full_dir.iterdir()) == []  # no temporary left filling the disk
    atomic_write_bytes(target, b'small', '--out')  # and the space is free again
    assert target.read_bytes() == b'small'


def test_atomic_path_removes_the_temporary_on_any_error(tmp_path):
    target = tmp_path / 'x.png'
    seen = []
    with pytest.raises(KeyboardInterrupt):  # not an OSError: passed through unchanged
        with atomic_path(target) as tmp:
            tmp.write_bytes(b'half')
            seen.append(tmp)
            raise KeyboardInterrupt
    assert seen and not seen[0].exists() and not target.exists()
    with pytest.raises(OutputError, match='Permission denied'):
        with atomic_path(target, 'out'):
            raise PermissionError(errno.EACCES, 'Permission denied')
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_refused_at_write_time_too(readonly_dir):
    with pytest.raises(OutputError, match='cannot write'):
        atomic_write_text(readonly_dir / f'{uuid.uuid4().hex}.txt', 'x', '--out')
