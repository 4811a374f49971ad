"""The timm model API shared by the group-structured networks (G-CNNs, group ResNets, PDE-G-CNNs).

Every such network has the same shape: ``stem -> stages -> group_pool -> head``, where the stages work on group
feature maps ``[B, C, |G|, H, W]`` (or ``[B, C, Or, H, W]`` on M2), ``group_pool`` turns the last one into a planar
map (pooling over the group axis: the "final norm" in timm's terms) and ``head`` is a timm ``ClassifierHead``.
:class:`TimmApiMixin` implements timm's model API once for all of them: ``forward_features``, ``forward_head``,
``forward``, ``forward_intermediates`` (stage outputs folded to ``[B, C*|G|, H, W]``, the 4-D equivariant layout
that ``feature_info`` announces), ``prune_intermediate_layers``, ``reset_classifier``, ``get_classifier``,
``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``.

A class using it is ``class Net(TimmApiMixin, nn.Module)`` and sets, in ``__init__``:

* ``stem``: planar image -> first group map (``nn.Identity()`` when the first stage lifts),
* ``stages``: an ``nn.Sequential`` of stages, ``group_pool``: the module between the last stage and the head,
* ``head``: a ``ClassifierHead`` (:meth:`TimmApiMixin._init_head` makes one),
* ``feature_info``: one entry per tap (tap 0 is the stem output when ``stem_tap`` is True), with ``num_chs``,
* ``num_features``, ``head_hidden_size``, ``num_classes``, ``in_chans``, ``grad_checkpointing``,

and overrides :meth:`min_input_size` (the smallest input side it accepts) and :meth:`fold_order` (the size of
the folded group axis, ``|G|`` by default from ``self.group``) where needed. ``group_matcher`` and
``no_weight_decay`` are defaults to override.

The input check (:func:`check_image_input`) runs in eager mode and inside FX graphs (it is registered with timm
as a notrace function, so ``torch.fx`` keeps it as one call instead of tracing its Python branches); a
TorchScript-compiled model skips it (``torch.jit.is_scripting()``), the convolutions still reject bad shapes.
"""
# No ``from __future__ import annotations`` here: torch.fx copies the annotations of ``forward`` into the code it
# generates, and TorchScript cannot read them back as strings (timm scripts FX graphs in its tests).
from typing import List, Optional, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from ..layers.checks import check_float_tensor

__all__ = ['TimmApiMixin', 'FoldGroup', 'check_image_input']


def check_image_input(x: torch.Tensor, in_chans: int, min_size: int, name: str) -> None:
    """Raise a clear error unless ``x`` is a floating point image batch ``[B, in_chans, H, W]`` with
    ``H, W >= min_size``.

    The policy of :mod:`gequiv_timm.layers.checks`: TypeError for a non-tensor or an integer dtype (e.g. uint8
    images); ValueError (naming ``name``, saying what was expected, what was given and what to do) for a wrong
    rank, channel count or too small a size.
    """
    check_float_tensor(x, name, f'an image batch [B, {in_chans}, H, W]')
    if x.dim() != 4:
        raise ValueError(f"{name}: expected an image batch [B, {in_chans}, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected {in_chans} input channels, got {x.shape[1]}; create the model with "
                         f"in_chans={x.shape[1]}")
    if min_size > 1 and min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name}: input {tuple(x.shape[-2:])} is too small; the stages need at least "
                         f"{min_size}x{min_size}")


# a leaf in every FX trace, also when a wrapper model calls ``forward_features`` of ours as a method (timm's
# autowrap only patches the globals of modules it calls), e.g. the ST-CNN around GroupCNN
torch.fx.wrap('check_image_input')


class FoldGroup(nn.Module):
    """``[B, C, |G|, H, W] -> [B, C*|G|, H, W]``: stands in for ``group_pool`` after pruning with ``prune_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2)


class TimmApiMixin:
    """timm's model API for ``stem -> stages -> group_pool -> head`` networks (see the module docstring)."""

    stem_tap = True  # tap 0 of forward_intermediates / feature_info is the stem output

    # ----- hooks ----------------------------------------------------------------------------------------------
    def min_input_size(self) -> int:
        """The smallest input side the network accepts (1: no size check beyond the layers' own)."""
        return 1

    def fold_order(self) -> int:
        """Channels per field in a folded tap (``|G|``; the number of orientations on M2)."""
        return self.group.order

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input check of every family (defined here, where ``torch.fx.wrap`` keeps it a leaf in any trace)."""
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.min_input_size(), type(self).__name__)
        return x

    def _taps(self) -> int:
        return len(self.stages) + int(self.stem_tap)

    def _stem_with_tap(self, x: torch.Tensor):
        """``(tap 0, stem output)``: the same tensor unless the stem reduces after its tap (e.g. a max pool after
        the stem conv, as ResNet's act1 / maxpool); then override this and :meth:`_prune_stem_after_tap`."""
        x = self.stem(x)
        return x, x

    def _prune_stem_after_tap(self) -> None:
        """Drop what the stem does after tap 0 (called when pruning to tap 0, so forward_features ends there)."""

    # ----- timm API -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)')

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
        """New classifier for ``num_classes`` (0: none), on the model's device and dtype."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stem / stage outputs folded to ``[B, C*|G|, H, W]`` (equivariant), as timm's ``forward_intermediates``.

        The final output is group-pooled like :meth:`forward_features` when the last stage runs, else the last
        stage run, folded.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        check_image_input(x, self.in_chans, self.min_input_size(), type(self).__name__)
        take_indices, max_index = feature_take_indices(self._taps(), indices)
        intermediates = []
        tap, x = self._stem_with_tap(x)
        off = int(self.stem_tap)
        if self.stem_tap and 0 in take_indices:
            intermediates.append(tap.flatten(1, 2))
        last = len(self.stages) if not stop_early else max(0, max_index + 1 - off)
        for i, stage in enumerate(self.stages[:last]):
            x = stage(x)
            if i + off in take_indices:
                intermediates.append(x.flatten(1, 2))
        if intermediates_only:
            return intermediates
        if last == len(self.stages):
            x = self.group_pool(x)
        else:
            x = x.flatten(1, 2)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the stages after the last tap in ``indices``.

        The group pooling before the head plays the role of timm's final norm: with ``prune_norm=True`` it is
        replaced by the fold, so ``forward_features`` returns the last tap itself (``[B, C*|G|, h, w]``);
        otherwise it stays (``[B, C, h, w]``, invariant). ``num_features`` / ``head_hidden_size`` follow.
        """
        take_indices, max_index = feature_take_indices(self._taps(), indices)
        self.stages = self.stages[:max(0, max_index + 1 - int(self.stem_tap))]
        if self.stem_tap and max_index == 0:
            self._prune_stem_after_tap()
        tap_chs = self.feature_info[max_index]['num_chs']
        old_features = self.num_features
        if prune_norm:
            self.group_pool = FoldGroup()
            self.num_features = tap_chs
        else:
            self.num_features = tap_chs // self.fold_order()
        self.head_hidden_size = self.num_features
        if prune_head:
            self.num_classes = 0
        if prune_head or self.num_features != old_features:
            self.head.reset(self.num_classes, pool_type='' if prune_head else None, in_features=self.num_features,
                            **get_device_dtype(self))
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.min_input_size(), type(self).__name__)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.group_pool(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
