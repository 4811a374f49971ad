"""Keypoint models as timm models: a feature pyramid (any timm backbone, or the paper's trunk) + a keypoint head.

Heads (``head=``, see :mod:`gequiv_timm.layers.rcn` for the maths):

* ``'rcn'``: :class:`~gequiv_timm.layers.rcn.RecombinatorHead`, Recombinator Networks (Honari et al., CVPR 2016);
* ``'sumnet'``: :class:`~gequiv_timm.layers.rcn.SumNetHead`, the paper's SumNet baseline;
* ``'single'``: :class:`~gequiv_timm.layers.rcn.SingleScaleHead`, the last level only, upsampled;
* ``'regression'``: :class:`~gequiv_timm.layers.rcn.CoordRegressionHead`, a linear layer on pooled features.

``forward(x)`` returns heatmap logits ``[B, K, H / output_stride, W / output_stride]`` (a softmax over locations
per keypoint turns them into distributions; train with :func:`~gequiv_timm.layers.rcn.heatmap_cross_entropy`
via :meth:`KeypointNet.loss`). The ``'regression'`` head is the exception: it returns ``(x, y)`` pixel
coordinates ``[B, K, 2]`` (its linear layer predicts normalised ``[-1, 1]`` coordinates, which ``forward_head``
returns). :meth:`KeypointNet.predict_keypoints` returns pixel coordinates and confidences
for every head.

Backbones: ``backbone`` is any timm model name that supports ``features_only=True`` (random init unless
``pretrained_backbone=True``), or ``'rcn_paper'`` for :class:`~gequiv_timm.layers.rcn.RCNPaperTrunk`.
``equivariant_stem='p4'`` swaps the backbone's stem (``conv1, bn1, act1`` of a ResNet) for a p4
group-convolution stem pooled over rotations (``mode='invariant'``, random init) through
:func:`gequiv_timm.models.stems.inject_equivariant_stem`; the rest of the backbone is untouched (so the whole
model is *not* rotation-equivariant, only its stem is).

Keypoint names are model configuration (``keypoint_names=`` / ``model.keypoint_names``), never timm
``PretrainedCfg`` fields. Catalog entries: ``registry/rcn.toml``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices

from ..layers.rcn import (
    CoordRegressionHead,
    RCNPaperTrunk,
    RecombinatorHead,
    SingleScaleHead,
    SumNetHead,
    decode_heatmaps,
    heatmap_cross_entropy,
)
from ._helpers import create_gequiv_model

__all__ = ['KeypointNet', 'HEADS']

HEADS = ('rcn', 'sumnet', 'single', 'regression')


class KeypointNet(nn.Module):
    """Feature pyramid + keypoint head.

    Args:
        backbone: a timm model name with ``features_only`` support (e.g. ``'resnet18'``) or ``'rcn_paper'``.
        head: ``'rcn'``, ``'sumnet'``, ``'single'`` or ``'regression'``.
        num_keypoints: ``K``. Default: ``len(keypoint_names)``, else ``num_classes``, else 5.
        keypoint_names: optional names, one per keypoint (kept in :attr:`keypoint_names`).
        num_classes: timm's name for the number of outputs; here an alias of ``num_keypoints`` (they must agree).
        in_chans: input channels. drop_rate: dropout on the coarsest level (``Dropout2d``) or before the
            regression layer. global_pool: only ``'avg'`` (the regression head's pooling); heatmap heads accept
            ``''`` / ``'avg'`` / None and do not pool.
        out_indices: which backbone levels form the pyramid (default: all).
        branch_channels, convs_per_branch, upsample, output_stride: passed to the head. Levels finer than
            ``output_stride`` are not used by the heatmap heads (``branch_channels`` still lists every level).
            The regression head uses the coarsest level only.
        trunk_channels: channels per level of ``'rcn_paper'``.
        equivariant_stem: ``None`` or ``'p4'`` / ``'p4m'`` (needs ``gequiv_timm.models.stems``).
        pretrained_backbone: load timm's pretrained backbone weights (needs the network).

    Shapes: ``[B, in_chans, H, W]`` -> logits ``[B, K, H / output_stride, W / output_stride]`` (regression:
    pixel coordinates ``[B, K, 2]``).

    Example:
        >>> import timm, gequiv_timm
        >>> m = timm.create_model('gequiv_rcn_resnet18').eval()
        >>> m(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 5, 64, 64])
        >>> xy, conf = m.predict_keypoints(torch.randn(2, 1, 64, 64))
        >>> xy.shape, conf.shape
        (torch.Size([2, 5, 2]), torch.Size([2, 5]))
    """

    def __init__(self, backbone: str = 'resnet18', head: str = 'rcn', num_keypoints: Optional[int] = None,
                 keypoint_names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 in_chans: int = 1, drop_rate: float = 0.0, global_pool: Optional[str] = None,
                 out_indices: Optional[Sequence[int]] = None, branch_channels: Union[int, Sequence[int]] = 64,
                 convs_per_branch: int = 2, upsample: str = 'nearest', output_stride: int = 1,
                 trunk_channels: Sequence[int] = (16, 32, 48, 64, 64), equivariant_stem: Optional[str] = None,
                 pretrained_backbone: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"KeypointNet: head must be one of {HEADS}, got {head!r}")
        k = num_keypoints
        if k is None:
            k = len(keypoint_names) if keypoint_names else (num_classes if num_classes else 5)
        if num_classes is not None and num_classes != k:
            raise ValueError(f"KeypointNet: num_classes={num_classes} and num_keypoints={k} disagree; num_classes is "
                             f"timm's name for the number of keypoint maps. Pass only num_keypoints.")
        if keypoint_names is not None and len(keypoint_names) != k:
            raise ValueError(f"KeypointNet: {len(keypoint_names)} keypoint_names for num_keypoints={k}; pass one "
                             f"name per keypoint or keypoint_names=None")
        if global_pool not in (None, '', 'avg'):
            raise ValueError(f"KeypointNet: global_pool must be 'avg' (used by the regression head only), got "
                             f"{global_pool!r}")
        self.head_type, self.backbone_name = head, backbone
        self.num_keypoints = self.num_classes = k
        self.keypoint_names = list(keypoint_names) if keypoint_names is not None else [f'kp{i}' for i in range(k)]
        self.in_chans, self.drop_rate, self.output_stride = in_chans, drop_rate, output_stride
        self.global_pool = 'avg'
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
        if self.head_type == 'sumnet':
            kw['convs_per_branch'] = min(kw['convs_per_branch'], 1)
            return SumNetHead(c, r, k, **kw)
        kw['convs_per_branch'] = min(kw['convs_per_branch'], 1)
        kw['branch_channels'] = kw['branch_channels'] if isinstance(kw['branch_channels'], int) else \
            list(kw['branch_channels'])[-1]
        return SingleScaleHead(c, r, k, **kw)

    # ----- timm API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^backbone\.(conv1|bn1|stem|stages\.0)', blocks=[(r'^backbone\.(\w+)', None),
                                                                           (r'^head\.', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        if hasattr(self.backbone, 'set_grad_checkpointing'):
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'head.level_weight'} if self.head_type == 'sumnet' else set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final 1x1 conv of the RCN head (the regression head's linear layer; SumNet: the whole head)."""
        if self.head_type == 'rcn':
            return self.head.classifier
        if self.head_type == 'regression':
            return self.head.fc
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """New output layer(s) for ``num_classes`` keypoints; keypoint names become ``kp0 ...``.

        ``num_classes=0`` removes the head: ``forward`` then returns the feature pyramid (a list).
        """
        if global_pool not in (None, '', 'avg'):
            raise ValueError(f"KeypointNet.reset_classifier: global_pool must be 'avg' or None, got {global_pool!r}")
        self.num_classes = self.num_keypoints = num_classes
        self.keypoint_names = [f'kp{i}' for i in range(num_classes)]
        if num_classes == 0:
            self.head = None
            return
        dev = next(self.parameters()).device
        if self.head_type == 'rcn' and self.head is not None:
            self.head.reset_classifier(num_classes)
        else:
            self.head = self._make_head(num_classes).to(dev)

    def _pyramid(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"KeypointNet: expected an image batch [B, {self.in_chans}, H, W], got "
                             f"{tuple(x.shape)}; create the model with in_chans={x.shape[1] if x.dim() == 4 else '?'}")
        m = self.pyramid_reductions[-1]
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"KeypointNet: input size {tuple(x.shape[-2:])} must be divisible by {m} (the "
                             f"coarsest level's stride) so that every level is an exact x2 of the next")
        feats = self.backbone(x)
        return list(feats)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """The pyramid levels (finest first), as timm's ``forward_intermediates``; the final output is the
        coarsest level."""
        if output_fmt != 'NCHW':
            raise ValueError(f"KeypointNet: output_fmt must be 'NCHW', got {output_fmt!r}")
        feats = self._pyramid(x)
        take_indices, _ = feature_take_indices(len(feats), indices)
        intermediates = [feats[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return feats[-1], intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drop the head (the backbone is kept whole: a timm features_only backbone cannot be cut here)."""
        take_indices, _ = feature_take_indices(len(self.pyramid_channels), indices)
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The feature pyramid, finest first: ``[[B, C_l, H / r_l, W / r_l], ...]``."""
        feats = self._pyramid(x)
        feats[-1] = self.drop(feats[-1])
        return feats

    def forward_head(self, feats: List[torch.Tensor], pre_logits: bool = False,
                     out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("KeypointNet: the head was removed (num_classes=0); call reset_classifier(K)")
        if self.head_type == 'regression':
            if pre_logits:
                return feats[-1].mean((-2, -1))
            return self.head(feats)
        feats = feats[self.level_start:]
        if pre_logits:
            if self.head_type != 'rcn':
                raise ValueError(f"KeypointNet: head={self.head_type!r} has no single pre-logit map (each level "
                                 f"predicts its own); pre_logits is supported by head='rcn' and 'regression'")
            return self.head(feats, out_size, pre_logits=True)
        return self.head(feats, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_features(x)
        if self.head is None:
            return feats
        if self.head_type == 'regression':
            return CoordRegressionHead.to_pixels(self.forward_head(feats), x.shape[-2:])
        s = self.output_stride
        return self.forward_head(feats, out_size=(x.shape[-2] // s, x.shape[-1] // s))

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
        out = self(x)
        if self.head_type == 'regression':
            coords = out
            return coords, torch.full(coords.shape[:2], float('nan'), dtype=coords.dtype, device=coords.device)
        return decode_heatmaps(out, method, self.output_stride, window)


def _create(variant: str, pretrained: bool = False, **kwargs) -> KeypointNet:
    # the catalog's keypoint_names describe its default keypoints; a user asking for another count gets generic
    # names unless they pass their own
    k = kwargs.get('num_keypoints', None)
    if k is None and kwargs.get('num_classes') is not None and 'keypoint_names' in kwargs:
        k = kwargs['num_classes']
    if k is not None:
        kwargs.setdefault('num_classes', k)  # keeps timm from injecting the cfg's num_classes
        names = kwargs.get('keypoint_names')
        if names is not None and len(names) != k and _is_catalog_default(variant, 'keypoint_names', names):
            kwargs['keypoint_names'] = None
    elif kwargs.get('keypoint_names') is not None:
        kwargs.setdefault('num_classes', len(kwargs['keypoint_names']))
    if kwargs.get('features_only'):
        kwargs.setdefault('feature_cfg', {})
    feature_cfg = kwargs.pop('feature_cfg', None)
    return create_gequiv_model(KeypointNet, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _is_catalog_default(variant: str, key: str, value) -> bool:
    from .. import registry
    try:
        entry = registry.get_entry(variant)
    except KeyError:
        return False
    return list(entry.args.get(key, []) or []) == list(value)
