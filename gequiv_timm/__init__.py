"""gequiv_timm: geometric deep learning for timm.

``import gequiv_timm`` registers every model with timm (the ``@register_model`` builders of
``gequiv_timm.models``; their catalog data in ``registry/*.toml``), so ``timm.create_model('gequiv_p4cnn',
pretrained=True)`` works.
"""
from ._version import __version__  # noqa: F401

from . import layers  # noqa: F401  (pure torch)
from . import models  # noqa: F401  (registers the builders with timm)

from .layers import (  # noqa: E402,F401
    GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool, P4ConvP4, P4ConvZ2, P4MConvP4M, P4MConvZ2,
)
from .models.gcnn import GroupCNN  # noqa: E402,F401


def __getattr__(name):
    # lazily exposed public names of families that live in their own modules
    lazy = {
        'inject_equivariant_stem': 'gequiv_timm.models.stems',
        'inject_stem': 'gequiv_timm.models.stems',
        'STNFrontEnd': 'gequiv_timm.models.stn',
        'canonicalize': 'gequiv_timm.models.canon',
        'CanonicalizedModel': 'gequiv_timm.models.canon',
        'pretrain_canonicalizer': 'gequiv_timm.models.canon',
        'PDEStem': 'gequiv_timm.layers.pde',
    }
    if name in lazy:
        import importlib
        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'gequiv_timm' has no attribute {name!r}")
