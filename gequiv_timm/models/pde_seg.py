"""Dense-prediction (segmentation) networks as timm models: CDE-PDE networks and their CNN / G-CNN baselines.

After the retinal-vessel experiment of Smets, Portegies, Bekkers & Duits, "PDE-based Group Equivariant
Convolutional Neural Networks", JMIV 2022 (arXiv:2001.09046), whose reference code (LieTorch's DRIVE models)
compares networks of 6 and 12 layers that keep the input resolution throughout (no pooling, no upsampling):

* ``'pde'`` (``gequiv_pde_seg6`` / ``gequiv_pde_seg12``): lifting to M2 (:class:`~gequiv_timm.layers.pde.
  LiftM2Cartesian`, ``Or`` orientations, reflection padding) + batch norm, then CDE layers
  (:class:`~gequiv_timm.layers.pde.CDEPdeLayerM2`: convection, dilation, erosion, linear, batch norm; the
  morphological PDEs are the only non-linearity), max projection over orientations, a ``1 x 1`` classifier;
  6 layers = lift + 4 CDE + classifier, 12 = lift + 10 CDE + classifier.
* ``'p4'`` (``gequiv_p4_seg6``): the G-CNN baseline on the project's p4 group convolutions (a ``7 x 7``
  :class:`~gequiv_timm.layers.gconv.P4ConvZ2`, three ``5 x 5`` and one ``1 x 1`` :class:`P4ConvP4`, each with
  :class:`GroupBatchNorm` and ReLU), max pooling over rotations, a ``1 x 1`` classifier.
* ``'cnn'`` (``gequiv_cnn_seg6``): the same layout with plain convolutions (``7 x 7``, three ``5 x 5``, ``1 x 1``,
  batch norm and ReLU; zero padding), a ``1 x 1`` classifier.

Every spatial layer pads to keep the size ('same'), so the output ``[B, num_classes, H, W]`` is at input
resolution: class logits per pixel (softmax over classes; train with
:func:`gequiv_timm.training.losses.dice_loss`). Symmetry: padding and every layer commute with quarter turns of a
square input, so the PDE nets (``Or`` a multiple of 4) and the p4 net give logits that turn with the input
(measured: ``registry/symmetry.json``); the CNN's do not.

Departures from LieTorch's DRIVE models (cost on two CPU cores, not accuracy, chose them): fewer channels (PDE 8
instead of 16 / 10, CNN 16 instead of 18, the G-CNN on p4 with 4 rotations instead of 8 orientations), morphological
kernels ``(3, 5, 5)`` instead of ``(5, 5, 5)``, no dropout inside the body (``drop_rate`` is a ``Dropout2d``
before the classifier), softmax over ``num_classes`` (2 by default) instead of one sigmoid channel, and a bias in
the classifier.

timm's API: ``forward_features`` is the planar map before the classifier, ``[B, num_features, H, W]`` (projected
over orientations / rotations for the group nets); ``forward_head`` the ``1 x 1`` classifier (``pre_logits=True``,
or ``num_classes=0``, gives ``global_pool`` of the features instead, ``[B, num_features]``, as every timm model);
``forward_intermediates`` / ``features_only`` the layer outputs, group axes folded (``[B, C*|G|, H, W]``, every
tap at reduction 1). Departures from timm's own tests are listed in ``tests/models/timm_departures.py``.

Builders at the bottom; tags, papers and descriptions: ``registry/pde_seg.toml``.
"""
# No ``from __future__ import annotations`` here: torch.fx copies the annotations of ``forward`` into the code it
# generates, and TorchScript cannot read them back as strings (timm scripts FX graphs in its tests).
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers.gconv import GroupBatchNorm, GroupPool, P4ConvP4, P4ConvZ2
from ..layers.pde import BatchNormM2, CDEPdeLayerM2, LiftM2Cartesian, MaxProjectM2
from ..registry import tagged_cfgs
from ._args import check_choice, check_common, check_float, check_int, check_ints
from ._helpers import create_gequiv_model, digits_cfg
from ._timm_api import check_image_input, model_name
from .pde import PDEGCNN, _check_pde_kernel

__all__ = ['SegmentationNet', 'DenseHead', 'KINDS']

KINDS = ('cnn', 'p4', 'pde')
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', '')

# the input check stays one call in plain torch.fx traces too (timm's tracer knows it from models/_fx.py)
torch.fx.wrap('check_image_input')


class DenseHead(nn.Module):
    """Per-pixel classifier: ``Dropout2d -> 1 x 1 conv`` to ``num_classes`` logits ``[B, num_classes, H, W]``;
    with ``num_classes=0`` (or ``pre_logits=True``) ``global_pool`` of the features instead (timm's headless
    output: ``[B, in_features * mult]``, or the map itself for ``global_pool=''``)."""

    def __init__(self, in_features: int, num_classes: int, global_pool: str = 'avg', drop_rate: float = 0.0):
        super().__init__()
        self.in_features, self.num_classes, self.drop_rate = in_features, num_classes, drop_rate
        self.global_pool = global_pool
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.drop = nn.Dropout2d(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = nn.Conv2d(in_features, num_classes, 1) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: Optional[str] = None, in_features: Optional[int] = None,
              device=None, dtype=None) -> None:
        """A new classifier (and pooling, when ``pool_type`` is given) on ``device`` / ``dtype``, in the head's
        train / eval mode."""
        if pool_type is not None:
            self.global_pool = _check_pool(pool_type)
            self.pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        if in_features is not None:
            self.in_features = in_features
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(self.in_features, num_classes, 1, device=device, dtype=dtype) \
            if num_classes > 0 else nn.Identity()
        self.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits or self.num_classes == 0:
            return self.pool(x)
        return self.classifier(self.drop(x))


def _check_pool(global_pool) -> str:
    if global_pool is None:
        return 'avg'
    if global_pool not in POOL_TYPES:
        raise ValueError(f"SegmentationNet: global_pool must be one of {POOL_TYPES} (the pooling of the headless "
                         f"output), got {global_pool!r}")
    return global_pool


class _ConvStage(nn.Module):
    """``conv k x k ('same', zero padding) -> BN -> ReLU`` on planar maps."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _P4Stage(nn.Module):
    """``P4ConvZ2 / P4ConvP4 k x k ('same') -> GroupBatchNorm -> ReLU``."""

    def __init__(self, cin: int, cout: int, k: int, lift: bool):
        super().__init__()
        conv = P4ConvZ2 if lift else P4ConvP4
        self.conv = conv(cin, cout, k, padding=k // 2, bias=False)
        self.bn = GroupBatchNorm(cout, 'p4')
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _LiftStage(nn.Module):
    """``LiftM2Cartesian k x k ('same', reflection padding) -> BatchNormM2``: planar image to M2."""

    def __init__(self, cin: int, cout: int, orientations: int, k: int):
        super().__init__()
        self.lift = LiftM2Cartesian(cin, cout, orientations, k, padding=k // 2, padding_mode='reflect')
        self.bn = BatchNormM2(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lift(x))


class _Fold(nn.Module):
    """``[B, C, G, H, W] -> [B, C*G, H, W]`` (planar maps pass): ``group_pool`` after ``prune_norm=True``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2) if x.dim() == 5 else x


class SegmentationNet(nn.Module):
    """Resolution-preserving segmentation network: ``stages -> group_pool -> DenseHead`` (see the module docstring).

    Args:
        kind: ``'cnn'``, ``'p4'`` or ``'pde'``.
        widths: output channels of every layer before the classifier (fields per group element for ``'p4'``,
            channels per orientation for ``'pde'``); the depth is ``len(widths) + 1``.
        kernel_sizes: ``'cnn'`` / ``'p4'``: one odd spatial kernel per layer of ``widths``. ``'pde'``: the lifting
            kernel is ``kernel_sizes[0]`` (the rest is not used; the CDE layers take ``pde_kernel_size``).
        orientations: ``Or`` of the PDE nets (a multiple of 4 for exact quarter-turn equivariance).
        pde_kernel_size: odd ``k`` or ``(kOr, kH, kW)`` of the dilation / erosion kernels. alpha: their exponent in
            ``(1/2, 1]``. coef_lr_mult: learning-rate multiplier of the PDE coefficients in :meth:`param_groups`
            (as :class:`~gequiv_timm.models.pde.PDEGCNN`).
        num_classes: classes per pixel (2: background and foreground). in_chans, drop_rate, global_pool: as every
            timm model (``drop_rate``: a ``Dropout2d`` before the classifier; ``global_pool``: the headless pooling).
        device, dtype: timm's factory kwargs.

    Shapes: input ``[B, in_chans, H, W]`` -> logits ``[B, num_classes, H, W]``; ``forward_features``
    ``[B, widths[-1], H, W]``.

    Example:
        >>> import timm, gequiv_timm
        >>> m = timm.create_model('gequiv_pde_seg6').eval()
        >>> m(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 2, 64, 64])
    """
    pipeline_tag = 'image-segmentation'  # the Hub task of its model card (gequiv_timm.hub)


    def __init__(self, kind: str = 'pde', widths: Sequence[int] = (8, 8, 8, 8, 8),
                 kernel_sizes: Sequence[int] = (7, 5, 5, 5, 1), orientations: int = 8,
                 pde_kernel_size=(3, 5, 5), alpha: float = 0.65, coef_lr_mult: float = 10.0, num_classes: int = 2,
                 in_chans: int = 1, drop_rate: float = 0.0, global_pool: str = 'avg', device=None, dtype=None):
        super().__init__()
        kind = check_choice('SegmentationNet', 'kind', kind, KINDS)
        widths = check_ints('SegmentationNet', 'widths', widths, 1, what='one per layer before the classifier')
        kernel_sizes = check_ints('SegmentationNet', 'kernel_sizes', kernel_sizes, 1, what='odd, one per layer')
        if len(widths) < 2:
            raise ValueError(f"SegmentationNet: widths needs at least 2 layers (a first layer and one more), got "
                             f"{tuple(widths)}")
        need = 1 if kind == 'pde' else len(widths)
        if len(kernel_sizes) < need or any(k % 2 == 0 for k in kernel_sizes[:need]):
            raise ValueError(f"SegmentationNet: kernel_sizes must hold {need} odd int(s) for kind={kind!r} "
                             f"({'the lifting kernel' if kind == 'pde' else 'one per layer of widths'}), got "
                             f"{tuple(kernel_sizes)}")
        check_int('SegmentationNet', 'orientations', orientations, 1)
        _check_pde_kernel('SegmentationNet', 'pde_kernel_size', pde_kernel_size)
        check_float('SegmentationNet', 'alpha', alpha, 0.5, 1.0, lo_open=True)
        check_float('SegmentationNet', 'coef_lr_mult', coef_lr_mult, 0.0)
        check_common('SegmentationNet', num_classes, in_chans, drop_rate)
        global_pool = _check_pool(global_pool)
        self.kind, self.in_chans, self.num_classes, self.drop_rate = kind, in_chans, num_classes, drop_rate
        self.orientations = orientations if kind == 'pde' else (4 if kind == 'p4' else 1)
        self.coef_lr_mult = float(coef_lr_mult)
        self.grad_checkpointing = False
        stages: List[nn.Module] = []
        cin = in_chans
        for i, (w, k) in enumerate(zip(widths, list(kernel_sizes) + [0] * len(widths))):
            if kind == 'cnn':
                stages.append(_ConvStage(cin, w, k))
            elif kind == 'p4':
                stages.append(_P4Stage(cin, w, k, lift=i == 0))
            elif i == 0:
                stages.append(_LiftStage(cin, w, orientations, kernel_sizes[0]))
            else:
                stages.append(CDEPdeLayerM2(cin, w, tuple(pde_kernel_size) if not isinstance(pde_kernel_size, int)
                                            else pde_kernel_size, alpha))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.group_pool = {'cnn': nn.Identity, 'p4': lambda: GroupPool('p4', 'max'), 'pde': MaxProjectM2}[kind]()
        group = {'cnn': None, 'p4': 'p4', 'pde': f'm2_{orientations}'}[kind]
        self.feature_info = [dict(num_chs=w * self.orientations, reduction=1, module=f'stages.{i}',
                                  **({} if group is None else dict(group=group, layout='folded')))
                             for i, w in enumerate(widths)]
        self.num_features = self.head_hidden_size = widths[-1]
        self.head = DenseHead(widths[-1], num_classes, global_pool, drop_rate)
        self.head_hidden_size = widths[-1] * self.head.pool.feat_mult()
        if device is not None or dtype is not None:  # timm's factory kwargs
            self.to(device=device, dtype=dtype)

    # ----- sizes ------------------------------------------------------------------------------------------
    def min_input_size(self) -> int:
        """The smallest input side: the lifting's reflection padding needs ``H, W > k // 2`` (PDE nets); the
        zero-padded convolutions take any size."""
        if self.kind == 'pde':
            return self.stages[0].lift.kernel_size // 2 + 1
        return 1

    def exact_input_sizes(self, h: int, w: int) -> bool:
        """Whether quarter turns map the sampling grids of an ``h x w`` input to themselves (square inputs: every
        layer keeps the size), where the group nets' logits turn exactly with the input."""
        return h == w

    # ----- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stages\.0\.', blocks=[(r'^stages\.(\d+)', None), (r'^head\.', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    no_weight_decay = PDEGCNN.no_weight_decay
    param_groups = PDEGCNN.param_groups

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new ``1 x 1`` classifier for ``num_classes`` (0: none, ``forward`` returns ``global_pool`` of the
        features), on the model's device and dtype; ``global_pool=None`` keeps the current pooling."""
        check_int(model_name(self), 'num_classes', num_classes, 0, what='0 = headless')
        p = next(self.parameters())
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, device=p.device, dtype=p.dtype)
        self.head_hidden_size = self.num_features * self.head.pool.feat_mult()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.min_input_size(), model_name(self))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, num_features, H, W]``: the last layer, projected over orientations / rotations (group nets)."""
        x = self._check_input(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.group_pool(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Per-pixel logits ``[B, num_classes, H, W]``; ``pre_logits=True`` (or ``num_classes=0``): the pooled
        features."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Layer outputs, group axes folded to ``[B, C*|G|, H, W]`` (as ``feature_info`` says); the final output is
        :meth:`forward_features`' map when every layer runs, else the last layer run, folded."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        x = self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = len(self.stages) if not stop_early else max_index + 1
        for i, stage in enumerate(self.stages[:last]):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x.flatten(1, 2) if x.dim() == 5 else x)
        if intermediates_only:
            return intermediates
        if last == len(self.stages):
            x = self.group_pool(x)
        elif x.dim() == 5:
            x = x.flatten(1, 2)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the layers after the last tap in ``indices``. The projection over the group (timm's "final norm")
        stays unless ``prune_norm=True``, which replaces it by the fold (``forward_features`` then returns the last
        tap itself). ``prune_head`` removes the classifier (``num_classes = 0``, no pooling)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        tap_chs = self.feature_info[max_index]['num_chs']
        old_features = self.num_features
        if prune_norm:
            self.group_pool = _Fold()
            self.num_features = tap_chs
        else:
            self.num_features = tap_chs // self.orientations
        if prune_head:
            self.num_classes = 0
        if prune_head or self.num_features != old_features:  # else the trained classifier still fits: kept
            p = next(self.parameters())
            self.head.reset(self.num_classes, pool_type='' if prune_head else None, in_features=self.num_features,
                            device=p.device, dtype=p.dtype)
        self.head_hidden_size = self.num_features * self.head.pool.feat_mult()
        return take_indices


def _create_seg(variant: str, pretrained: bool = False, **kwargs) -> SegmentationNet:
    kind = kwargs.get('kind', 'pde')
    first = {'cnn': 'stages.0.conv', 'p4': 'stages.0.conv', 'pde': 'stages.0.lift'}.get(kind)
    return create_gequiv_model(SegmentationNet, variant, pretrained, first_conv=first, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """64x64 grayscale canvases (MNIST mean / std), no crop; 2 classes per pixel (background, stroke)."""
    return digits_cfg(**{'num_classes': 2, 'input_size': (1, 64, 64), 'pool_size': (64, 64),
                         'classifier': 'head.classifier', 'paper_ids': 'arXiv:2001.09046', **kwargs})


# tags, hub repos and descriptions: registry/pde_seg.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_pde_seg6': _cfg(first_conv='stages.0.lift'),
    'gequiv_pde_seg12': _cfg(first_conv='stages.0.lift'),
    'gequiv_cnn_seg6': _cfg(first_conv='stages.0.conv'),
    'gequiv_p4_seg6': _cfg(first_conv='stages.0.conv'),
}))


@register_model
def gequiv_pde_seg6(pretrained: bool = False, **kwargs) -> SegmentationNet:
    """CDE-PDE segmentation network, 6 layers: lift to M2 (8 orientations, 7x7), 4 CDE layers, max projection, 1x1."""
    model_args = dict(kind='pde', widths=(8,) * 5, kernel_sizes=(7,), orientations=8, pde_kernel_size=(3, 5, 5),
                      alpha=0.65, num_classes=2, in_chans=1)
    return _create_seg('gequiv_pde_seg6', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_pde_seg12(pretrained: bool = False, **kwargs) -> SegmentationNet:
    """CDE-PDE segmentation network, 12 layers: lift to M2 (8 orientations, 7x7), 10 CDE layers, max projection, 1x1."""
    model_args = dict(kind='pde', widths=(8,) * 11, kernel_sizes=(7,), orientations=8, pde_kernel_size=(3, 5, 5),
                      alpha=0.65, num_classes=2, in_chans=1)
    return _create_seg('gequiv_pde_seg12', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_cnn_seg6(pretrained: bool = False, **kwargs) -> SegmentationNet:
    """CNN segmentation baseline, 6 layers: 7x7, three 5x5 and one 1x1 conv (BN, ReLU), a 1x1 classifier."""
    model_args = dict(kind='cnn', widths=(16,) * 5, kernel_sizes=(7, 5, 5, 5, 1), num_classes=2, in_chans=1)
    return _create_seg('gequiv_cnn_seg6', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4_seg6(pretrained: bool = False, **kwargs) -> SegmentationNet:
    """p4 G-CNN segmentation baseline, 6 layers: 7x7 lift, three 5x5 and one 1x1 p4 conv, rotation max pool, 1x1."""
    model_args = dict(kind='p4', widths=(8, 8, 8, 8, 16), kernel_sizes=(7, 5, 5, 5, 1), num_classes=2, in_chans=1)
    return _create_seg('gequiv_p4_seg6', pretrained, **dict(model_args, **kwargs))
