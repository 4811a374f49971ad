"""Where commands write: check an output location before any work, then write it atomically.

Every command that writes a file or a folder calls :func:`check_output_file` / :func:`check_output_dir` for it
before it starts working (loading data, training, exporting), so a path it cannot write is refused in the first
second, not after an hour of training. The checks look at the file system as it is:

* the target must not be a folder when a file is wanted (nor a file when a folder is wanted);
* the nearest existing folder above it must be a folder (not a file) and writable. Writability is tested by
  creating and removing a temporary file there, which also catches read-only mounts and ACLs that
  ``os.access`` does not see. Missing folders below it are not created by the check (the writer creates them).

Writes go through :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_copy` or, for a writer
that wants a path (safetensors, matplotlib), :func:`atomic_path`: the data goes to a temporary file in the target
folder, is flushed and ``fsync``-ed, then moved over the target with ``os.replace``. A reader (or a crash) sees
the old file or the new one, never a half-written one, and on any failure (a full disk, ``ENOSPC``; an
interrupt) the temporary file is removed.

Every problem is an :class:`OutputError` (a ``ValueError``) with one line naming the option, the path and the fix;
a write that fails while being done is its subclass :class:`OutputWriteError`.

This module is pure standard library (rank 0 of the import rule): any room may use it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

__all__ = ['OutputError', 'OutputWriteError', 'check_output_file', 'check_output_dir', 'atomic_path',
           'atomic_write_bytes', 'atomic_write_text', 'atomic_copy', 'describe_os_error']

PathLike = Union[str, 'os.PathLike[str]']

_FIX = {
    errno.ENOSPC: 'free some space or choose another location',
    errno.EDQUOT: 'free some space (disk quota) or choose another location',
    errno.EROFS: 'the file system is read-only; choose another location',
    errno.EACCES: 'choose a folder you can write to (or fix its permissions)',
    errno.EPERM: 'choose a folder you can write to (or fix its permissions)',
    errno.ENAMETOOLONG: 'choose a shorter path',
}


class OutputError(ValueError):
    """An output location that cannot be written; the message names the option, the path and the fix. Raised as
    such by the checks (before any work: the command is refused)."""


class OutputWriteError(OutputError):
    """A write that failed while being done (a disk that filled up, a folder made read-only meanwhile): the work
    ran, its output could not be stored. Raised by the atomic writers; the command failed (exit code 1)."""


def _label(what: str, path) -> str:
    return f"{what} {path}" if what else str(path)


def describe_os_error(e: OSError) -> str:
    """``'No space left on device; free some space or choose another location'`` for an ``OSError``."""
    reason = e.strerror or str(e) or type(e).__name__
    fix = _FIX.get(e.errno or -1, 'choose another location')
    return f"{reason}; {fix}"


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing path at or above ``path`` (absolute)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, label: str) -> None:
    """Create and remove a temporary file in ``folder``; :class:`OutputError` when that fails."""
    try:
        fd, tmp = tempfile.mkstemp(prefix='.gequiv-write-test-', dir=folder)
    except OSError as e:
        raise OutputError(f"{label}: cannot write in the folder {folder} ({describe_os_error(e)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _check_parent(path: Path, label: str) -> None:
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise OutputError(f"{label}: {base} is a file, not a folder; choose a path whose parent folders are "
                          f"folders (or move that file away)")
    _probe_writable(base, label)


def _first(suffix) -> str:
    if suffix is None:
        return ''
    return suffix if isinstance(suffix, str) else (tuple(suffix) or ('',))[0]


def _with_suffix(p: Path, suffix: str) -> Path:
    try:
        return p.with_suffix(suffix)
    except ValueError:
        return p.with_name(p.name + suffix)


def check_output_file(path: PathLike, what: str = '', suffix: Union[None, str, Sequence[str]] = None) -> Path:
    """Check that a file can be written at ``path`` (before any work); returns it as a ``Path``.

    ``what`` names the option in the message (``'--out'``); ``suffix`` (``'.png'`` or a sequence of them) is the
    file name ending required. Raises :class:`OutputError` when ``path`` is a folder, a parent is a file, the
    nearest existing folder is not writable or the suffix is wrong. Nothing is created.
    """
    if path is None or str(path) == '':
        raise OutputError(f"{what or 'output file'}: an empty path; give a file name")
    p = Path(path)
    label = _label(what, p)
    if p.is_dir():
        raise OutputError(f"{label}: is a folder, not a file; give a file name inside it, e.g. "
                          f"{p / ('out' + _first(suffix))}")
    if suffix is not None:
        allowed = (suffix,) if isinstance(suffix, str) else tuple(suffix)
        if not p.name.lower().endswith(tuple(s.lower() for s in allowed)):
            raise OutputError(f"{label}: the file name must end in {' or '.join(allowed)}; e.g. "
                              f"{_with_suffix(p, allowed[0])}")
    if os.path.lexists(p) and not p.is_file():
        raise OutputError(f"{label}: exists and is not a regular file; choose another name")
    _check_parent(p, label)
    return p


def check_output_dir(path: PathLike, what: str = '') -> Path:
    """Check that ``path`` is (or can be made) a writable folder (before any work); returns it as a ``Path``.

    Raises :class:`OutputError` when ``path`` is a file, a parent is a file or the nearest existing folder is not
    writable. Nothing is created (the writer creates the folder).
    """
    if path is None or str(path) == '':
        raise OutputError(f"{what or 'output folder'}: an empty path; give a folder")
    p = Path(path)
    label = _label(what, p)
    if os.path.lexists(p) and not p.is_dir():
        raise OutputError(f"{label}: is a file, not a folder; give a folder (it is created if missing)")
    if p.is_dir():
        _probe_writable(p, label)
    else:
        _check_parent(p, label)
    return p


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shareable(path, mode: Optional[int]) -> None:
    """Temporary files are created owner-only (0600); give the result the mode a new file gets under the umask
    (0644 under umask 022), or ``mode`` when given."""
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(path, mode)


def _as_os_error(e: BaseException) -> Optional[OSError]:
    """``e`` as an ``OSError``: itself, or one rebuilt from a writer that reports the operating system's error in
    its text (safetensors: ``I/O error: No space left on device (os error 28)``); else None."""
    if isinstance(e, OSError):
        return e
    m = re.search(r'\(os error (\d+)\)', str(e)) if isinstance(e, Exception) else None
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextlib.contextmanager
def atomic_path(path: PathLike, what: str = '', mode: Optional[int] = None) -> Iterator[Path]:
    """``with atomic_path('x.safetensors') as tmp: save_file(state, tmp)``: a temporary path in the target's
    folder (created if missing) for a writer that wants a path; when the block ends without an error the file is
    ``fsync``-ed and moved over ``path``. On any error the temporary file is removed; an ``OSError`` (or a
    writer's error carrying one, as safetensors reports a full disk) becomes an :class:`OutputWriteError` naming
    ``what`` and ``path``."""
    p = Path(path)
    label = _label(what, p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{p.name}.', suffix='.part', dir=p.parent)
        os.close(fd)
    except OSError as e:
        raise OutputWriteError(f"{label}: cannot write ({describe_os_error(e)})") from e
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        _shareable(tmp, mode)
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os_error = _as_os_error(e)
        if os_error is not None:
            raise OutputWriteError(f"{label}: cannot write ({describe_os_error(os_error)})") from e
        raise
    _fsync_dir(p.parent)


def atomic_write_bytes(path: PathLike, data: bytes, what: str = '', mode: Optional[int] = None) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, ``fsync``, ``os.replace``)."""
    with atomic_path(path, what, mode) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
    return Path(path)


def atomic_write_text(path: PathLike, text: str, what: str = '', encoding: str = 'utf-8',
                      mode: Optional[int] = None) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding), what, mode)


def atomic_copy(src: PathLike, dst: PathLike, what: str = '', mode: Optional[int] = None) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (see :func:`atomic_write_bytes`)."""
    with open(src, 'rb') as fi:  # a missing source is the source's error, raised before anything is written
        with atomic_path(dst, what, mode) as tmp:
            with open(tmp, 'wb') as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
    return Path(dst)
