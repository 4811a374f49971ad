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

The input policy (:func:`check_image_input`, the same for every registered model; the models call it at the top of
``forward_features`` / ``forward_intermediates``, a timm backbone with a swapped stem through a pre-hook on the stem,
:func:`attach_input_policy`):

* ``TypeError``: not a tensor, or not floating point (the kind check of :mod:`gequiv_timm.layers.checks`);
* ``ValueError``, naming the model, what was expected, what was given and what to do: not 4-D ``[B, C, H, W]``;
  ``C != in_chans``; ``H`` or ``W`` below the model's minimum input size (:func:`min_input_size`; every model
  states it) or, for models that need it, not a multiple of their coarsest stride; NaN / Inf values when the
  environment variable ``GEQUIV_TIMM_CHECK_FINITE=1`` is set (read at import into :data:`CHECK_FINITE`, the same
  variable that turns on the group layers' own check);
* an empty batch (``B = 0``) is valid: the model returns an empty output of the shape and dtype a batch of one
  would give, with ``B = 0`` (as torch's convolutions do).

The check runs in eager mode and inside FX graphs (it is registered with timm as a notrace function, so
``torch.fx`` keeps it as one call instead of tracing its Python branches); a TorchScript-compiled model skips it
(``torch.jit.is_scripting()``), the convolutions still reject bad shapes.
"""
# No ``from __future__ import annotations`` here: torch.fx copies the annotations of ``forward`` into the code it
# generates, and TorchScript cannot read them back as strings (timm scripts FX graphs in its tests).
import os
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from ..layers.checks import check_float_tensor

__all__ = ['TimmApiMixin', 'FoldGroup', 'check_image_input', 'attach_input_policy', 'min_input_size', 'model_name',
           'CHECK_FINITE']


def _env_flag(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() not in ('', '0', 'false', 'no')


# GEQUIV_TIMM_CHECK_FINITE=1: every model refuses NaN / Inf input (one reduction and a device sync per forward; off
# by default). Read once at import, as the group layers' own check reads it; tests monkeypatch this attribute.
CHECK_FINITE: bool = _env_flag('GEQUIV_TIMM_CHECK_FINITE')


def check_image_input(x: torch.Tensor, in_chans: int, min_size: int, name: str, multiple: int = 1) -> None:
    """The input policy of every registered model (see the module docstring): raise a clear error unless ``x`` is a
    floating point image batch ``[B, in_chans, H, W]`` with ``H, W >= min_size`` (and multiples of ``multiple``),
    free of NaN / Inf when :data:`CHECK_FINITE` is on. ``B = 0`` passes (an empty batch gives an empty output).

    TypeError for a non-tensor or an integer dtype (e.g. uint8 images); ValueError for the rest. Every message
    starts with ``name`` (the model) and says what to do.
    """
    check_float_tensor(x, name, f'an image batch [B, {in_chans}, H, W]')
    if x.dim() != 4:
        hint = '; add the batch dimension (x[None])' if x.dim() == 3 else ''
        raise ValueError(f"{name}: expected an image batch [B, {in_chans}, H, W], got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected {in_chans} input channels, got {x.shape[1]}; create the model with "
                         f"in_chans={x.shape[1]}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    m = max(1, int(min_size))
    if h < m or w < m:
        raise ValueError(f"{name}: input {h}x{w} is too small; the model needs at least {m}x{m} (its minimum input "
                         f"size): resize or pad the image")
    if multiple > 1 and (h % multiple or w % multiple):
        raise ValueError(f"{name}: input size ({h}, {w}) must be divisible by {multiple} (the coarsest level's "
                         f"stride) so that every level is an exact x2 of the next; pad or resize the image")
    if CHECK_FINITE and x.numel() and not bool(torch.isfinite(x).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{name}: input holds {n_nan} NaN and {n_inf} Inf values (shape {tuple(x.shape)}; "
                         f"GEQUIV_TIMM_CHECK_FINITE is on); check the data pipeline that produced this batch")


# a leaf in every FX trace, also when a wrapper model calls ``forward_features`` of ours as a method (timm's
# autowrap only patches the globals of modules it calls), e.g. the ST-CNN around GroupCNN
torch.fx.wrap('check_image_input')


def model_name(model: nn.Module) -> str:
    """The registered name of a model built by timm (``pretrained_cfg['architecture']``), else its class name."""
    cfg = getattr(model, 'pretrained_cfg', None)
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    return arch or type(model).__name__


# symbolic tracing passes proxies through the hook (the traced graph keeps the stem's own checks); torch < 2.5 only
# has the older name, which is also true under torch.export
_fx_tracing = (getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', None)
               or torch.fx._symbolic_trace.is_fx_tracing)


def _input_policy_hook(module: nn.Module, args: Tuple[torch.Tensor]) -> None:
    """Forward pre-hook of :func:`attach_input_policy` (a plain annotated function, so TorchScript compiles it)."""
    if not torch.jit.is_scripting():
        if not _fx_tracing():
            name, in_chans, min_size = module._gequiv_input_policy
            check_image_input(args[0], in_chans, min_size, name)


def attach_input_policy(model: nn.Module, first: nn.Module, name: str, in_chans: int, min_size: int) -> nn.Module:
    """Apply the input policy to a model whose forward is not ours (a timm backbone with a swapped stem): a forward
    pre-hook on ``first``, the module that receives the image in every forward path (``forward``,
    ``forward_features``, ``forward_intermediates``), checks the input. ``model._gequiv_input_policy`` records
    ``(name, in_chans, min_size)`` for :func:`min_input_size`. Returns ``model``."""
    spec = (str(name), int(in_chans), max(1, int(min_size)))
    first._gequiv_input_policy = spec
    model._gequiv_input_policy = spec
    first.register_forward_pre_hook(_input_policy_hook)
    return model


def min_input_size(model: nn.Module) -> int:
    """The smallest input side ``model`` accepts (every registered model states one; an input below it is refused
    with a ValueError naming it)."""
    inner = getattr(model, 'model', None)  # timm's features_only wrappers (FeatureGetterNet) keep the model here
    for m in (model, inner):
        if m is None:
            continue
        spec = getattr(m, '_gequiv_input_policy', None)
        if spec is not None:
            return spec[2]
        fn = getattr(m, 'min_input_size', None)
        if callable(fn):
            return int(fn())
    raise TypeError(f"min_input_size: {type(model).__name__} is not a gequiv_timm model (it states no minimum "
                    f"input size)")


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

    @torch.jit.ignore
    def export(self) -> nn.Module:
        """A frozen copy for inference, in eval mode: every group convolution is replaced by a plain convolution
        with its expanded filter bank (:func:`~gequiv_timm.layers.export_group_convs`), so no filter expansion
        runs per call. Same logits as the model (to float rounding); the model itself is not changed. The escnn
        baselines' ``export()`` does the same with escnn's own export, so latency is measured alike on both sides.
        """
        from ..layers.gconv import export_group_convs
        return export_group_convs(self, inplace=False).eval()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input policy (:func:`check_image_input`; defined here, where ``torch.fx.wrap`` keeps it a leaf in any
        trace)."""
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.min_input_size(), model_name(self))
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
        x = self._check_input(x)
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
        x = self._check_input(x)
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
