"""Export, verify and upload to the Hub.

``gequiv-timm push NAME.TAG [--repo ORG/NAME] [--dry-run]``: :func:`gequiv_timm.hub.push` (export to a folder,
reload it through timm and compare with the source model, then upload the folder as one commit).
"""
from __future__ import annotations

import argparse
import sys

from ._common import add_model_arg, model_args

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('model', help='NAME.TAG (shipped weights) or NAME with --checkpoint')
    p.add_argument('--repo', help="Hub repo id ORG/NAME (created if needed); default: the tag's hf_hub_id")
    p.add_argument('--private', action='store_true', help='create the repo private (ignored if it exists)')
    p.add_argument('--dry-run', action='store_true', help='export and verify only; upload nothing')
    p.add_argument('--checkpoint', help='a .safetensors file to push instead of the shipped weights')
    p.add_argument('--export-dir', help='export here and keep it (default: a temporary folder)')
    p.add_argument('--message', help='commit message')
    add_model_arg(p)


def run(args) -> int:
    from ..hub import ChecksumError, PushError, WeightsError, default_repo, push
    repo = args.repo or default_repo(args.model)
    if not repo:
        print(f"gequiv-timm push: {args.model} has no hf_hub_id in the catalog; give --repo ORG/NAME", file=sys.stderr)
        return 2
    try:
        push(args.model, repo, private=args.private, dry_run=args.dry_run, checkpoint=args.checkpoint,
             export_dir=args.export_dir, commit_message=args.message, model_args=model_args(args.model_arg))
    except (WeightsError, ChecksumError, PushError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"gequiv-timm push: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    return 0
