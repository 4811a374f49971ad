"""One line and an exit code for a user error: the mechanism every subcommand's ``run`` goes through."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Tuple, Type

__all__ = ['USER_ERRORS', 'FAILURES', 'is_user_error', 'exit_code', 'error_line', 'report_error', 'reports_errors']

# Exception types that are the user's to fix (printed as one line). ValueError covers WeightsError, OutputError,
# CatalogError, CheckpointError, StnVizError and JSON decoding errors; OSError covers missing or unreadable inputs.
USER_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, KeyError, OSError, ImportError)
# Names of exception classes meaning "the command ran and failed" (exit 1), wherever they are defined.
FAILURES = frozenset({'ChecksumError', 'PushError', 'TrainingDiverged', 'OutputWriteError'})

_EXTRAS = {'escnn': 'escnn', 'matplotlib': 'bench', 'mlxtend': 'bench', 'tqdm': 'bench'}


def _out_of_memory(e: BaseException) -> bool:
    """torch's CUDA ``OutOfMemoryError``, or the CPU allocator's ``RuntimeError`` (e.g. ``--num-classes 1e11``)."""
    return type(e).__name__ == 'OutOfMemoryError' or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or 'out of memory' in str(e)))


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or type(e).__module__.split('.')[0] == 'gequiv_timm' or \
        any(c.__name__ in FAILURES for c in type(e).__mro__) or _out_of_memory(e)


def exit_code(e: BaseException) -> int:
    """1 for a command that ran and failed (:data:`FAILURES`), 2 for a refused one."""
    return 1 if any(c.__name__ in FAILURES for c in type(e).__mro__) else 2


def error_line(e: BaseException) -> str:
    """The exception as one line: its message (the first line; ``KeyError`` without quotes), plus the fix where the
    type implies one (a missing extra)."""
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    else:
        msg = str(e)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if len(lines) > 1:
        msg += ' (more with --debug)'
    if isinstance(e, ImportError):
        mod = (getattr(e, 'name', None) or '').split('.')[0]
        if mod in _EXTRAS:
            msg += f"; install it with pip install 'gequiv_timm[{_EXTRAS[mod]}]'"
    if _out_of_memory(e):
        msg += '; not enough memory: lower --batch-size or the model size (widths, --num-classes)'
    return msg


def report_error(cmd: str, e: Exception, args=None) -> int:
    """Print ``gequiv-timm CMD: <one line>`` for a user error and return its exit code; re-raise a bug (any other
    exception) or anything under ``--debug``."""
    if getattr(args, 'debug', False) or not is_user_error(e):
        raise e
    print(f"gequiv-timm {cmd}: {error_line(e)}", file=sys.stderr)
    return exit_code(e)


def reports_errors(cmd: str) -> Callable:
    """Decorator for a subcommand's ``run(args) -> int``: a user error becomes one line and an exit code (also when
    ``run`` is called directly, as the tests do); ``args.debug`` shows the traceback instead."""
    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def wrapped(args) -> int:
            try:
                return run(args)
            except Exception as e:  # noqa: BLE001  (report_error re-raises what is not a user error)
                return report_error(cmd, e, args)
        return wrapped
    return wrap
