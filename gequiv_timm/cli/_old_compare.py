"""Train and evaluate ours against escnn baselines on rotated MNIST; write table and plots.

Placeholder until gequiv_timm/cli/compare.py exists (issue 14): it delegates to the argparse code still in
``gequiv_timm.compare``. The helper who writes cli/compare.py deletes this module and points COMMANDS['compare'] at
theirs.
"""
from gequiv_timm.compare import add_arguments, run  # noqa: F401

__all__ = ['add_arguments', 'run']
