"""Full G-CNN families as timm models: p4m ResNets and p4 / p4m All-CNN-C (Cohen & Welling, ICML 2016).

* :class:`GroupResNet` with the CIFAR layout (``gequiv_p4m_resnet44``: 3 stages of 7 basic blocks, 11/23/45
  fields, so that its parameters match the planar 32/64/128 ResNet44 of the paper) and the ImageNet layout
  (``gequiv_p4m_resnet18``: 4 stages of 2 basic blocks, 23/45/91/181 fields ~ 64/128/256/512 / sqrt(8)).
* :class:`GroupAllCNN`: Springenberg et al.'s All-CNN-C on p4 (48/96 fields ~ 96/192 / 2) or p4m (34/68).

Every network is a stack of group convolutions on ``[B, C, |G|, H, W]`` (p4, p4m, or any C_N / D_N through the
``group`` argument: ``'c8'``, ``'d8'``...); before the head the group axis is pooled, so ``forward_features`` is *invariant* (it rotates/flips with the input, spatially only) and the logits
are invariant to the group. Feature maps handed out by ``forward_intermediates`` / ``features_only`` are 4-D,
folded ``[B, C*|G|, H, W]`` (channel-major: channel ``c*|G| + g`` is field ``c`` at group element ``g``);
``feature_info`` entries say so (``layout='folded'``, ``group=...``).

Exactness, and one deliberate change from the papers: a stride-2 convolution on an even-sized map samples a grid
that a 90-degree rotation about the centre does not map onto itself, so a network with stride-2 convs is only
approximately invariant. Here every spatial reduction is a 2x2 average pool (max pool after the ImageNet stem)
*before* a stride-1 convolution ("pool then conv": the same cost as the strided conv), which tiles the map
symmetrically; invariance is then exact (float rounding) for inputs whose side is a multiple of the total
reduction (4 for ResNet44 and All-CNN-C, 32 for ResNet18). Parameter counts are those of the strided versions.

References: Cohen & Welling, "Group Equivariant Convolutional Networks", ICML 2016 (arXiv:1602.07576); He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016; Springenberg et al., "Striving for Simplicity: The All
Convolutional Net", ICLR 2015 workshop.

Builders at the bottom; papers and descriptions: ``registry/gresnet.toml``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..layers.gconv import GroupAvgPool2d, GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool
from ..layers.groups import get_group
from ..registry import tagged_cfgs
from ._args import check_choice, check_common, check_int, check_ints
from ._helpers import create_gequiv_model
from ._timm_api import TimmApiMixin

__all__ = ['GroupResNet', 'GroupAllCNN', 'GroupBasicBlock', 'GroupConvBnAct']


class GroupConvBnAct(nn.Module):
    """``[GroupAvgPool2d(2)] -> GroupConv2d -> GroupBatchNorm -> ReLU`` on ``[B, C, |G|, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, group: str, kernel_size: int = 3, padding: Optional[int] = None,
                 pool: bool = False, act: bool = True):
        super().__init__()
        g = get_group(group)
        self.pool = GroupAvgPool2d(2, group=g) if pool else nn.Identity()
        self.conv = GroupConv2d(in_chs, out_chs, kernel_size, g.name, g.name,
                                padding=kernel_size // 2 if padding is None else padding, bias=False,
                                planar_input=False)
        self.bn = GroupBatchNorm(out_chs, g)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pool(x))))


class GroupBasicBlock(nn.Module):
    """Residual basic block on the group: ``x -> [pool] -> (conv3x3-GBN-ReLU-conv3x3-GBN) + shortcut -> ReLU``.

    With ``downsample`` the 2x2 average pool is applied once to the block input (both branches read it); the
    shortcut is a 1x1 group conv + GBN when the width changes, else the identity.
    """

    def __init__(self, in_chs: int, out_chs: int, group: str, downsample: bool = False):
        super().__init__()
        g = get_group(group)
        self.pool = GroupAvgPool2d(2, group=g) if downsample else nn.Identity()
        self.conv1 = GroupConvBnAct(in_chs, out_chs, g.name)
        self.conv2 = GroupConvBnAct(out_chs, out_chs, g.name, act=False)
        if in_chs != out_chs:
            self.shortcut = nn.Sequential(GroupConv2d(in_chs, out_chs, 1, g.name, g.name, bias=False,
                                                      planar_input=False),
                                          GroupBatchNorm(out_chs, g))
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class _ImageNetStem(nn.Module):
    """``2x2 avg pool -> lift k x k -> GBN -> ReLU`` (reduction 2): a stride-2 stem that stays exactly equivariant."""

    def __init__(self, in_chs: int, out_chs: int, group: str, kernel_size: int = 7):
        super().__init__()
        g = get_group(group)
        self.pool = nn.AvgPool2d(2)
        self.conv = GroupConv2d(in_chs, out_chs, kernel_size, 'z2', g.name, padding=kernel_size // 2, bias=False)
        self.bn = GroupBatchNorm(out_chs, g)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pool(x))))


class _CifarStem(nn.Module):
    """``lift 3x3 -> GBN -> ReLU`` at full resolution."""

    def __init__(self, in_chs: int, out_chs: int, group: str, kernel_size: int = 3):
        super().__init__()
        g = get_group(group)
        self.conv = GroupConv2d(in_chs, out_chs, kernel_size, 'z2', g.name, padding=kernel_size // 2, bias=False)
        self.bn = GroupBatchNorm(out_chs, g)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class GroupResNet(TimmApiMixin, nn.Module):
    """ResNet of group basic blocks, invariant end to end (group pooling before the head).

    Args:
        group: ``'p4'`` or ``'p4m'``; or ``'cN'`` / ``'dN'`` (``'c8'``, ``'d8'``...: harmonic filters; the logits are
            exactly invariant to the quarter turns and mirrors when 4 divides N, approximately to the other
            rotations).
        layers: blocks per stage (``(7, 7, 7)`` = ResNet44, ``(2, 2, 2, 2)`` = ResNet18).
        widths: fields per stage.
        stem_type: ``'cifar'`` (3x3 lift, full resolution) or ``'imagenet'`` (2x2 avg pool, 7x7 lift, 2x2 max pool:
            reduction 4 before the first stage, as a ResNet's stride-2 conv + max pool).
        stem_width: fields of the stem (default ``widths[0]``).
        group_pool: ``'max'`` or ``'mean'`` over the group before the head.
        zero_init_last: zero the last GBN scale of every block (the residual branch starts as zero).
        num_classes, in_chans, drop_rate, global_pool, device, dtype: as every timm model.

    Shapes: input ``[B, in_chans, H, W]``; ``forward_features`` ``[B, widths[-1], H/r, W/r]`` (invariant);
    intermediates ``[B, C*|G|, h, w]``; logits ``[B, num_classes]``.
    """

    def __init__(self, group: str = 'p4m', layers: Sequence[int] = (7, 7, 7), widths: Sequence[int] = (11, 23, 45),
                 stem_type: str = 'cifar', stem_width: Optional[int] = None, group_pool: str = 'max',
                 zero_init_last: bool = True, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.,
                 global_pool: str = 'avg', device=None, dtype=None):
        super().__init__()
        layers = check_ints('GroupResNet', 'layers', layers, 1, what='blocks per stage, at least one stage')
        widths = check_ints('GroupResNet', 'widths', widths, 1, length=len(layers),
                            what='fields per stage, one per entry of layers')
        check_choice('GroupResNet', 'stem_type', stem_type, ('cifar', 'imagenet'))
        check_int('GroupResNet', 'stem_width', stem_width, 1, none_ok=True, what='None: widths[0]')
        check_choice('GroupResNet', 'group_pool', group_pool, ('max', 'mean'))
        check_common('GroupResNet', num_classes, in_chans, drop_rate)
        self.group = get_group(group)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        g = self.group
        stem_width = widths[0] if stem_width is None else stem_width
        # every spatial reduction is a 2x2 pool (floor): one per stage after the first, two in the ImageNet stem
        self._num_halvings = len(layers) - 1 + (2 if stem_type == 'imagenet' else 0)
        self.feature_info = []
        if stem_type == 'cifar':
            self.stem = _CifarStem(in_chans, stem_width, g.name)
            reduction = 1
            self.feature_info.append(dict(num_chs=stem_width * g.order, reduction=1, module='stem', group=g.name,
                                          layout='folded'))
        else:
            self.stem = nn.Sequential()
            self.stem.add_module('conv', _ImageNetStem(in_chans, stem_width, g.name))
            self.feature_info.append(dict(num_chs=stem_width * g.order, reduction=2, module='stem.conv',
                                          group=g.name, layout='folded'))
            self.stem.add_module('pool', GroupMaxPool2d(2, group=g))
            reduction = 4
        stages = []
        prev = stem_width
        for i, (n, w) in enumerate(zip(layers, widths)):
            down = i > 0
            reduction *= 2 if down else 1
            blocks = [GroupBasicBlock(prev if j == 0 else w, w, g.name, downsample=down and j == 0) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=w * g.order, reduction=reduction, module=f'stages.{i}',
                                          group=g.name, layout='folded'))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.group_pool = GroupPool(g, group_pool)
        self._init_head(prev, num_classes, global_pool, drop_rate)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, GroupBasicBlock):
                    m.zero_init_last()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def min_input_size(self) -> int:
        """``2 ** (number of 2x2 pools)``: every pool needs a 2x2 map (the convolutions are padded)."""
        return 2 ** self._num_halvings

    def _stem_with_tap(self, x: torch.Tensor):
        # the ImageNet stem's tap is its conv (reduction 2), before the max pool, as timm's ResNet taps act1
        if isinstance(getattr(self.stem, 'pool', None), GroupMaxPool2d):
            tap = self.stem.conv(x)
            return tap, self.stem.pool(tap)
        return super()._stem_with_tap(x)

    def _prune_stem_after_tap(self) -> None:
        if isinstance(getattr(self.stem, 'pool', None), GroupMaxPool2d):
            self.stem.pool = nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.(\d+)', None), (r'^stages\.(\d+)', (99999,))])


class GroupAllCNN(TimmApiMixin, nn.Module):
    """All-CNN-C (Springenberg et al. 2015) on a group, invariant end to end.

    Layers (``w1, w2`` = ``widths``): ``lift3x3(w1) conv3x3(w1) | pool conv3x3(w1) conv3x3(w2) conv3x3(w2) |
    pool conv3x3(w2) conv3x3(w2, valid) conv1x1(w2)``, each followed by GBN + ReLU; then pooling over the group,
    global average pooling and the linear classifier (the paper's final 1x1 conv to the classes + global average
    pool, in the other order: both are linear). 32x32 input -> 6x6 features.

    Args: group (as :class:`GroupResNet`: ``'p4'``, ``'p4m'``, ``'cN'``, ``'dN'``), widths, group_pool, num_classes,
    in_chans, drop_rate, global_pool, device, dtype.
    """

    stem_tap = False

    def __init__(self, group: str = 'p4', widths: Sequence[int] = (48, 96), group_pool: str = 'max',
                 num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0., global_pool: str = 'avg',
                 device=None, dtype=None):
        super().__init__()
        check_ints('GroupAllCNN', 'widths', widths, 1, length=2, what='(w1, w2) fields')
        check_choice('GroupAllCNN', 'group_pool', group_pool, ('max', 'mean'))
        check_common('GroupAllCNN', num_classes, in_chans, drop_rate)
        self.group = get_group(group)
        g = self.group
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        w1, w2 = widths
        self.stem = nn.Identity()
        lift = GroupConv2d(in_chans, w1, 3, 'z2', g.name, padding=1, bias=False)
        s0 = nn.Sequential(lift, GroupBatchNorm(w1, g), nn.ReLU(inplace=True), GroupConvBnAct(w1, w1, g.name))
        s1 = nn.Sequential(GroupConvBnAct(w1, w1, g.name, pool=True), GroupConvBnAct(w1, w2, g.name),
                           GroupConvBnAct(w2, w2, g.name))
        s2 = nn.Sequential(GroupConvBnAct(w2, w2, g.name, pool=True), GroupConvBnAct(w2, w2, g.name, padding=0),
                           GroupConvBnAct(w2, w2, g.name, kernel_size=1))
        self.stages = nn.Sequential(s0, s1, s2)
        self.feature_info = [dict(num_chs=w * g.order, reduction=r, module=f'stages.{i}', group=g.name,
                                  layout='folded') for i, (w, r) in enumerate(((w1, 1), (w2, 2), (w2, 4)))]
        self.group_pool = GroupPool(g, group_pool)
        self._init_head(w2, num_classes, global_pool, drop_rate)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def min_input_size(self) -> int:
        """12: two 2x2 pools, then an unpadded 3x3 convolution that needs a 3x3 map."""
        return 12

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stages\.0\.[0-2]\.', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.(\d+)', None)])


_CLASSES = {'GroupResNet': GroupResNet, 'GroupAllCNN': GroupAllCNN}


def _create_gresnet(variant: str, pretrained: bool = False, *, arch: str = 'GroupResNet', **kwargs):
    """Build a :class:`GroupResNet` or :class:`GroupAllCNN` (``arch``) through timm's ``build_model_with_cfg``."""
    if arch not in _CLASSES:
        raise ValueError(f"{variant}: unknown arch {arch!r}; expected one of {sorted(_CLASSES)}")
    cls = _CLASSES[arch]
    layers = kwargs.get('layers', (7, 7, 7))  # a bad value is refused by the constructor, with its range
    n_taps = (len(layers) + 1 if isinstance(layers, (list, tuple)) else 1) if cls is GroupResNet else 3
    first_conv = 'stem.conv' if cls is GroupResNet and kwargs.get('stem_type', 'cifar') == 'cifar' else (
        'stem.conv.conv' if cls is GroupResNet else 'stages.0.0')
    return create_gequiv_model(cls, variant, pretrained, first_conv=first_conv,
                               feature_cfg=dict(out_indices=tuple(range(n_taps))), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """CIFAR-10: 32x32 RGB, CIFAR mean / std, no crop."""
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': (0.4914, 0.4822, 0.4465), 'std': (0.2470, 0.2435, 0.2616),
        'first_conv': 'stem.conv', 'classifier': 'head.fc', 'paper_ids': 'arXiv:1602.07576', **kwargs,
    }


# papers and descriptions: registry/gresnet.toml (no pretrained tags yet)
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_p4m_resnet44': _cfg(),
    'gequiv_p4m_resnet18': _cfg(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.conv.conv'),
    'gequiv_p4_allcnnc': _cfg(pool_size=(6, 6), first_conv='stages.0.0'),
    'gequiv_p4m_allcnnc': _cfg(pool_size=(6, 6), first_conv='stages.0.0'),
}))


@register_model
def gequiv_p4m_resnet44(pretrained: bool = False, **kwargs) -> GroupResNet:
    """p4m-ResNet44 (Cohen & Welling 2016, CIFAR): 3 stages x 7 group basic blocks, 11/23/45 fields."""
    model_args = dict(arch='GroupResNet', group='p4m', layers=(7, 7, 7), widths=(11, 23, 45), stem_type='cifar',
                      num_classes=10)
    return _create_gresnet('gequiv_p4m_resnet44', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4m_resnet18(pretrained: bool = False, **kwargs) -> GroupResNet:
    """p4m-ResNet18 (ImageNet layout): 4 stages x 2 group basic blocks, 23/45/91/181 fields."""
    model_args = dict(arch='GroupResNet', group='p4m', layers=(2, 2, 2, 2), widths=(23, 45, 91, 181),
                      stem_type='imagenet', num_classes=1000)
    return _create_gresnet('gequiv_p4m_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4_allcnnc(pretrained: bool = False, **kwargs) -> GroupAllCNN:
    """p4-All-CNN-C (Cohen & Welling 2016, CIFAR): All-CNN-C on p4, 48/96 fields."""
    model_args = dict(arch='GroupAllCNN', group='p4', widths=(48, 96), num_classes=10)
    return _create_gresnet('gequiv_p4_allcnnc', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4m_allcnnc(pretrained: bool = False, **kwargs) -> GroupAllCNN:
    """p4m-All-CNN-C (Cohen & Welling 2016, CIFAR): All-CNN-C on p4m, 34/68 fields."""
    model_args = dict(arch='GroupAllCNN', group='p4m', widths=(34, 68), num_classes=10)
    return _create_gresnet('gequiv_p4m_allcnnc', pretrained, **dict(model_args, **kwargs))
