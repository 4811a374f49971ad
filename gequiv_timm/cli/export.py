"""Write a model in the Hub layout.

``gequiv-timm export NAME.TAG DIR``: ``config.json``, ``model.safetensors`` and ``README.md`` (the model card) as
timm's ``hf-hub:`` / ``local-dir:`` loading reads them (:func:`gequiv_timm.hub.export`).
"""
from __future__ import annotations

import argparse

from ._common import add_model_arg, check_input_file, check_model_args, check_repo_id, model_args
from ._errors import reports_errors

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('model', help='NAME.TAG (shipped weights) or NAME with --checkpoint')
    p.add_argument('dir', help='output folder (created); receives config.json, model.safetensors, README.md')
    p.add_argument('--checkpoint', help='a .safetensors file to export instead of the shipped weights')
    p.add_argument('--repo', help='Hub repo id used in the model card (default: the manifest hf_hub_id)')
    p.add_argument('--card-only', action='store_true', help='write only README.md (the model card)')
    add_model_arg(p)


@reports_errors('export')
def run(args) -> int:
    from ..hub import export
    from ..outputs import check_output_dir
    check_output_dir(args.dir, 'DIR')
    check_repo_id(args.repo)
    if args.checkpoint:
        check_input_file(args.checkpoint, '--checkpoint', 'weights file')
    margs = model_args(args.model_arg)
    if margs:
        check_model_args(args.model.split('.', 1)[0], margs, '--model-arg')
    res = export(args.model, args.dir, checkpoint=args.checkpoint, repo_id=args.repo, card_only=args.card_only,
                 model_args=margs)
    print(f"wrote {', '.join(res.files)} to {res.dir}" + ('' if args.card_only else
          f" (model.safetensors sha256={res.sha256}, {res.size:,} bytes)"))
    return 0
