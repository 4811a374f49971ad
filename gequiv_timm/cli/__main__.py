"""``python -m gequiv_timm.cli`` (e.g. under ``torchrun``): the ``gequiv-timm`` command."""
import sys

from . import main

if __name__ == '__main__':
    sys.exit(main())
