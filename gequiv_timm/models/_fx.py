"""The one place where gequiv_timm tells timm's FX feature extraction (and torchvision's tracer, through timm's
lists) what not to trace into.

Our layers check their inputs in Python (clear errors), which ``torch.fx`` cannot trace through: such modules are
leaf modules (matched with ``isinstance``, so subclasses such as ``PooledLift`` are leaves too) and such functions
are leaf functions. ``layers/`` knows nothing of timm, so the registration lives here, in ``models``, and runs
when ``gequiv_timm.models`` is imported (which ``import gequiv_timm`` does).

One more mechanism stays beside its function: ``torch.fx.wrap('check_image_input')`` in
:mod:`gequiv_timm.models._timm_api` (``fx.wrap`` patches the globals of the module that calls it, which keeps the
check a leaf also when a wrapper model calls our ``forward_features`` as a method).
"""
from __future__ import annotations

from timm.layers import register_notrace_function, register_notrace_module

from ..layers.gconv import (
    GroupAvgPool2d,
    GroupBatchNorm,
    GroupConv2d,
    GroupMaxPool2d,
    GroupPool,
    fold_group,
    unfold_group,
)
from ..layers.pde import (
    BatchNormM2,
    CDEPdeLayerM2,
    ConvectionM2,
    DilationM2,
    ErosionM2,
    LiftM2Cartesian,
    LinearM2,
    MaxProjectM2,
    PDEStem,
    SumProjectM2,
)
from ..layers.rcn import NOTRACE_FUNCTIONS as _RCN_CHECKS
from ..layers.stn import LocalisationCNN, ParallelSpatialTransformer, SpatialTransformer

__all__ = ['register_fx_leaves']


def register_fx_leaves() -> None:
    """Register every leaf module and function of the package with timm (idempotent: timm keeps sets)."""
    from . import escnn_baselines, pde
    from ._timm_api import check_image_input
    modules = (
        GroupConv2d, GroupBatchNorm, GroupPool, GroupAvgPool2d, GroupMaxPool2d,  # group layers
        LiftM2Cartesian, ConvectionM2, DilationM2, ErosionM2, LinearM2, CDEPdeLayerM2, MaxProjectM2, BatchNormM2,
        SumProjectM2, PDEStem, pde.PDELiftStage, pde.PDEStage,  # PDE layers and stages
        SpatialTransformer, ParallelSpatialTransformer, LocalisationCNN,  # spatial transformers
        escnn_baselines._Tensorized,  # an escnn module seen as Tensor -> Tensor
    )
    functions = (check_image_input, fold_group, unfold_group, *_RCN_CHECKS)
    for m in modules:
        register_notrace_module(m)
    for f in functions:
        register_notrace_function(f)
