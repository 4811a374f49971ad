"""Keypoint models as timm models: a feature pyramid (any timm backbone, or the paper's trunk) + a keypoint head.

Heads (``head=``, see :mod:`gequiv_timm.layers.rcn` for the maths):

* ``'rcn'``: :class:`~gequiv_timm.layers.rcn.RecombinatorHead`, Recombinator Networks (Honari et al., CVPR 2016);
* ``'sumnet'``: :class:`~gequiv_timm.layers.rcn.SumNetHead`, the paper's SumNet baseline;
* ``'single'``: :class:`~gequiv_timm.layers.rcn.SingleScaleHead`, the last level only, upsampled;
* ``'regression'``: :class:`~gequiv_timm.layers.rcn.CoordRegressionHead`, a linear layer on pooled features.

``forward(x)`` returns heatmap logits ``[B, K, H / output_stride, W / output_stride]`` (a softmax over locations
per keypoint turns them into distributions; train with :func:`~gequiv_timm.layers.rcn.heatmap_cross_entropy`
via :meth:`KeypointNet.loss`). The ``'regression'`` head is the exception: it returns ``(x, y)`` pixel
coordinates ``[B, K, 2]`` (its linear layer predicts normalised ``[-1, 1]`` coordinates,
:meth:`~gequiv_timm.layers.rcn.CoordRegressionHead.to_pixels` converts them). :meth:`KeypointNet.predict_keypoints`
returns pixel coordinates and confidences for every head.

timm's API: ``num_classes`` is an alias of ``num_keypoints`` (``timm.create_model(name, num_classes=42)`` gives 42
keypoint maps; ``num_classes=0`` the headless model, whose ``forward`` returns pooled features as any timm model);
``forward_features`` returns the last feature map before the keypoint classifier, ``forward_intermediates`` /
``features_only`` the backbone's pyramid levels; FX tracing works; TorchScript does not (see
:class:`KeypointNet`).

Backbones: ``backbone`` is any timm model name that supports ``features_only=True`` (random init unless
``pretrained_backbone=True``), or ``'rcn_paper'`` for :class:`~gequiv_timm.layers.rcn.RCNPaperTrunk`. A catalog
model named after a timm backbone (``gequiv_rcn_resnet18``, ...) takes that backbone's input defaults (3 channels,
224x224, its mean / std); ``gequiv_rcn_paper`` takes the 64x64 grayscale MNIST-landmark canvases it was made for.
``equivariant_stem='p4'`` swaps the backbone's stem (``conv1, bn1, act1`` of a ResNet) for a p4
group-convolution stem pooled over rotations (``mode='invariant'``, random init) through
:func:`gequiv_timm.models.stems.inject_equivariant_stem`; the rest of the backbone is untouched (so the whole
model is *not* rotation-equivariant, only its stem is).

Keypoint names are model configuration (``keypoint_names=`` / ``model.keypoint_names``), never timm
``PretrainedCfg`` fields. Builders at the bottom; tags, papers and descriptions: ``registry/rcn.toml``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import generate_default_cfgs, register_model
from timm.models._features import FeatureDictNet, FeatureInfo, feature_take_indices

from ..layers.rcn import (
    CoordRegressionHead,
    RCNPaperTrunk,
    RecombinatorHead,
    SingleScaleHead,
    SumNetHead,
    decode_heatmaps,
    heatmap_cross_entropy,
)
from ..registry import tagged_cfgs
from ._args import check_float, check_int, check_ints
from ._helpers import backbone_cfg, create_gequiv_model
from ._timm_api import check_image_input, model_name

__all__ = ['KeypointNet', 'HEADS']

HEADS = ('rcn', 'sumnet', 'single', 'regression')
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', '')

# the input check stays one call in plain torch.fx traces too (timm's tracer knows it from models/_fx.py)
torch.fx.wrap('check_image_input')


def _check_args(in_chans, drop_rate, branch_channels, convs_per_branch, output_stride, trunk_channels, out_indices,
                backbone) -> None:
    """KeypointNet's numeric arguments, checked before anything is built."""
    check_int('KeypointNet', 'in_chans', in_chans, 1)
    check_float('KeypointNet', 'drop_rate', drop_rate, 0.0, 1.0, hi_open=True)
    if isinstance(branch_channels, (list, tuple)):
        check_ints('KeypointNet', 'branch_channels', branch_channels, 1, what='one per pyramid level, or one int')
    else:
        check_int('KeypointNet', 'branch_channels', branch_channels, 1, what='or one per pyramid level')
    check_int('KeypointNet', 'convs_per_branch', convs_per_branch, 0)
    check_int('KeypointNet', 'output_stride', output_stride, 1, what='a power of two dividing the finest level')
    if backbone == 'rcn_paper':
        check_ints('KeypointNet', 'trunk_channels', trunk_channels, 1, what='channels per level of rcn_paper')
    if out_indices is not None:
        check_ints('KeypointNet', 'out_indices', out_indices, 0, what="the backbone's feature levels")


def _check_pool(global_pool) -> str:
    gp = 'avg' if global_pool is None else global_pool
    if gp not in POOL_TYPES:
        raise ValueError(f"KeypointNet: global_pool must be one of {POOL_TYPES} (it pools the features of the "
                         f"headless model, num_classes=0, and of forward_head(pre_logits=True)), got {global_pool!r}")
    return gp


class KeypointNet(nn.Module):
    """Feature pyramid + keypoint head.

    Args:
        backbone: a timm model name with ``features_only`` support (e.g. ``'resnet18'``) or ``'rcn_paper'``.
        head: ``'rcn'``, ``'sumnet'``, ``'single'`` or ``'regression'``.
        num_keypoints: ``K`` (0: no keypoint classifier, as timm's ``num_classes=0``). Default: ``num_classes``, else
            ``len(keypoint_names)``, else 5.
        keypoint_names: optional names, one per keypoint (kept in :attr:`keypoint_names`).
        num_classes: timm's name for the number of outputs, an alias of ``num_keypoints`` (they must agree), so
            ``timm.create_model(name, num_classes=42)`` gives 42 keypoint maps and ``num_classes=0`` the headless
            model.
        in_chans: input channels (3, as every timm model; 1 for grayscale such as MNIST landmarks).
        drop_rate: dropout on the coarsest level (``Dropout2d``) or before the regression layer.
        global_pool: pooling of the *headless* output: with ``num_classes=0`` (or ``reset_classifier(0)``)
            ``forward`` returns ``global_pool(forward_features(x))``, ``[B, num_features]`` for ``'avg'`` (the
            default; also ``'max'``, ``'avgmax'``, ``'catavgmax'``) or the map itself for ``''``; so does
            ``forward_head(f, pre_logits=True)``. Keypoint outputs are never pooled.
        out_indices: which backbone levels form the pyramid (default: all).
        branch_channels, convs_per_branch, upsample, output_stride: passed to the head. Levels finer than
            ``output_stride`` are not used by the heatmap heads (``branch_channels`` still lists every level).
            The regression head uses the coarsest level only.
        trunk_channels: channels per level of ``'rcn_paper'``.
        equivariant_stem: ``None`` or ``'p4'`` / ``'p4m'`` (needs ``gequiv_timm.models.stems``).
        pretrained_backbone: load timm's pretrained backbone weights (needs the network).
        device, dtype: timm's factory arguments; the model is built, then moved.

    timm's split: ``forward(x) = forward_head(forward_features(x))``.

    * :meth:`forward_features` returns one 4-D map ``[B, num_features, H_f, W_f]``, the last features before the
      keypoint classifier: the RCN's recombined finest map (at ``output_stride``), SumNet's upsampled branch
      features (concatenated), the single-scale head's coarsest-level branch, the regression head's coarsest
      pyramid level. The pyramid itself (finest first) is :meth:`forward_intermediates` (and ``features_only``).
    * :meth:`forward_head` is the keypoint classifier: heatmap logits ``[B, K, H / output_stride, W /
      output_stride]``, or for ``'regression'`` ``(x, y)`` pixel coordinates ``[B, K, 2]``.
      (SumNet's ``forward`` sums upsampled ``K``-map predictions instead of materialising the upsampled features;
      the logits are the same, see :class:`~gequiv_timm.layers.rcn.SumNetHead`.)

    TorchScript: not supported. The recombination walks the levels coarsest first, and TorchScript indexes an
    ``nn.ModuleList`` only by literals or in ``enumerate`` order (finest first); supporting it would rename every
    head parameter (and break shipped checkpoints). FX tracing works (the shape checks are notrace functions).

    Shapes: ``[B, in_chans, H, W]`` (``H``, ``W`` divisible by the coarsest stride) -> logits
    ``[B, K, H / output_stride, W / output_stride]`` (regression: pixel coordinates ``[B, K, 2]``).

    Example:
        >>> import timm, gequiv_timm
        >>> m = timm.create_model('gequiv_rcn_resnet18').eval()   # resnet18's defaults: RGB, 224x224
        >>> m(torch.randn(2, 3, 64, 64)).shape                   # any size divisible by 32
        torch.Size([2, 5, 64, 64])
        >>> xy, conf = m.predict_keypoints(torch.randn(2, 3, 64, 64))
        >>> xy.shape, conf.shape
        (torch.Size([2, 5, 2]), torch.Size([2, 5]))
    """

    def __init__(self, backbone: str = 'resnet18', head: str = 'rcn', num_keypoints: Optional[int] = None,
                 keypoint_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 in_chans: int = 3, drop_rate: float = 0.0, global_pool: Optional[str] = 'avg',
                 out_indices: Optional[Sequence[int]] = None, branch_channels: Union[int, Sequence[int]] = 64,
                 convs_per_branch: int = 2, upsample: str = 'nearest', output_stride: int = 1,
                 trunk_channels: Sequence[int] = (16, 32, 48, 64, 64), equivariant_stem: Optional[str] = None,
                 pretrained_backbone: bool = False, device=None, dtype=None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"KeypointNet: head must be one of {HEADS}, got {head!r}")
        _check_args(in_chans, drop_rate, branch_channels, convs_per_branch, output_stride, trunk_channels,
                    out_indices, backbone)
        k = num_keypoints
        if k is None:
            k = num_classes if num_classes is not None else (len(keypoint_names) if keypoint_names else 5)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"KeypointNet: num_keypoints must be an int >= 0 (0 = headless), got {k!r}")
        if num_classes is not None and num_classes != k:
            raise ValueError(f"KeypointNet: num_classes={num_classes} and num_keypoints={k} disagree; num_classes is "
                             f"timm's name for the number of keypoint maps. Pass only num_keypoints.")
        if keypoint_names is not None and len(keypoint_names) != k:
            raise ValueError(f"KeypointNet: {len(keypoint_names)} keypoint_names for num_keypoints={k}; pass one "
                             f"name per keypoint or keypoint_names=None")
        self.head_type, self.backbone_name = head, backbone
        self.num_keypoints = self.num_classes = k
        self.keypoint_names = list(keypoint_names) if keypoint_names is not None else [f'kp{i}' for i in range(k)]
        self.in_chans, self.drop_rate, self.output_stride = in_chans, drop_rate, output_stride
        self.grad_checkpointing = False
        self._head_kwargs = dict(branch_channels=branch_channels, convs_per_branch=convs_per_branch,
                                 upsample=upsample, output_stride=output_stride)

        if backbone == 'rcn_paper':
            if equivariant_stem:
                raise ValueError("KeypointNet: equivariant_stem applies to timm backbones, not 'rcn_paper'")
            self.backbone = RCNPaperTrunk(in_chans, trunk_channels)
            channels, reductions = self.backbone.channels, self.backbone.reductions
            modules = [f'backbone.stages.{i}' for i in range(len(channels))]
            if out_indices is not None:
                raise ValueError("KeypointNet: out_indices is for timm backbones; choose trunk_channels instead")
        else:
            import timm
            fkw = dict(features_only=True, pretrained=pretrained_backbone, in_chans=in_chans)
            if out_indices is not None:
                fkw['out_indices'] = tuple(out_indices)
            try:
                self.backbone = timm.create_model(backbone, **fkw)
            except IndexError as e:  # timm: an out_indices entry past the backbone's levels
                n = len(timm.create_model(backbone, features_only=True, device='meta').feature_info)
                raise ValueError(f"KeypointNet: out_indices must be in [0, {n - 1}] ({backbone!r} has {n} feature "
                                 f"levels), got {tuple(out_indices)}") from e
            except RuntimeError as e:
                raise ValueError(f"KeypointNet: cannot build timm backbone {backbone!r} with features_only=True "
                                 f"({e}); pick a timm model that supports features_only, e.g. 'resnet18'") from e
            if equivariant_stem:
                self._inject_stem(equivariant_stem)
            info = self.backbone.feature_info
            channels, reductions = list(info.channels()), list(info.reduction())
            modules = [f'backbone.{m}' for m in info.module_name()]
        self.equivariant_stem = equivariant_stem
        self.pyramid_channels, self.pyramid_reductions = list(channels), list(reductions)
        self.feature_info = [dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(channels, reductions, modules)]
        # levels finer than output_stride do not feed the heatmap heads
        usable = [i for i, r in enumerate(reductions) if r >= output_stride]
        if not usable:
            raise ValueError(f"KeypointNet: output_stride={output_stride} is coarser than every pyramid level "
                             f"(reductions {list(reductions)})")
        self.level_start = usable[0] if head != 'regression' else 0
        bc = self._head_kwargs['branch_channels']
        if not isinstance(bc, int):
            bc = list(bc)
            if len(bc) != len(channels):
                raise ValueError(f"KeypointNet: branch_channels needs one entry per pyramid level ({len(channels)}: "
                                 f"channels {list(channels)}), got {bc}")
            self._head_kwargs['branch_channels'] = bc[self.level_start:]
        self.drop = nn.Dropout2d(drop_rate) if drop_rate > 0 and head != 'regression' else nn.Identity()
        self.head = self._make_head(k)
        self.num_features = self.head.out_channels
        self.global_pool = 'avg'
        self.pool = nn.Identity()
        self._set_pool(global_pool)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # ----- construction -------------------------------------------------------------------------------------
    def _inject_stem(self, group: str) -> None:
        try:
            from .stems import inject_equivariant_stem
        except ImportError as e:
            raise ImportError(f"KeypointNet: equivariant_stem={group!r} needs gequiv_timm.models.stems "
                              f"(inject_equivariant_stem), which is not available: {e}") from e
        self.backbone = inject_equivariant_stem(self.backbone, group=group, mode='invariant', warm_start=False)

    def _make_head(self, k: int) -> nn.Module:
        i0 = self.level_start
        c, r, kw = self.pyramid_channels[i0:], self.pyramid_reductions[i0:], self._head_kwargs
        if self.head_type == 'rcn':
            return RecombinatorHead(c, r, k, **kw)
        if self.head_type == 'regression':
            return CoordRegressionHead(c, k, drop_rate=self.drop_rate)
        kw = dict(kw)
        if kw['upsample'] == 'learned':
            raise ValueError(f"KeypointNet: head={self.head_type!r} resizes level maps straight to the output "
                             f"size; use upsample='bilinear' or 'nearest'")
        kw['convs_per_branch'] = min(kw['convs_per_branch'], 1)
        if self.head_type == 'sumnet':
            return SumNetHead(c, r, k, **kw)
        kw['branch_channels'] = kw['branch_channels'] if isinstance(kw['branch_channels'], int) else \
            list(kw['branch_channels'])[-1]
        return SingleScaleHead(c, r, k, **kw)

    def _set_pool(self, global_pool) -> None:
        self.global_pool = _check_pool(global_pool)
        self.pool = SelectAdaptivePool2d(pool_type=self.global_pool, flatten=bool(self.global_pool))
        self.head_hidden_size = self.num_features * self.pool.feat_mult()

    # ----- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        # timm backbones: conv1/bn1/stem..., layerN / stages.N / stages_N; the paper trunk: stages.N; then the head
        return dict(stem=r"^backbone\.(?:conv1|bn1|stem)",
                    blocks=[(r'^backbone\.(?:layer|stages\.|stages_|blocks\.|blocks_)(\d+)', None),
                            (r'^head\.', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        if hasattr(self.backbone, 'set_grad_checkpointing'):
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'head.level_weight'} if self.head_type == 'sumnet' and self.num_classes else set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The keypoint classifier: the final 1x1 conv (RCN, single-scale), the per-level 1x1 convs (SumNet, an
        ``nn.ModuleList``; its level weights are ``head.level_weight``) or the linear layer (regression)."""
        if self.head is None:
            return nn.Identity()
        if self.head_type == 'regression':
            return self.head.fc
        if self.head_type == 'sumnet':
            return self.head.classifiers
        return self.head.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New keypoint classifier for ``num_classes`` keypoints (names become ``kp0 ...``), on the model's device
        and dtype and in the head's train / eval mode; the rest of the head is kept. ``num_classes=0`` removes it:
        ``forward`` then returns ``global_pool(forward_features(x))`` (``global_pool``: None keeps the current
        one)."""
        if global_pool is not None:
            self._set_pool(global_pool)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"KeypointNet.reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        if self.head is None and num_classes:
            raise RuntimeError("KeypointNet.reset_classifier: the keypoint head was removed by "
                               "prune_intermediate_layers; create the model again to get a head")
        if self.head is not None:
            p = next((p for p in self.parameters() if p.is_floating_point()), None)
            kept = list(self.head.modules())  # held, so that no new module can reuse an old one's id
            self.head.reset_classifier(num_classes, **({} if p is None else dict(device=p.device, dtype=p.dtype)))
            old = {id(m) for m in kept}
            for m in self.head.modules():  # the new classifier takes the head's train / eval mode
                if id(m) not in old:
                    m.training = self.head.training
        self.num_classes = self.num_keypoints = num_classes
        self.keypoint_names = [f'kp{i}' for i in range(num_classes)]

    def min_input_size(self) -> int:
        """The coarsest pyramid level's stride: the input sides must be multiples of it (so every level is an exact
        x2 of the next), and this is the smallest one."""
        return int(self.pyramid_reductions[-1])

    def _pyramid(self, x: torch.Tensor, max_level: Optional[int] = None) -> List[torch.Tensor]:
        check_image_input(x, self.in_chans, self.min_input_size(), model_name(self),
                          multiple=self.pyramid_reductions[-1])
        if isinstance(self.backbone, RCNPaperTrunk):
            return list(self.backbone(x, max_level))
        return list(self.backbone(x))

    def _head_input(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        feats = feats[self.level_start:]
        feats[-1] = self.drop(feats[-1])
        return feats

    def _features_from_pyramid(self, feats: List[torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            return feats[-1]
        # called as a module (not .forward_features) so that FX sees the head's notrace checks
        return self.head(self._head_input(feats), pre_logits=True)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the pyramid levels ``[B, C_l, H / r_l, W / r_l]`` (finest first) picked
        by ``indices`` (an int n: the last n levels; a list: those levels; None: all), and unless
        ``intermediates_only`` the final features (:meth:`forward_features`). ``norm`` is accepted and has no effect
        (there is no final norm). ``stop_early`` (with ``intermediates_only``) stops the paper trunk after the last
        wanted level; a timm ``features_only`` backbone always runs whole. ``output_fmt``: ``'NCHW'`` only."""
        if output_fmt != 'NCHW':
            raise ValueError(f"KeypointNet: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.pyramid_channels), indices)
        feats = self._pyramid(x, max_index if (stop_early and intermediates_only) else None)
        intermediates = [feats[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return self._features_from_pyramid(feats), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Cut the backbone after the last level in ``indices`` and (``prune_head``) remove the keypoint head: then
        :meth:`forward_features` returns the last kept level and ``forward`` that map (``global_pool=''``).
        ``prune_head=False`` is only possible with the last level (the head reads every level). ``prune_norm``
        has no effect (no final norm). Returns the kept indices."""
        n = len(self.pyramid_channels)
        take_indices, max_index = feature_take_indices(n, indices)
        if not prune_head and max_index < n - 1 and self.head is not None:
            raise ValueError(f"KeypointNet.prune_intermediate_layers: the keypoint head reads every pyramid level, so "
                             f"prune_head=False needs the last index ({n - 1}); got indices {indices!r}")
        if max_index < n - 1:
            self._truncate_backbone(max_index + 1)
            self.pyramid_channels = self.pyramid_channels[:max_index + 1]
            self.pyramid_reductions = self.pyramid_reductions[:max_index + 1]
            self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.head = None
            self.drop = nn.Identity()
            self.num_classes = self.num_keypoints = 0
            self.keypoint_names = []
            self.num_features = self.pyramid_channels[-1]
            self._set_pool('')
        return take_indices

    def _truncate_backbone(self, levels: int) -> None:
        bb = self.backbone
        if isinstance(bb, RCNPaperTrunk):
            bb.truncate(levels)
            return
        if isinstance(bb, FeatureDictNet):  # timm's FeatureListNet / FeatureDictNet: an ordered ModuleDict
            ret = list(bb.return_layers)
            names = list(bb.keys())
            for name in names[names.index(ret[levels - 1]) + 1:]:
                del bb[name]
            for name in ret[levels:]:
                del bb.return_layers[name]
            bb.feature_info = FeatureInfo(copy.deepcopy(bb.feature_info.get_dicts()[:levels]), tuple(range(levels)))
            return
        raise NotImplementedError(f"KeypointNet.prune_intermediate_layers: cannot cut a {type(bb).__name__} backbone "
                                  f"(only timm's FeatureListNet / FeatureDictNet and the paper trunk); use "
                                  f"forward_intermediates(indices=...) without pruning")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last features before the keypoint classifier, ``[B, num_features, H_f, W_f]`` (see the class
        docstring); after ``prune_intermediate_layers`` the last kept pyramid level."""
        return self._features_from_pyramid(self._pyramid(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Keypoint outputs from :meth:`forward_features`' map: heatmap logits ``[B, K, H / output_stride,
        W / output_stride]`` or (regression) pixel coordinates ``[B, K, 2]``. ``pre_logits=True`` (and the
        headless model, ``num_classes=0``) returns ``global_pool(x)`` instead."""
        if pre_logits or self.num_classes == 0 or self.head is None:
            return self.pool(x)
        out = self.head.forward_head(x)
        if self.head_type == 'regression':
            r = self.pyramid_reductions[-1]
            out = CoordRegressionHead.to_pixels(out, (x.shape[-2] * r, x.shape[-1] * r))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_type == 'sumnet' and self.head is not None and self.num_classes:
            # same logits as forward_head(forward_features(x)) without materialising the upsampled features
            return self.head(self._head_input(self._pyramid(x)))
        return self.forward_head(self.forward_features(x))

    # ----- keypoint helpers ---------------------------------------------------------------------------------
    def loss(self, out: torch.Tensor, keypoints: torch.Tensor, visible: Optional[torch.Tensor] = None,
             image_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Training loss for this model's output ``out = model(x)``.

        Heatmap heads: masked spatial cross-entropy of the discretised true location
        (:func:`~gequiv_timm.layers.rcn.heatmap_cross_entropy`). Regression (``out`` in pixels): masked smooth-L1
        (beta 0.02) on coordinates normalised to ``[-1, 1]`` (``image_size`` ``(H, W)`` is then required).
        """
        if self.head_type != 'regression':
            return heatmap_cross_entropy(out, keypoints, visible, stride=self.output_stride)
        if image_size is None:
            raise ValueError("KeypointNet.loss: the regression head needs image_size=(H, W) to normalise targets")
        target = CoordRegressionHead.to_normalised(keypoints, image_size)
        out = CoordRegressionHead.to_normalised(out, image_size)
        h, w = image_size
        inside = ((keypoints[..., 0] >= -0.5) & (keypoints[..., 0] < w - 0.5) & (keypoints[..., 1] >= -0.5)
                  & (keypoints[..., 1] < h - 0.5))
        mask = inside if visible is None else inside & visible.bool()
        err = nn.functional.smooth_l1_loss(out, target, reduction='none', beta=0.02).sum(-1)
        return (err * mask).sum() / mask.sum().clamp_min(1)

    @torch.no_grad()
    def predict_keypoints(self, x: torch.Tensor, method: str = 'soft_argmax',
                          window: Optional[int] = 5) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keypoints of a batch: ``(coords [B, K, 2], confidence [B, K])``.

        ``coords`` are ``(x, y)`` input pixels, pixel ``(row i, col j)`` centred at ``(j, i)``. Heatmap heads decode
        by ``method='argmax'`` (cell centre) or ``'soft_argmax'`` (sub-pixel expectation over a ``window x
        window`` patch around the argmax; ``window=None`` = whole map); the confidence is the softmax probability
        of the argmax cell. The regression head has no confidence: it returns NaN there.
        Runs under ``torch.no_grad()`` in the model's current mode (call ``.eval()`` first).
        """
        if self.num_classes == 0:
            raise RuntimeError("KeypointNet.predict_keypoints: the model has no keypoint classifier (num_classes=0); "
                               "call reset_classifier(K) and train it, or create the model with num_keypoints=K")
        out = self(x)
        if self.head_type == 'regression':
            coords = out
            return coords, torch.full(coords.shape[:2], float('nan'), dtype=coords.dtype, device=coords.device)
        return decode_heatmaps(out, method, self.output_stride, window)


# the MNIST-landmark keypoints (gequiv_timm/data/landmarks.py) every catalog model predicts by default
LANDMARK_NAMES = ('top', 'bottom', 'left', 'right', 'centroid')


def _create_keypoint_net(variant: str, pretrained: bool = False, **kwargs) -> KeypointNet:
    # the builders' keypoint_names describe their default keypoints; a user asking for another count gets generic
    # names unless they pass their own
    k = kwargs.get('num_keypoints', None)
    if k is not None:  # checked under its own name before it stands in for timm's num_classes
        check_int(variant, 'num_keypoints', k, 0, what='0 = headless')
    if k is None and kwargs.get('num_classes') is not None and 'keypoint_names' in kwargs:
        k = kwargs['num_classes']
    if k is not None:
        kwargs.setdefault('num_classes', k)  # keeps timm from injecting the cfg's num_classes
        names = kwargs.get('keypoint_names')
        if names is not None and len(names) != k and tuple(names) == LANDMARK_NAMES:
            kwargs['keypoint_names'] = None
    elif kwargs.get('keypoint_names') is not None:
        kwargs.setdefault('num_classes', len(kwargs['keypoint_names']))
    if kwargs.get('features_only'):
        kwargs.setdefault('feature_cfg', {})
    feature_cfg = kwargs.pop('feature_cfg', None)
    return create_gequiv_model(KeypointNet, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """A keypoint model named after a timm backbone takes the backbone's input settings (3 channels, its size,
    mean / std, interpolation; timm's own cfg) with crop_pct 1.0, so that no keypoint is cropped away."""
    return {
        **backbone_cfg('resnet18', keys=('input_size', 'mean', 'std', 'interpolation')),
        'num_classes': 5, 'crop_pct': 1.0, 'pool_size': (224, 224), 'first_conv': 'backbone.conv1',
        'classifier': 'head.classifier', 'paper_ids': 'arXiv:1511.07356', **kwargs,
    }


# tags, hub repos and descriptions: registry/rcn.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    # named for the paper and its data: 64x64 grayscale MNIST-landmark canvases
    'gequiv_rcn_paper': _cfg(input_size=(1, 64, 64), mean=(0.1307,), std=(0.3081,), interpolation='bilinear',
                             pool_size=(64, 64), first_conv='backbone.stages.0.0.0'),
    'gequiv_rcn_resnet18': _cfg(),
    'gequiv_sumnet_resnet18': _cfg(classifier=tuple(f'head.classifiers.{i}' for i in range(5))),
    'gequiv_kpsingle_resnet18': _cfg(pool_size=(7, 7), paper_ids=None),
    'gequiv_kpreg_resnet18': _cfg(pool_size=(7, 7), classifier='head.fc', paper_ids=None),
    'gequiv_rcn_p4_resnet18': _cfg(first_conv='backbone.conv1.lift'),
}))


@register_model
def gequiv_rcn_paper(pretrained: bool = False, **kwargs) -> KeypointNet:
    """Recombinator Network with the paper-style trunk: grayscale, 5 resolution levels (strides 1..16)."""
    model_args = dict(backbone='rcn_paper', head='rcn', trunk_channels=(16, 32, 48, 64, 64),
                      branch_channels=(16, 32, 48, 64, 64), convs_per_branch=2, upsample='nearest', in_chans=1,
                      keypoint_names=LANDMARK_NAMES)
    return _create_keypoint_net('gequiv_rcn_paper', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_rcn_resnet18(pretrained: bool = False, **kwargs) -> KeypointNet:
    """Recombinator keypoint head on a timm resnet18 pyramid (5 levels, strides 2..32), heatmaps at input size."""
    model_args = dict(backbone='resnet18', head='rcn', branch_channels=(32, 48, 64, 96, 128), convs_per_branch=2,
                      upsample='nearest', keypoint_names=LANDMARK_NAMES)
    return _create_keypoint_net('gequiv_rcn_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_sumnet_resnet18(pretrained: bool = False, **kwargs) -> KeypointNet:
    """SumNet baseline on a timm resnet18 pyramid: per-level keypoint maps summed with learned weights."""
    model_args = dict(backbone='resnet18', head='sumnet', branch_channels=(32, 48, 64, 96, 128), convs_per_branch=1,
                      upsample='bilinear', keypoint_names=LANDMARK_NAMES)
    return _create_keypoint_net('gequiv_sumnet_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_kpsingle_resnet18(pretrained: bool = False, **kwargs) -> KeypointNet:
    """Single-scale keypoint baseline: resnet18's last level predicts keypoint maps, bilinearly upsampled."""
    model_args = dict(backbone='resnet18', head='single', branch_channels=128, convs_per_branch=1,
                      upsample='bilinear', keypoint_names=LANDMARK_NAMES)
    return _create_keypoint_net('gequiv_kpsingle_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_kpreg_resnet18(pretrained: bool = False, **kwargs) -> KeypointNet:
    """Direct coordinate regression baseline: a linear layer on resnet18's pooled last level."""
    model_args = dict(backbone='resnet18', head='regression', keypoint_names=LANDMARK_NAMES)
    return _create_keypoint_net('gequiv_kpreg_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_rcn_p4_resnet18(pretrained: bool = False, **kwargs) -> KeypointNet:
    """Recombinator keypoint head on resnet18 with a p4-equivariant stem pooled over rotations."""
    model_args = dict(backbone='resnet18', head='rcn', equivariant_stem='p4', branch_channels=(32, 48, 64, 96, 128),
                      convs_per_branch=2, upsample='nearest', keypoint_names=LANDMARK_NAMES)
    return _create_keypoint_net('gequiv_rcn_p4_resnet18', pretrained, **dict(model_args, **kwargs))
