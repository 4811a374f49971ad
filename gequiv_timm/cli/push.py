"""Export, verify and upload to the Hub.

``gequiv-timm push NAME.TAG [--repo ORG/NAME] [--dry-run]``: :func:`gequiv_timm.hub.push` (export to a folder,
reload it through timm and compare with the source model, then upload the folder as one commit).
"""
from __future__ import annotations

import argparse

from ._common import add_model_arg, check_input_file, check_model_args, check_repo_id, model_args
from ._errors import reports_errors

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


@reports_errors('push')
def run(args) -> int:
    from ..hub import default_repo, push
    from ..outputs import check_output_dir
    check_repo_id(args.repo)
    if args.export_dir:
        check_output_dir(args.export_dir, '--export-dir')
    if args.checkpoint:
        check_input_file(args.checkpoint, '--checkpoint', 'weights file')
    margs = model_args(args.model_arg)
    if margs:
        check_model_args(args.model.split('.', 1)[0], margs, '--model-arg')
    repo = args.repo or default_repo(args.model)
    if not repo:
        raise ValueError(f"{args.model} has no hf_hub_id in the catalog; give --repo ORG/NAME")
    push(args.model, repo, private=args.private, dry_run=args.dry_run, checkpoint=args.checkpoint,
         export_dir=args.export_dir, commit_message=args.message, model_args=margs)
    return 0
