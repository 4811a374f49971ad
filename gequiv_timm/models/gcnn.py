"""Plain G-CNNs as timm models: P4CNN / P4MCNN and their planar twin Z2CNN (Cohen & Welling, ICML 2016), and the
same layout on the cyclic and dihedral groups C8, D8 and C16 (issue 16).

The network is a stack of stages ``group conv -> group batch norm -> ReLU [-> 2x2 spatial max pool]``; the first
stage lifts the planar image to the group (``P4ConvZ2`` / ``P4MConvZ2``; a plain conv for ``z2``). After the last
stage the group axis is max-pooled, so ``forward_features`` is *invariant*: rotating (and, for p4m, mirroring)
the input by 90 degrees rotates the feature map spatially, and the globally pooled logits do not change.

Exactness: every convolution is unpadded (``padding=0``, "valid") or symmetrically padded with stride 1 and the
spatial max pool is 2x2 on an even map, so the invariance is exact (float rounding) for 28x28 input, and for any
input whose map is even-sized where it is pooled (:meth:`GroupCNN.exact_input_sizes` checks a size).

C_N / D_N (``gequiv_c8cnn``, ``gequiv_d8cnn``, ``gequiv_c16cnn``): the P4CNN layout with
:class:`~gequiv_timm.layers.gconv.GroupConv2d` on ``'c8'`` / ``'d8'`` / ``'c16'``, whose filters at the rotations by
``2 pi / N`` are steered in a band-limited circular-harmonic basis (6 weights per 3x3 filter; Weiler, Hamprecht &
Storath, CVPR 2018; :mod:`gequiv_timm.layers.filter_basis`). Widths are chosen so the parameter counts are within
10% of P4CNN's 21,940 (``num_classes=10``): C8 tapers from 7 fields in the two 24-26 px stages to 9 after the
pool (21,188: fewer parameters than escnn's C8 model, 0.69x its convolution MACs; 3 seeds, 4 epochs:
4.6 +- 1.0% error rotated-trained and 5.6 +- 1.3% upright-trained, within the spread of the 9-field layout's
5.0 +- 1.4% and 5.7 +- 1.7%, benchmarks/results/compare_cn_3seeds.md), D8 and C16 6 fields (20,926). The quarter turns
(and, for D8, the mirrors) act exactly on the pixel grid, so the logits are exactly invariant to them, by the same
size rule as P4CNN; at the other rotations (45 degrees for C8 / D8, 22.5 for C16) the invariance is approximate:
``gequiv_timm.symmetry`` measures it on smooth inputs and ``registry/symmetry.json`` stores the figure.

Builders at the bottom (``gequiv_p4cnn``, ``gequiv_p4mcnn``, ``gequiv_z2cnn``, ``gequiv_c8cnn``, ``gequiv_d8cnn``,
``gequiv_c16cnn``); their tags, papers and descriptions: ``registry/gcnn.toml``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..layers.gconv import GroupBatchNorm, GroupConv2d, GroupMaxPool2d, GroupPool, stride_is_exact
from ..layers.filter_basis import resolve_filter_basis
from ..layers.groups import get_group
from ..registry import tagged_cfgs
from ._args import check_choice, check_common, check_indices, check_int, check_ints
from ._helpers import create_gequiv_model, digits_cfg
from ._timm_api import TimmApiMixin

__all__ = ['GroupCNN', 'GroupConvStage']


class GroupConvStage(nn.Module):
    """``GroupConv2d -> GroupBatchNorm -> ReLU [-> GroupMaxPool2d(2)]`` on ``[B, C, |G|, H, W]``."""

    def __init__(self, in_chs: int, out_chs: int, group: str, kernel_size: int = 3, padding: int = 0,
                 lift: bool = False, pool: bool = False, filter_basis: Optional[str] = None,
                 max_frequency: Optional[int] = None):
        super().__init__()
        g = get_group(group)
        self.conv = GroupConv2d(in_chs, out_chs, kernel_size, 'z2' if lift else g.name, g.name, padding=padding,
                                bias=False, planar_input=lift, filter_basis=filter_basis,
                                max_frequency=max_frequency)
        self.bn = GroupBatchNorm(out_chs, g)
        self.act = nn.ReLU(inplace=True)
        self.pool = GroupMaxPool2d(2, group=g) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class GroupCNN(TimmApiMixin, nn.Module):
    """A stack of group-convolution stages with group pooling and a timm classifier head.

    Args:
        group: ``'z2'`` (planar), ``'p4'``, ``'p4m'``, or a cyclic / dihedral group ``'cN'`` / ``'dN'`` (``'c8'``,
            ``'d8'``, ``'c16'``...): logits exactly invariant to the quarter turns (and mirrors) when 4 divides N,
            approximately to the other rotations.
        widths: channels (fields) per stage; the first stage lifts the image to the group.
        kernel_size: odd kernel size of every convolution.
        filter_basis, max_frequency: how every convolution makes its rotated filters
            (:class:`~gequiv_timm.layers.gconv.GroupConv2d`; default: ``'pixel'`` for z2 / p4 / p4m, ``'harmonic'``
            with ``max_frequency=2`` for ``cN`` / ``dN``).
        padding: padding of every convolution (0 = valid, as in the paper).
        pool_after: stage indices followed by a 2x2 spatial max pool.
        group_pool: ``'max'`` or ``'mean'`` pooling over the group axis before the head.
        num_classes, in_chans, drop_rate, global_pool: as every timm model. device, dtype: timm's factory kwargs.

    Shapes: input ``[B, in_chans, H, W]``; ``forward_features`` ``[B, widths[-1], H', W']`` (invariant);
    intermediates ``[B, C * |G|, h, w]`` (folded, equivariant); logits ``[B, num_classes]``.
    """

    stem_tap = False  # the first stage lifts: taps are the stage outputs

    def __init__(self, group: str = 'p4', widths: Sequence[int] = (10,) * 7, kernel_size: int = 3,
                 padding: int = 0, pool_after: Sequence[int] = (1,), group_pool: str = 'max',
                 filter_basis: Optional[str] = None, max_frequency: Optional[int] = None, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0., global_pool: str = 'avg',
                 device=None, dtype=None):
        super().__init__()
        widths = check_ints('GroupCNN', 'widths', widths, 1, what='fields per stage, at least one stage')
        check_int('GroupCNN', 'kernel_size', kernel_size, 1, odd=True)
        check_int('GroupCNN', 'padding', padding, 0)
        pool_after = check_indices('GroupCNN', 'pool_after', pool_after, len(widths),
                                   'stage indices followed by a 2x2 max pool')
        check_choice('GroupCNN', 'group_pool', group_pool, ('max', 'mean'))
        check_common('GroupCNN', num_classes, in_chans, drop_rate)
        self.group = get_group(group)
        # before anything is built: one line naming the argument (the layer's own check, said once)
        resolve_filter_basis(filter_basis, self.group, max_frequency, 'GroupCNN')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.kernel_size = kernel_size
        self.padding = padding
        self.pool_after = tuple(pool_after)
        self.grad_checkpointing = False
        self.stem = nn.Identity()  # the first stage lifts the image to the group
        stages = []
        self.feature_info = []
        prev, reduction = in_chans, 1
        for i, w in enumerate(widths):
            pool = i in self.pool_after
            stages.append(GroupConvStage(prev, w, self.group.name, kernel_size, padding, lift=i == 0, pool=pool,
                                         filter_basis=filter_basis, max_frequency=max_frequency))
            reduction *= 2 if pool else 1
            self.feature_info.append(dict(num_chs=w * self.group.order, reduction=reduction, module=f'stages.{i}',
                                          group=self.group.name, layout='folded'))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.group_pool = GroupPool(self.group, group_pool)
        self._init_head(prev, num_classes, global_pool, drop_rate)
        if device is not None or dtype is not None:  # timm's factory kwargs
            self.to(device=device, dtype=dtype)

    # ----- sizes ------------------------------------------------------------------------------------------
    def _trace_size(self, size: int) -> Tuple[int, bool]:
        """Spatial size after the stages for an input side ``size`` (< 1: too small), and whether every step is
        exact."""
        exact = True
        for i in range(len(self.stages)):
            size = size + 2 * self.padding - self.kernel_size + 1
            if size < 1:
                return size, False
            if i in self.pool_after:
                exact &= stride_is_exact(size, 2, 2)
                size //= 2
                if size < 1:
                    return size, False
        return size, exact

    def min_input_size(self) -> int:
        """The smallest input side (every unpadded conv and 2x2 pool leaves at least one pixel)."""
        s = 1
        while self._trace_size(s)[0] < 1:
            s += 1
        return s

    def exact_input_sizes(self, h: int, w: int) -> bool:
        """Whether 90-degree rotations (and the group's mirrors) of an ``h x w`` input give exactly invariant logits
        (for ``cN`` / ``dN``: the elements that map the pixel grid to itself; the other rotations are approximate at
        every size)."""
        return self._trace_size(h)[1] and self._trace_size(w)[1] and self._trace_size(h)[0] >= 1 and \
            self._trace_size(w)[0] >= 1

    # ----- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stages\.0\.', blocks=r'^stages\.(\d+)')


def _create_gcnn(variant: str, pretrained: bool = False, **kwargs) -> GroupCNN:
    return create_gequiv_model(GroupCNN, variant, pretrained, first_conv='stages.0.conv', **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """28x28 grayscale digits (MNIST mean / std), no crop."""
    return digits_cfg(**{'pool_size': (2, 2), 'first_conv': 'stages.0.conv', 'classifier': 'head.fc',
                         'paper_ids': 'arXiv:1602.07576', **kwargs})


# tags, hub repos and descriptions: registry/gcnn.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_p4cnn': _cfg(),
    'gequiv_p4mcnn': _cfg(),
    'gequiv_z2cnn': _cfg(),
    'gequiv_c8cnn': _cfg(paper_ids='arXiv:1602.07576,arXiv:1711.07289'),
    'gequiv_d8cnn': _cfg(paper_ids='arXiv:1602.07576,arXiv:1711.07289'),
    'gequiv_c16cnn': _cfg(paper_ids='arXiv:1602.07576,arXiv:1711.07289'),
}))


@register_model
def gequiv_p4cnn(pretrained: bool = False, **kwargs) -> GroupCNN:
    """P4CNN (Cohen & Welling 2016) for rotated MNIST: 7 p4 convolutions 3x3, 10 fields, rotation pooling."""
    model_args = dict(group='p4', widths=(10,) * 7, kernel_size=3, padding=0, pool_after=(1,), in_chans=1,
                      num_classes=10)
    return _create_gcnn('gequiv_p4cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4mcnn(pretrained: bool = False, **kwargs) -> GroupCNN:
    """P4MCNN: the P4CNN layout on p4m (rotations and mirrors), 7 fields to match P4CNN's parameters."""
    model_args = dict(group='p4m', widths=(7,) * 7, kernel_size=3, padding=0, pool_after=(1,), in_chans=1,
                      num_classes=10)
    return _create_gcnn('gequiv_p4mcnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_z2cnn(pretrained: bool = False, **kwargs) -> GroupCNN:
    """Z2CNN (Cohen & Welling 2016): the planar counterpart of P4CNN, 7 convolutions 3x3, 20 channels."""
    model_args = dict(group='z2', widths=(20,) * 7, kernel_size=3, padding=0, pool_after=(1,), in_chans=1,
                      num_classes=10)
    return _create_gcnn('gequiv_z2cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_c8cnn(pretrained: bool = False, **kwargs) -> GroupCNN:
    """C8-CNN: the P4CNN layout on C8 (rotations by 45 degrees, harmonic 3x3 filters), 7 fields before the
    pool and 9 after it (21,188 parameters, P4CNN's within 4%)."""
    model_args = dict(group='c8', widths=(7, 7, 9, 9, 9, 9, 9), kernel_size=3, padding=0, pool_after=(1,), in_chans=1,
                      num_classes=10)
    return _create_gcnn('gequiv_c8cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_d8cnn(pretrained: bool = False, **kwargs) -> GroupCNN:
    """D8-CNN: the P4CNN layout on D8 (rotations by 45 degrees and mirrors, harmonic 3x3 filters), 6 fields."""
    model_args = dict(group='d8', widths=(6,) * 7, kernel_size=3, padding=0, pool_after=(1,), in_chans=1,
                      num_classes=10)
    return _create_gcnn('gequiv_d8cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_c16cnn(pretrained: bool = False, **kwargs) -> GroupCNN:
    """C16-CNN: the P4CNN layout on C16 (rotations by 22.5 degrees, harmonic 3x3 filters), 6 fields."""
    model_args = dict(group='c16', widths=(6,) * 7, kernel_size=3, padding=0, pool_after=(1,), in_chans=1,
                      num_classes=10)
    return _create_gcnn('gequiv_c16cnn', pretrained, **dict(model_args, **kwargs))
