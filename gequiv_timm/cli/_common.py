"""Arguments and checks shared by several subcommands."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

__all__ = ['add_model_arg', 'model_args', 'check_input_file', 'check_model_args', 'check_range', 'check_repo_id']


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model-arg', action='append', default=[], metavar='KEY=VALUE',
                   help='model argument the checkpoint was trained with, over the catalog default (VALUE is '
                        'JSON, e.g. num_classes=7); repeatable')


def model_args(items: Sequence[str]) -> Dict[str, Any]:
    """``['num_classes=7', 'act="relu"']`` -> ``{'num_classes': 7, 'act': 'relu'}`` (VALUE is JSON, else a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def check_range(option: str, value, ok: bool, what: str) -> None:
    """``ValueError('--num must be at least 1, got -3')`` unless ``ok``."""
    if value is not None and not ok:
        raise ValueError(f"{option} must be {what}, got {value!r}")


def check_repo_id(repo, option: str = '--repo') -> None:
    """A Hub repo id is ``ORG/NAME``."""
    if repo is not None and (str(repo).count('/') != 1 or not all(str(repo).split('/'))):
        raise ValueError(f"{option} must be a Hub repo id ORG/NAME, got {repo!r}")


def check_input_file(path, option: str, what: str = 'file') -> Path:
    """An input file given on the command line must exist, be a file and be readable (``ValueError`` naming the
    option and the path otherwise)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{option} {path}: no such {what}; check the path")
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a {what}; give the file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{option} {path}: not readable (permissions); fix them or copy the file")
    return p


def _accepted(name: str, message: str) -> str:
    """``'; it accepts a, b, c'``: the keyword arguments of the model class named in a ``TypeError`` message."""
    m = re.match(r"(\w+)\.__init__\(\)", message)
    if not m:
        return ''
    try:
        from timm.models import model_entrypoint
        cls = getattr(sys.modules.get(model_entrypoint(name).__module__), m[1], None)
        params = inspect.signature(cls.__init__).parameters.values() if cls is not None else []
    except (ValueError, TypeError, RuntimeError):
        return ''
    names = [p.name for p in params if p.name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return f"; it accepts {', '.join(names)}" if names else ''


def check_model_args(name: str, kwargs: Mapping[str, Any], option: str) -> None:
    """Build ``name`` with ``kwargs`` on the meta device (no memory, no weights: milliseconds) so that an unknown or
    rejected model argument is a ``ValueError`` naming it and ``option`` before any work, not a traceback after.
    A model that cannot be built on the meta device at all is left to its real build."""
    import timm
    import torch
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see `gequiv-timm list` (or timm.list_models())")
    try:
        with torch.device('meta'):
            timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m:
            raise ValueError(f"unknown model argument {m[1]} for {name} ({option}){_accepted(name, str(e))}"
                             ) from None
        raise ValueError(f"{option}: {name} cannot be built with {dict(kwargs)}: {str(e).splitlines()[0]}"
                         ) from None
    except (ValueError, AssertionError) as e:  # timm checks some arguments with assert (global_pool)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg[len(name) + 2:] if msg.startswith(f'{name}: ') else msg  # the model is named once
        raise ValueError(f"{option}: {name} rejects {dict(kwargs)}: {msg}") from None
    except Exception:  # noqa: BLE001  (not buildable on the meta device: the real build reports its own errors)
        return
