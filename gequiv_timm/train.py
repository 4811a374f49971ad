"""Former home of training: the names users import from ``gequiv_timm.train`` (``fit``, ``evaluate``, ``train``,
``to_channels_last``, ...), re-exported from :mod:`gequiv_timm.training`, where they live now (loop, checkpoints,
distributed, losses, metrics log). ``gequiv-timm train``'s options are in :mod:`gequiv_timm.cli.train`."""
from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
