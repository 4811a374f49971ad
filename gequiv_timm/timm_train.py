"""Run timm's own ``train.py`` (or ``validate.py`` / ``inference.py``) with the ``gequiv_`` models registered.

timm's training scripts live in the timm *source repository*, not in the installed wheel, and they only know the
models registered before they read ``--model``. This entry point imports :mod:`gequiv_timm` (which registers every
catalog entry with timm), then runs the script as ``__main__`` with the remaining arguments, so every option of
the script works unchanged, including under ``torchrun``::

    git clone --branch v$(python -c "import timm; print(timm.__version__)") \\
        https://github.com/huggingface/pytorch-image-models
    gequiv-timm-train pytorch-image-models/train.py /data/digits --model gequiv_p4cnn --in-chans 1 \\
        --num-classes 10 --input-size 1 28 28 --mean 0.1307 --std 0.3081 --hflip 0 --epochs 20
    torchrun --nproc_per_node=2 -m gequiv_timm.timm_train pytorch-image-models/train.py /data/digits ...

The script may also be named by the environment variable ``TIMM_TRAIN_SCRIPT`` (then every argument goes to
it). ``python -m gequiv_timm.timm_train`` is the same as ``gequiv-timm-train``.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ['main']

USAGE = """usage: gequiv-timm-train PATH/TO/train.py [arguments of that script ...]
       TIMM_TRAIN_SCRIPT=PATH/TO/train.py gequiv-timm-train [arguments ...]

Runs one of timm's scripts (train.py, validate.py, inference.py) with the gequiv_ models registered.
timm's scripts are not part of the timm package: get the ones matching your timm ({version}) with
    git clone --branch v{version} https://github.com/huggingface/pytorch-image-models
"""


def _usage() -> str:
    try:
        import timm
        version = timm.__version__
    except ImportError:  # pragma: no cover
        version = 'your timm version'
    return USAGE.format(version=version)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``gequiv-timm-train``; returns the script's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ('-h', '--help') and not os.environ.get('TIMM_TRAIN_SCRIPT'):
        print(_usage())
        return 0
    if argv and argv[0].endswith('.py'):
        script = argv.pop(0)
    else:
        script = os.environ.get('TIMM_TRAIN_SCRIPT', '')
    if not script:
        print(_usage(), file=sys.stderr)
        print("gequiv-timm-train: name timm's train.py first (or set TIMM_TRAIN_SCRIPT)", file=sys.stderr)
        return 2
    path = Path(script).expanduser()
    if not path.is_file():
        print(f"gequiv-timm-train: {script!r} is not a file; expected the path of timm's train.py "
              f"(see gequiv-timm-train --help)", file=sys.stderr)
        return 2
    import gequiv_timm  # noqa: F401  (registers the gequiv_ models with timm before the script reads --model)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path)] + argv
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name='__main__')
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
