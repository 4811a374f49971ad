"""Train or fine-tune a registered model.

Placeholder until gequiv_timm/cli/train.py exists (issue 14): it delegates to the argparse code still in
``gequiv_timm.train``. The helper who writes cli/train.py deletes this module and points COMMANDS['train'] at theirs.
"""
from gequiv_timm.train import add_arguments, run  # noqa: F401

__all__ = ['add_arguments', 'run']
