"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Sequence

__all__ = ['add_model_arg', 'model_args']


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
