"""PDE-G-CNNs as timm models (Smets, Portegies, Bekkers & Duits, "PDE-based Group Equivariant Convolutional
Neural Networks", JMIV 2022, arXiv:2001.09046), and the PDE stem for timm backbones.

:class:`PDEGCNN` is ``lift -> [CDE layer]* -> max projection over orientations -> timm classifier head``: the
image is lifted to M2 = R^2 x S^1 (``Or`` orientations) by a learned lifting convolution (LieTorch's
``LiftM2Cartesian``), then each stage is a ``CDEPdeLayerM2`` (convection -> dilation -> erosion -> linear ->
batch norm; no ReLU, no max pooling: the morphological PDEs are the non-linearity), optionally followed by a 2x2
spatial max pool to save compute. ``forward_features`` is the max projection over orientations, a planar map
that rotates with the input, so the globally pooled logits are invariant to 90-degree rotations (exactly, for
``Or`` a multiple of 4 and maps that are even-sized where they are pooled, e.g. 28x28 digits).

``gequiv_pde_<backbone>`` entries put a :class:`~gequiv_timm.layers.pde.PDEStem` in place of a timm backbone's
stem through :func:`gequiv_timm.models.stems.inject_stem`; ``pretrained=True`` loads the *plain* backbone's
checkpoint into every non-stem layer (the PDE stem starts from its initialisation).

Builders at the bottom; tags, papers and descriptions: ``registry/pde.toml``.
"""
from __future__ import annotations

import inspect
import types
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..layers.pde import BatchNormM2, CDEPdeLayerM2, LiftM2Cartesian, MaxProjectM2, PDEStem
from ..layers.pde_native import max_pool2x2
from ..registry import tagged_cfgs
from ._args import (
    TIMM_RATES, check_common, check_float, check_indices, check_int, check_ints, check_timm_kwargs,
)
from ._helpers import create_gequiv_model, digits_cfg, scaled_param_groups
from ._stem_args import pde_stem_min_size
from ._timm_api import TimmApiMixin, attach_input_policy
from .stems import _pretrained_filter, find_stem, get_stem, inject_stem, stem_cfg

__all__ = ['PDEGCNN', 'PDEStage', 'PDELiftStage', 'PDEStem', 'create_pde_stem_model']


def _check_pde_kernel(owner: str, arg: str, kernel_size) -> None:
    """An odd positive int, or a triple ``(kOr, kH, kW)`` of odd positive ints (a morphological kernel)."""
    ok = (isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and kernel_size >= 1
          and kernel_size % 2 == 1)
    if not ok and isinstance(kernel_size, (list, tuple)) and len(kernel_size) == 3:
        ok = all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in kernel_size)
    if not ok:
        raise ValueError(f"{owner}: {arg} must be an odd int >= 1 or a triple (kOr, kH, kW) of odd ints >= 1, got "
                         f"{kernel_size!r}")


class PDELiftStage(nn.Module):
    """``LiftM2Cartesian -> BatchNormM2 [-> 2x2 max pool]``: planar image to M2."""

    def __init__(self, in_chs: int, out_chs: int, orientations: int, kernel_size: int, padding: int, pool: bool):
        super().__init__()
        self.lift = LiftM2Cartesian(in_chs, out_chs, orientations, kernel_size, padding=padding)
        self.bn = BatchNormM2(out_chs)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.lift(x))
        return max_pool2x2(x) if self.pool else x


class PDEStage(nn.Module):
    """``CDEPdeLayerM2 [-> 2x2 max pool]`` on ``[B, C, Or, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size, alpha: float, iterations: int, pool: bool):
        super().__init__()
        self.cde = CDEPdeLayerM2(in_chs, out_chs, kernel_size, alpha, iterations)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cde(x)
        return max_pool2x2(x) if self.pool else x


class PDEGCNN(TimmApiMixin, nn.Module):
    """PDE-G-CNN classifier: lift to M2, CDE layers, max projection over orientations, timm head.

    Args:
        widths: channels of the lifting layer followed by one entry per CDE layer.
        orientations: ``Or`` (a multiple of 4 for exact 90-degree invariance).
        lift_kernel_size: odd kernel of the lifting convolution. lift_padding: its padding (0 = valid).
        kernel_size: odd ``k`` or ``(kOr, kH, kW)`` of the morphological (dilation / erosion) kernels.
        alpha: the dilation/erosion exponent in ``(1/2, 1]``. iterations: C-D-E repetitions per layer.
        pool_after: stage indices (0 = the lifting stage) followed by a 2x2 spatial max pool.
        coef_lr_mult: learning-rate multiplier of the PDE coefficients (convection ``g0``, metric
            ``metric_params``) in :meth:`param_groups`, which ``gequiv_timm.train`` and ``gequiv-timm train`` use.
            They are a handful of geometric numbers per channel that must travel pixels and radians, not the small
            steps a weight takes: at the shared rate they lag the linear weights and the net learns slowly
            (rotated MNIST, 3x3x3 kernels, 3 epochs, lr 1e-2, seed 0: 15.7% test error at 1x, 7.9% at 10x, 8.5%
            at 30x).
        num_classes, in_chans, drop_rate, global_pool: as every timm model. device, dtype: timm's factory kwargs.

    Shapes: input ``[B, in_chans, H, W]``; ``forward_features`` ``[B, widths[-1], H', W']`` (max over
    orientations: rotates with the input); intermediates ``[B, C * Or, h, w]`` (folded, equivariant);
    logits ``[B, num_classes]``.

    timm's API (``forward_features`` / ``forward_intermediates`` / ``prune_intermediate_layers`` /
    ``reset_classifier`` ...) comes from :class:`~gequiv_timm.models._timm_api.TimmApiMixin`: the max projection
    over orientations is the ``group_pool`` (timm's "final norm"), the lifting stage is ``stages.0``.
    """

    stem_tap = False  # the first stage lifts: taps are the stage outputs

    def __init__(self, widths: Sequence[int] = (24, 24, 24, 24, 24, 24), orientations: int = 8,
                 lift_kernel_size: int = 5, lift_padding: int = 0, kernel_size=(3, 5, 5), alpha: float = 0.65,
                 iterations: int = 1, pool_after: Sequence[int] = (0, 3), num_classes: int = 10, in_chans: int = 1,
                 drop_rate: float = 0., global_pool: str = 'avg', coef_lr_mult: float = 10.0, device=None,
                 dtype=None):
        super().__init__()
        widths = check_ints('PDEGCNN', 'widths', widths, 1, what='the lifting width, then one per CDE layer')
        check_int('PDEGCNN', 'orientations', orientations, 1)
        check_int('PDEGCNN', 'lift_kernel_size', lift_kernel_size, 1, odd=True)
        check_int('PDEGCNN', 'lift_padding', lift_padding, 0)
        _check_pde_kernel('PDEGCNN', 'kernel_size', kernel_size)
        check_float('PDEGCNN', 'alpha', alpha, 0.5, 1.0, lo_open=True)
        check_int('PDEGCNN', 'iterations', iterations, 1)
        pool_after = check_indices('PDEGCNN', 'pool_after', pool_after, len(widths),
                                   'stage indices (0 = the lifting stage) followed by a 2x2 max pool')
        check_float('PDEGCNN', 'coef_lr_mult', coef_lr_mult, 0.0)
        check_common('PDEGCNN', num_classes, in_chans, drop_rate)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.orientations = orientations
        self.lift_kernel_size = lift_kernel_size
        self.lift_padding = lift_padding
        self.pool_after = tuple(pool_after)
        self.grad_checkpointing = False
        self.coef_lr_mult = float(coef_lr_mult)
        self.stem = nn.Identity()  # the first stage lifts the image to M2
        stages: List[nn.Module] = [PDELiftStage(in_chans, widths[0], orientations, lift_kernel_size, lift_padding,
                                                0 in self.pool_after)]
        reduction = 2 if 0 in self.pool_after else 1
        self.feature_info = [dict(num_chs=widths[0] * orientations, reduction=reduction, module='stages.0',
                                  group=f'm2_{orientations}', layout='folded')]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            pool = i in self.pool_after
            stages.append(PDEStage(cin, cout, kernel_size, alpha, iterations, pool))
            reduction *= 2 if pool else 1
            self.feature_info.append(dict(num_chs=cout * orientations, reduction=reduction, module=f'stages.{i}',
                                          group=f'm2_{orientations}', layout='folded'))
        self.stages = nn.Sequential(*stages)
        self.group_pool = MaxProjectM2()
        self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        if device is not None or dtype is not None:  # timm's factory kwargs
            self.to(device=device, dtype=dtype)

    # ----- sizes ------------------------------------------------------------------------------------------
    def _trace_size(self, size: int) -> Tuple[int, bool]:
        """Spatial size after the stages for an input side ``size`` (< 1: too small), and whether every step is
        exact. The lift is a conv; a CDE layer needs a 2x2 map (its convection interpolates between neighbours);
        a 2x2 max pool halves (floor)."""
        size = size + 2 * self.lift_padding - self.lift_kernel_size + 1
        exact = True
        for i in range(len(self.stages)):
            if size < (2 if i > 0 else 1):
                return 0, False
            if i in self.pool_after:
                exact &= size % 2 == 0
                size //= 2
        return size, exact and size >= 1

    def min_input_size(self) -> int:
        """The smallest input side (see :meth:`_trace_size`)."""
        s = 1
        while self._trace_size(s)[0] < 1:
            s += 1
        return s

    def exact_input_sizes(self, h: int, w: int) -> bool:
        """Whether 90-degree rotations of an ``h x w`` input give exactly invariant logits."""
        return self._trace_size(h)[1] and self._trace_size(w)[1]

    def fold_order(self) -> int:
        return self.orientations

    # ----- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stages\.0\.', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def no_weight_decay(self):
        """The PDE coefficients (convection ``g0``, metric ``metric_params``) are geometric quantities: decaying
        them towards zero would pull every convection to the identity and every metric to a flat kernel."""
        return {n for n, _ in self.named_parameters() if n.endswith('.g0') or n.endswith('.metric_params')}

    @torch.jit.ignore
    def param_groups(self, lr: Optional[float] = None, weight_decay: float = 0.0,
                     coef_lr_mult: Optional[float] = None) -> List[Dict[str, Any]]:
        """Optimizer param groups: the PDE coefficients (convection ``g0``, metric ``metric_params``) at
        ``coef_lr_mult`` times the rate and without weight decay; biases / norms without weight decay; the rest.

        * ``lr=None`` (timm's optimizer + scheduler factories): the coefficient group carries ``lr_scale``.
        * ``lr`` given (a plain schedule such as ``gequiv_timm.train.fit``): explicit ``lr`` per group.
        """
        mult = self.coef_lr_mult if coef_lr_mult is None else float(coef_lr_mult)
        coef = set(self.no_weight_decay())
        decay, no_decay, coefs = [], [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (coefs if n in coef else no_decay if p.ndim <= 1 else decay).append(p)
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0),
                  dict(params=coefs, weight_decay=0.0)]
        return scaled_param_groups(groups, [1.0, 1.0, mult], lr)


# ----------------------------------------------------------------------------------------------------------------
# PDE stem on a timm backbone
# ----------------------------------------------------------------------------------------------------------------
def _stem_geometry(model: nn.Module, info) -> Tuple[int, int, int]:
    """``(in_chs, out_chs, stride)`` of the deepest point of the original stem (e.g. after ResNet's maxpool)."""
    end_shape = info.segment_ends()[-1][1]
    return info.in_chs, int(end_shape[1]), info.probe_shape[-1] // int(end_shape[-1])


def create_pde_stem_model(backbone: str, stem_width: int = 16, stem_orientations: int = 8, stem_depth: int = 1,
                          stem_kernel_size: int = 5, stem_pde_kernel_size=(3, 3, 3), stem_alpha: float = 0.65,
                          **kwargs) -> nn.Module:
    """``timm.create_model(backbone, **kwargs)`` with its stem (first conv and the norm / act / pool after it)
    replaced by a :class:`PDEStem` of the same output channels and stride, via ``inject_stem``."""
    _check_pde_stem_args('create_pde_stem_model', stem_width, stem_orientations, stem_depth, stem_kernel_size,
                         stem_pde_kernel_size, stem_alpha)
    check_timm_kwargs('create_pde_stem_model', kwargs, rates=TIMM_RATES)
    import timm
    model = timm.create_model(backbone, pretrained=False, **kwargs)
    info = find_stem(model)
    in_chs, out_chs, stride = _stem_geometry(model, info)
    stem = PDEStem(in_chs, out_chs, stride=stride, width=stem_width, orientations=stem_orientations,
                   depth=stem_depth, kernel_size=stem_kernel_size, pde_kernel_size=stem_pde_kernel_size,
                   alpha=stem_alpha)
    ref = model.get_submodule(info.first_conv).weight  # build where the backbone was built (timm's device=/dtype=)
    stem.to(device=ref.device, dtype=ref.dtype)
    model = inject_stem(model, stem, info=info)
    # the stem's PDE coefficients are geometric (a shift, a metric): no weight decay on them (timm's optimizer
    # factory reads model.no_weight_decay()); whatever the backbone already excludes stays excluded
    model.no_weight_decay = types.MethodType(_stem_no_weight_decay, model)
    return model


def _check_pde_stem_args(owner: str, width, orientations, depth, kernel_size, pde_kernel_size, alpha) -> None:
    """The PDE stem's arguments, checked before anything is built."""
    check_int(owner, 'stem_width', width, 1)
    check_int(owner, 'stem_orientations', orientations, 1)
    check_int(owner, 'stem_depth', depth, 0, what='CDE layers in the stem')
    check_int(owner, 'stem_kernel_size', kernel_size, 1, odd=True)
    _check_pde_kernel(owner, 'stem_pde_kernel_size', pde_kernel_size)
    check_float(owner, 'stem_alpha', alpha, 0.5, 1.0, lo_open=True)


def _build_pde_stem_model(variant: str, backbone: str, stem_args: Dict[str, Any], **kwargs) -> nn.Module:
    model = create_pde_stem_model(backbone, **stem_args, **kwargs)
    stem = get_stem(model)
    return attach_input_policy(model, stem, variant, stem.in_chans, pde_stem_min_size(stem, backbone))


def _stem_no_weight_decay(model: nn.Module):
    names = {n for n, _ in model.named_parameters() if n.endswith(('.g0', '.metric_params'))}
    own = getattr(type(model), 'no_weight_decay', None)
    return names | (set(own(model)) if callable(own) else set())


def _create_pde(variant: str, pretrained: bool = False, *, backbone: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a :class:`PDEGCNN`, or with ``backbone`` a timm backbone
    with a :class:`PDEStem` (``pretrained=True`` then loads the plain backbone's checkpoint into the non-stem
    layers)."""
    if backbone is None:
        return create_gequiv_model(PDEGCNN, variant, pretrained, first_conv='stages.0.lift', **kwargs)
    stem_keys = ('stem_width', 'stem_orientations', 'stem_depth', 'stem_kernel_size', 'stem_pde_kernel_size',
                 'stem_alpha')
    stem_args: Dict[str, Any] = {k: kwargs.pop(k) for k in stem_keys if k in kwargs}
    if 'stem_pde_kernel_size' in stem_args and isinstance(stem_args['stem_pde_kernel_size'], list):
        stem_args['stem_pde_kernel_size'] = tuple(stem_args['stem_pde_kernel_size'])
    defaults = {k: p.default for k, p in inspect.signature(create_pde_stem_model).parameters.items() if k in stem_keys}
    a = dict(defaults, **stem_args)  # checked here to name the variant (create_pde_stem_model checks them too)
    _check_pde_stem_args(variant, a['stem_width'], a['stem_orientations'], a['stem_depth'], a['stem_kernel_size'],
                         a['stem_pde_kernel_size'], a['stem_alpha'])
    check_timm_kwargs(variant, kwargs, rates=TIMM_RATES)  # passed on to the timm backbone
    builder = partial(_build_pde_stem_model, variant, backbone, stem_args)
    return create_gequiv_model(builder, variant, pretrained,
                               pretrained_filter_fn=partial(_pretrained_filter, warm_start=False),
                               source_architectures=(backbone,), **kwargs)  # the plain backbone's file loads


def _cfg(**kwargs) -> Dict[str, Any]:
    """28x28 grayscale digits (MNIST mean / std), no crop."""
    return digits_cfg(**{'pool_size': (6, 6), 'first_conv': 'stages.0.lift', 'classifier': 'head.fc',
                         'paper_ids': 'arXiv:2001.09046', **kwargs})


# tags, hub repos and descriptions: registry/pde.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_pde_cnn_rotmnist': _cfg(),
    'gequiv_pde_resnet18': stem_cfg('resnet18', PDEStem.first_conv),
}))


@register_model
def gequiv_pde_cnn_rotmnist(pretrained: bool = False, **kwargs) -> PDEGCNN:
    """PDE-G-CNN for rotated MNIST: lifting to M2 (8 orientations), 5 CDE layers, max projection, linear head."""
    model_args = dict(widths=(24,) * 6, orientations=8, lift_kernel_size=5, lift_padding=0, kernel_size=(3, 5, 5),
                      alpha=0.65, iterations=1, pool_after=(0, 3), coef_lr_mult=10.0, in_chans=1, num_classes=10)
    return _create_pde('gequiv_pde_cnn_rotmnist', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_pde_resnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-18 (timm's resnet18) with a p4-equivariant stem of PDE layers in place of conv1, bn1, act1, maxpool."""
    model_args = dict(backbone='resnet18', stem_width=16, stem_orientations=8, stem_depth=1, stem_kernel_size=5,
                      stem_pde_kernel_size=(3, 3, 3))
    return _create_pde('gequiv_pde_resnet18', pretrained, **dict(model_args, **kwargs))
