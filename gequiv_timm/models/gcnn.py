"""Plain G-CNNs as timm models: P4CNN / P4MCNN and their planar twin Z2CNN (Cohen & Welling, ICML 2016).

The network is a stack of stages ``group conv -> group batch norm -> ReLU [-> 2x2 spatial max pool]``; the first
stage lifts the planar image to the group (``P4ConvZ2`` / ``P4MConvZ2``; a plain conv for ``z2``). After the last
stage the group axis is max-pooled, so ``forward_features`` is *invariant*: rotating (and, for p4m, mirroring)
the input by 90 degrees rotates the feature map spatially, and the globally pooled logits do not change.

Exactness: every convolution is unpadded (``padding=0``, "valid") or symmetrically padded with stride 1 and the
spatial max pool is 2x2 on an even map, so the invariance is exact (float rounding) for 28x28 input, and for any
input whose map is even-sized where it is pooled (:meth:`GroupCNN.exact_input_sizes` checks a size).

Catalog entries: ``registry/gcnn.toml``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models._features import feature_take_indices
from timm.models import checkpoint_seq

from ..layers.gconv import GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool, fold_group, stride_is_exact
from ..layers.groups import get_group
from ._helpers import create_gequiv_model

__all__ = ['GroupCNN', 'GroupConvStage']


class GroupConvStage(nn.Module):
    """``GroupConv2d -> GroupBatchNorm -> ReLU [-> GroupMaxPool2d(2)]`` on ``[B, C, |G|, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, group: str, kernel_size: int = 3, padding: int = 0,
                 lift: bool = False, pool: bool = False):
        super().__init__()
        g = get_group(group)
        self.conv = GroupConv2d(in_chs, out_chs, kernel_size, 'z2' if lift else g.name, g.name, padding=padding,
                                bias=False, planar_input=lift)
        self.bn = GroupBatchNorm(out_chs, g)
        self.act = nn.ReLU(inplace=True)
        self.pool = GroupMaxPool2d(2, group=g) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class GroupCNN(nn.Module):
    """A stack of group-convolution stages with group pooling and a timm classifier head.

    Args:
        group: ``'z2'`` (planar), ``'p4'`` or ``'p4m'``.
        widths: channels (fields) per stage; the first stage lifts the image to the group.
        kernel_size: odd kernel size of every convolution.
        padding: padding of every convolution (0 = valid, as in the paper).
        pool_after: stage indices followed by a 2x2 spatial max pool.
        group_pool: ``'max'`` or ``'mean'`` pooling over the group axis before the head.
        num_classes, in_chans, drop_rate, global_pool: as every timm model.

    Shapes: input ``[B, in_chans, H, W]``; ``forward_features`` ``[B, widths[-1], H', W']`` (invariant);
    intermediates ``[B, C * |G|, h, w]`` (folded, equivariant); logits ``[B, num_classes]``.
    """

    def __init__(self, group: str = 'p4', widths: Sequence[int] = (10,) * 7, kernel_size: int = 3,
                 padding: int = 0, pool_after: Sequence[int] = (1,), group_pool: str = 'max',
                 num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0., global_pool: str = 'avg'):
        super().__init__()
        if not widths:
            raise ValueError("GroupCNN: widths must list at least one stage width")
        self.group = get_group(group)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.kernel_size = kernel_size
        self.padding = padding
        self.pool_after = tuple(pool_after)
        self.grad_checkpointing = False
        stages = []
        self.feature_info = []
        prev, reduction = in_chans, 1
        for i, w in enumerate(widths):
            pool = i in self.pool_after
            stages.append(GroupConvStage(prev, w, self.group.name, kernel_size, padding, lift=i == 0, pool=pool))
            reduction *= 2 if pool else 1
            self.feature_info.append(dict(num_chs=w * self.group.order, reduction=reduction, module=f'stages.{i}',
                                          group=self.group.name, layout='folded'))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.group_pool = GroupPool(self.group, group_pool)
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    # ----- sizes ------------------------------------------------------------------------------------------
    def _trace_size(self, size: int) -> Tuple[int, bool]:
        """Spatial size after the stages for an input side ``size``, and whether every step is exact."""
        exact = True
        for i in range(len(self.stages)):
            size = size + 2 * self.padding - self.kernel_size + 1
            if size < 1:
                return size, False
            if i in self.pool_after:
                exact &= stride_is_exact(size, 2, 2)
                size //= 2
        return size, exact

    def min_input_size(self) -> int:
        s = 1
        while self._trace_size(s)[0] < 1:
            s += 1
        return s

    def exact_input_sizes(self, h: int, w: int) -> bool:
        """Whether 90-degree rotations of an ``h x w`` input give exactly invariant logits."""
        return self._trace_size(h)[1] and self._trace_size(w)[1] and self._trace_size(h)[0] >= 1 and \
            self._trace_size(w)[0] >= 1

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected an image batch [B, {self.in_chans}, H, W], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__}: expected {self.in_chans} input channels, got {x.shape[1]}; "
                             f"create the model with in_chans={x.shape[1]}")
        m = self.min_input_size()
        if min(x.shape[-2:]) < m:
            raise ValueError(f"{type(self).__name__}: input {tuple(x.shape[-2:])} is too small; the stages need "
                             f"at least {m}x{m}")

    # ----- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stages\.0\.', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage outputs, folded to ``[B, C*|G|, H, W]`` (equivariant), as timm's ``forward_intermediates``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(fold_group(x))
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.group_pool(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.group_pool(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs) -> GroupCNN:
    return create_gequiv_model(GroupCNN, variant, pretrained, first_conv='stages.0.conv', **kwargs)

