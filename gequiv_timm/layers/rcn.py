"""Recombinator Networks and friends: keypoint heads that output one spatial distribution per keypoint.

Honari, Yosinski, Vincent & Pal, "Recombinator Networks: Learning Coarse-to-Fine Feature Aggregation",
CVPR 2016. A feature pyramid ``F_0 (finest) ... F_{L-1} (coarsest)`` is read from the coarsest level down:

.. math:: B_{L-1} = \\phi_{L-1}(F_{L-1}), \\qquad B_l = \\phi_l\\big([F_l,\\ \\mathrm{up}(B_{l+1})]\\big),

where ``[.,.]`` concatenates channels, ``up`` is a x2 upsampling (nearest, bilinear or a learned transposed
convolution) and ``phi_l`` is a small stack of 3x3 conv-BN-ReLU. The finest branch ends in a 1x1 conv giving
``K`` maps of logits ``z_k``; the prediction is a softmax over *locations* per keypoint,

.. math:: p_k(i, j) = \\exp z_k(i, j) / \\sum_{i', j'} \\exp z_k(i', j'),

trained with the cross-entropy ``-log p_k(c_k)`` of the discretised true location ``c_k`` (masked where the
keypoint is absent or outside the image). The baseline **SumNet** of the paper predicts ``K`` maps from every level
and sums them after upsampling with learned per-level, per-keypoint weights, ``z_k = sum_l w_{lk} up(z^l_k)``.

The **denoising keypoint model** of the paper takes one-hot keypoint maps in which a fraction of the keypoints was
moved to random locations and outputs the corrected distribution. The **joint model** multiplies the RCN and the
denoiser distributions (renormalised); since ``log_softmax(a) + log_softmax(b) = a + b - const`` per keypoint,
this is the same as summing their pre-softmax values, as the paper does.

Coordinates (``(x, y)`` in input pixels, ``x`` right, ``y`` down, pixel centres at integers) and the functional
core (encoding, the location softmax and its cross-entropy, decoding, corruption) are in
:mod:`gequiv_timm.layers.heatmaps`, re-exported here.

Nothing here imports timm: the heads take a list of 4-D feature maps (finest first) with their channel counts
and reductions, which any timm ``features_only`` backbone provides through ``feature_info``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_float_tensor
from .heatmaps import (
    _check_heatmaps, argmax_keypoints, corrupt_keypoints, decode_heatmaps, heatmap_cross_entropy, joint_log_probs,
    keypoints_to_cells, keypoints_to_onehot, soft_argmax_keypoints, spatial_log_softmax, spatial_softmax,
)

__all__ = [
    'spatial_softmax', 'spatial_log_softmax', 'keypoints_to_cells', 'keypoints_to_onehot', 'heatmap_cross_entropy',
    'argmax_keypoints', 'soft_argmax_keypoints', 'decode_heatmaps', 'corrupt_keypoints', 'joint_log_probs',
    'ConvNormAct', 'Upsample2d', 'RecombinatorHead', 'SumNetHead', 'SingleScaleHead', 'CoordRegressionHead',
    'DenoisingKeypointModel', 'JointKeypointModel', 'RCNPaperTrunk', 'UPSAMPLE_MODES', 'NOTRACE_FUNCTIONS',
]

UPSAMPLE_MODES = ('nearest', 'bilinear', 'learned')


# ----------------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------------
class ConvNormAct(nn.Sequential):
    """``Conv2d(k, padding=k//2, bias=False) -> BatchNorm2d -> ReLU``: ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _conv_stack(in_channels: int, out_channels: int, n: int) -> nn.Sequential:
    layers = [ConvNormAct(in_channels if i == 0 else out_channels, out_channels) for i in range(n)]
    return nn.Sequential(*layers)


class Upsample2d(nn.Module):
    """Upsample ``[B, C, h, w]`` by an integer ``factor`` to exactly ``size`` (default ``(h*factor, w*factor)``).

    ``mode``: ``'nearest'``, ``'bilinear'`` (``align_corners=False``) or ``'learned'`` (a depthwise-free
    ``ConvTranspose2d(C, C, factor, stride=factor)`` initialised to nearest-neighbour copying, then cropped or
    zero-padded to ``size`` when the finer level has an odd size).
    """

    def __init__(self, channels: int, factor: int = 2, mode: str = 'nearest'):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"Upsample2d: mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"Upsample2d: factor must be a positive int, got {factor!r}")
        self.mode, self.factor, self.channels = mode, factor, channels
        self.deconv = None
        if mode == 'learned':
            self.deconv = nn.ConvTranspose2d(channels, channels, factor, stride=factor, bias=False)
            with torch.no_grad():
                self.deconv.weight.zero_()
                self.deconv.weight[torch.arange(channels), torch.arange(channels)] = 1.0

    def extra_repr(self) -> str:
        return f"factor={self.factor}, mode={self.mode!r}"

    def forward(self, x: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        # no int() / Python branching on sizes here: the sizes may be FX proxies (symbolic tracing)
        if size is None:
            size = (x.shape[-2] * self.factor, x.shape[-1] * self.factor)
        if self.mode == 'nearest':
            return F.interpolate(x, size=size, mode='nearest')
        if self.mode == 'bilinear':
            return F.interpolate(x, size=size, mode='bilinear', align_corners=False)
        return fit_size(self.deconv(x), size)


def fit_size(y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop or zero-pad ``y [B, C, h, w]`` at the bottom / right to ``size``. (Opaque to FX tracing: see
    :data:`NOTRACE_FUNCTIONS`.)"""
    dh, dw = int(size[0]) - y.shape[-2], int(size[1]) - y.shape[-1]
    if dh or dw:
        y = F.pad(y, (0, dw, 0, dh))  # negative pads crop
    return y


def check_pyramid(features: Sequence[torch.Tensor], in_channels: Sequence[int], name: str) -> None:
    """The input check of every head. (Opaque to FX tracing: see :data:`NOTRACE_FUNCTIONS`.)"""
    if not isinstance(features, (list, tuple)) or len(features) != len(in_channels):
        n = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
        raise ValueError(f"{name}: expected a list of {len(in_channels)} feature maps (finest first, as timm's "
                         f"features_only returns them), got {n}")
    for i, (f, c) in enumerate(zip(features, in_channels)):
        if f.dim() != 4 or f.shape[1] != c:
            raise ValueError(f"{name}: level {i} should be [B, {c}, H, W], got {tuple(f.shape)}; the head was built "
                             f"for channels {list(in_channels)}")


def check_head_input(x: torch.Tensor, channels: int, name: str) -> None:
    """The input check of a head's ``forward_head``. (Opaque to FX tracing: see :data:`NOTRACE_FUNCTIONS`.)"""
    check_float_tensor(x, f'{name}.forward_head', f'the feature map [B, {channels}, H, W]')
    if x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape)
        raise ValueError(f"{name}.forward_head: expected the feature map [B, {channels}, H, W] that forward_features "
                         f"returns, got {shape}")


def _check_reductions(reductions: Sequence[int], output_stride: int, name: str) -> None:
    if any(not isinstance(r, int) or r < 1 for r in reductions):
        raise ValueError(f"{name}: reductions must be positive ints, got {list(reductions)}")
    for a, b in zip(reductions[:-1], reductions[1:]):
        if b % a != 0 or b == a:
            raise ValueError(f"{name}: each level must be coarser than the previous by an integer factor > 1 "
                             f"(finest first), got reductions {list(reductions)}")
    if not isinstance(output_stride, int) or output_stride < 1 or reductions[0] % output_stride != 0:
        raise ValueError(f"{name}: output_stride must divide the finest reduction {reductions[0]}, got "
                         f"{output_stride!r}")
    ratio = reductions[0] // output_stride
    if ratio & (ratio - 1):
        raise ValueError(f"{name}: finest reduction / output_stride = {ratio} must be a power of two (the head "
                         f"reaches it by x2 steps)")


def _check_num_keypoints(k, name: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"{name}: num_keypoints must be an int >= 0 (0 = no classifier), got {k!r}")
    return k


def _factory(module: nn.Module, device=None, dtype=None) -> dict:
    """``device`` / ``dtype`` for a layer made after construction: the given ones, else those of the module's first
    floating point parameter."""
    if device is None or dtype is None:
        p = next((p for p in module.parameters() if p.is_floating_point()), None)
        if p is not None:
            device = p.device if device is None else device
            dtype = p.dtype if dtype is None else dtype
    return {k: v for k, v in (('device', device), ('dtype', dtype)) if v is not None}


def _new_classifier(in_channels: int, num_keypoints: int, factory: dict) -> nn.Module:
    """A 1x1 conv to ``num_keypoints`` maps (``nn.Identity`` for 0 keypoints)."""
    if num_keypoints == 0:
        return nn.Identity()
    return nn.Conv2d(in_channels, num_keypoints, 1, **factory)


class RecombinatorHead(nn.Module):
    """Recombinator keypoint head over a feature pyramid (see the module docstring for the maths).

    Args:
        in_channels: channels of each level, finest first (``feature_info.channels()``).
        reductions: stride of each level w.r.t. the input, finest first (``feature_info.reduction()``).
        num_keypoints: ``K``; 0 builds the head without its final 1x1 conv (``forward`` then returns the
            pre-logit map).
        branch_channels: channels of each branch's output, an int (all levels) or one per level (finest first).
        convs_per_branch: 3x3 conv-BN-ReLU layers per branch (``phi_l``).
        upsample: ``'nearest'``, ``'bilinear'`` or ``'learned'``.
        output_stride: stride of the output heatmaps (1 = input resolution). When the finest level is coarser,
            the head continues with x2 upsample + conv stages that have no lateral input.

    ``forward(features) = forward_head(forward_features(features))``: :meth:`forward_features` is the
    recombination (every branch, up to the finest map ``[B, out_channels, H', W']``), :meth:`forward_head` the final
    1x1 conv (:attr:`classifier`).

    Shapes:
        features ``[[B, C_l, H/r_l, W/r_l] for l in levels]`` -> logits ``[B, K, H/output_stride, W/output_stride]``.

    Example:
        >>> head = RecombinatorHead([16, 32, 64], [2, 4, 8], num_keypoints=5)
        >>> feats = [torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)]
        >>> head(feats).shape
        torch.Size([2, 5, 64, 64])
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], num_keypoints: int,
                 branch_channels: Union[int, Sequence[int]] = 64, convs_per_branch: int = 2,
                 upsample: str = 'nearest', output_stride: int = 1):
        super().__init__()
        in_channels, reductions = [int(c) for c in in_channels], [int(r) for r in reductions]
        if len(in_channels) != len(reductions) or not in_channels:
            raise ValueError(f"RecombinatorHead: in_channels {in_channels} and reductions {reductions} must be "
                             f"non-empty lists of the same length")
        _check_reductions(reductions, output_stride, 'RecombinatorHead')
        _check_num_keypoints(num_keypoints, 'RecombinatorHead')
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"RecombinatorHead: upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        n = len(in_channels)
        bc = [int(branch_channels)] * n if isinstance(branch_channels, int) else [int(c) for c in branch_channels]
        if len(bc) != n:
            raise ValueError(f"RecombinatorHead: branch_channels needs one entry per level ({n}), got {bc}")
        self.in_channels, self.reductions, self.branch_channels = in_channels, reductions, bc
        self.num_keypoints, self.output_stride, self.upsample_mode = num_keypoints, output_stride, upsample
        # branches[l] consumes [F_l, up(B_{l+1})]; the coarsest consumes F_{L-1} alone.
        self.branches = nn.ModuleList()
        self.ups = nn.ModuleList()
        for lvl in range(n):
            cin = in_channels[lvl] + (bc[lvl + 1] if lvl < n - 1 else 0)
            self.branches.append(_conv_stack(cin, bc[lvl], convs_per_branch))
            if lvl < n - 1:
                self.ups.append(Upsample2d(bc[lvl + 1], reductions[lvl + 1] // reductions[lvl], upsample))
        # refinement stages from the finest level down to output_stride
        self.refine_ups = nn.ModuleList()
        self.refine = nn.ModuleList()
        c, r = bc[0], reductions[0]
        while r > output_stride:
            cout = max(c // 2, 16)
            self.refine_ups.append(Upsample2d(c, 2, upsample))
            self.refine.append(_conv_stack(c, cout, 1))
            c, r = cout, r // 2
        self.out_channels = c
        self.classifier = nn.Conv2d(c, num_keypoints, 1) if num_keypoints else nn.Identity()

    def reset_classifier(self, num_keypoints: int, device=None, dtype=None) -> None:
        """A fresh final 1x1 conv for ``num_keypoints`` maps (0: none), on ``device`` / ``dtype`` (default: the
        head's); the branches are kept."""
        self.num_keypoints = _check_num_keypoints(num_keypoints, 'RecombinatorHead')
        self.classifier = _new_classifier(self.out_channels, num_keypoints, _factory(self, device, dtype))

    def forward_features(self, features: Sequence[torch.Tensor],
                         out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The recombined finest map ``[B, out_channels, H', W']`` before the final 1x1 conv. ``features``: finest
        first. ``out_size``: the exact ``(H', W')`` (default: finest size times ``reductions[0] / output_stride``)."""
        check_pyramid(features, self.in_channels, 'RecombinatorHead')
        n = len(features)
        b = self.branches[n - 1](features[n - 1])
        for lvl in range(n - 2, -1, -1):
            up = self.ups[lvl](b, features[lvl].shape[-2:])
            b = self.branches[lvl](torch.cat([features[lvl], up], 1))
        for i, (up, conv) in enumerate(zip(self.refine_ups, self.refine)):
            last = i == len(self.refine) - 1
            size = out_size if (last and out_size is not None) else None
            b = conv(up(b, size))
        return b

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The final 1x1 conv: ``[B, out_channels, H', W'] -> [B, K, H', W']`` (identity when K = 0)."""
        check_head_input(x, self.out_channels, 'RecombinatorHead')
        return self.classifier(x)

    def forward(self, features: Sequence[torch.Tensor], out_size: Optional[Sequence[int]] = None,
                pre_logits: bool = False) -> torch.Tensor:
        """Logits ``[B, K, H', W']``; ``pre_logits=True`` returns :meth:`forward_features`' map instead."""
        x = self.forward_features(features, out_size)
        return x if pre_logits else self.forward_head(x)


class SumNetHead(nn.Module):
    """The SumNet baseline of Honari et al.: every level predicts ``K`` maps, upsampled to the output size and
    summed with learned per-level, per-keypoint weights ``w [L, K]`` (initialised to 1):
    ``z_k = sum_l w_{lk} up(c_l(phi_l(F_l)))_k``, with ``phi_l`` (:attr:`branches`) ``convs_per_branch`` 3x3
    conv-BN-ReLU layers and ``c_l`` (:attr:`classifiers`) a 1x1 conv per level.

    Args as :class:`RecombinatorHead`. ``upsample`` is ``'nearest'`` or ``'bilinear'`` (levels are resized straight
    to the output size). ``num_keypoints=0`` builds the head without ``c_l`` and ``w``.

    :meth:`forward` upsamples the ``K``-map predictions. The timm split is :meth:`forward_features` (the branch
    features ``phi_l(F_l)`` upsampled to the output size and concatenated, ``[B, sum_l C'_l, H', W']``) and
    :meth:`forward_head` (each level's 1x1 conv on its slice, weighted and summed). Both give the same logits
    because a 1x1 conv commutes with nearest / bilinear upsampling (each output pixel of the upsampling is an
    affine combination of input pixels with weights summing to 1); the split materialises the upsampled features
    and costs more memory, so :meth:`forward` does not take it.

    Example:
        >>> head = SumNetHead([16, 32], [2, 4], num_keypoints=3)
        >>> head([torch.randn(1, 16, 16, 16), torch.randn(1, 32, 8, 8)]).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], num_keypoints: int,
                 branch_channels: Union[int, Sequence[int]] = 64, convs_per_branch: int = 1,
                 upsample: str = 'bilinear', output_stride: int = 1):
        super().__init__()
        name = type(self).__name__
        in_channels, reductions = [int(c) for c in in_channels], [int(r) for r in reductions]
        if len(in_channels) != len(reductions) or not in_channels:
            raise ValueError(f"{name}: in_channels {in_channels} and reductions {reductions} must be non-empty "
                             f"lists of the same length")
        _check_reductions(reductions, output_stride, name)
        _check_num_keypoints(num_keypoints, name)
        if upsample not in ('nearest', 'bilinear'):
            raise ValueError(f"{name}: upsample must be 'nearest' or 'bilinear' (maps are resized straight to the "
                             f"output size), got {upsample!r}")
        n = len(in_channels)
        bc = [int(branch_channels)] * n if isinstance(branch_channels, int) else [int(c) for c in branch_channels]
        if len(bc) != n:
            raise ValueError(f"{name}: branch_channels needs one entry per level ({n}), got {bc}")
        self.in_channels, self.reductions, self.num_keypoints = in_channels, reductions, num_keypoints
        self.output_stride, self.upsample_mode = output_stride, upsample
        self.level_channels = [b if convs_per_branch else c for c, b in zip(in_channels, bc)]
        self.out_channels = sum(self.level_channels)
        self.branches = nn.ModuleList(_conv_stack(c, b, convs_per_branch) for c, b in zip(in_channels, bc))
        self.classifiers = nn.ModuleList()
        self.level_weight = None
        self._make_classifiers(num_keypoints, {})

    def _make_classifiers(self, k: int, factory: dict) -> None:
        self.classifiers = nn.ModuleList(nn.Conv2d(c, k, 1, **factory) for c in self.level_channels) if k else \
            nn.ModuleList()
        self.level_weight = nn.Parameter(torch.ones(len(self.level_channels), k, **factory)) if k else None

    def reset_classifier(self, num_keypoints: int, device=None, dtype=None) -> None:
        """Fresh per-level 1x1 convs and level weights (1) for ``num_keypoints`` maps (0: none), on ``device`` /
        ``dtype`` (default: the head's); the branches are kept."""
        self.num_keypoints = _check_num_keypoints(num_keypoints, type(self).__name__)
        self._make_classifiers(num_keypoints, _factory(self, device, dtype))

    def _out_size(self, features: Sequence[torch.Tensor], out_size):
        if out_size is not None:
            return out_size
        f = self.reductions[0] // self.output_stride
        return (features[0].shape[-2] * f, features[0].shape[-1] * f)

    def _resize(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.upsample_mode == 'nearest':
            return F.interpolate(x, size=size, mode='nearest')
        return F.interpolate(x, size=size, mode='bilinear', align_corners=False)

    def forward_features(self, features: Sequence[torch.Tensor],
                         out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``cat_l up(phi_l(F_l))``: ``[B, out_channels, H', W']`` (see the class docstring)."""
        check_pyramid(features, self.in_channels, type(self).__name__)
        size = self._out_size(features, out_size)
        return torch.cat([self._resize(branch(f), size) for f, branch in zip(features, self.branches)], 1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_l w_l c_l(x_l)`` over the level slices ``x_l`` of :meth:`forward_features`' map (identity when
        K = 0)."""
        check_head_input(x, self.out_channels, type(self).__name__)
        if self.level_weight is None:
            return x
        out, start = None, 0
        for lvl, (c, clf) in enumerate(zip(self.level_channels, self.classifiers)):
            z = clf(x[:, start:start + c]) * self.level_weight[lvl][None, :, None, None]
            out, start = (z if out is None else out + z), start + c
        return out

    def forward(self, features: Sequence[torch.Tensor], out_size: Optional[Sequence[int]] = None,
                pre_logits: bool = False) -> torch.Tensor:
        """Logits ``[B, K, H', W']``; ``pre_logits=True`` (or K = 0): :meth:`forward_features`' map."""
        if pre_logits or self.level_weight is None:
            return self.forward_features(features, out_size)
        check_pyramid(features, self.in_channels, type(self).__name__)
        size = self._out_size(features, out_size)
        out = None
        for lvl, (f, branch, clf) in enumerate(zip(features, self.branches, self.classifiers)):
            z = self._resize(clf(branch(f)), size) * self.level_weight[lvl][None, :, None, None]
            out = z if out is None else out + z
        return out


class SingleScaleHead(nn.Module):
    """The single-scale baseline: only the coarsest level predicts ``K`` maps (``convs_per_branch`` 3x3
    conv-BN-ReLU layers, :attr:`branch`, then a 1x1 conv, :attr:`classifier`), resized to the output size
    (``upsample`` ``'bilinear'`` or ``'nearest'``). Takes the whole pyramid (same call as the other heads) and
    ignores all but the last level.

    :meth:`forward_features` is the branch output at the coarsest level's resolution ``[B, out_channels, h, w]``;
    :meth:`forward_head` the 1x1 conv and the upsampling (by ``reductions[-1] / output_stride``).
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], num_keypoints: int,
                 branch_channels: int = 64, convs_per_branch: int = 1, upsample: str = 'bilinear',
                 output_stride: int = 1):
        super().__init__()
        name = type(self).__name__
        self.all_channels, self.all_reductions = [int(c) for c in in_channels], [int(r) for r in reductions]
        if len(self.all_channels) != len(self.all_reductions) or not self.all_channels:
            raise ValueError(f"{name}: in_channels {self.all_channels} and reductions {self.all_reductions} must "
                             f"be non-empty lists of the same length")
        _check_reductions(self.all_reductions, output_stride, name)
        _check_num_keypoints(num_keypoints, name)
        if upsample not in ('nearest', 'bilinear'):
            raise ValueError(f"{name}: upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        self.num_keypoints, self.output_stride, self.upsample_mode = num_keypoints, output_stride, upsample
        self.scale = self.all_reductions[-1] // output_stride
        c = self.all_channels[-1]
        self.out_channels = int(branch_channels) if convs_per_branch else c
        self.branch = _conv_stack(c, self.out_channels, convs_per_branch)
        self.classifier = nn.Conv2d(self.out_channels, num_keypoints, 1) if num_keypoints else nn.Identity()

    def reset_classifier(self, num_keypoints: int, device=None, dtype=None) -> None:
        self.num_keypoints = _check_num_keypoints(num_keypoints, type(self).__name__)
        self.classifier = _new_classifier(self.out_channels, num_keypoints, _factory(self, device, dtype))

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_pyramid(features, self.all_channels, type(self).__name__)
        return self.branch(features[-1])

    def forward_head(self, x: torch.Tensor, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        check_head_input(x, self.out_channels, type(self).__name__)
        if self.num_keypoints == 0:
            return x
        if out_size is None:
            out_size = (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
        z = self.classifier(x)
        if self.upsample_mode == 'nearest':
            return F.interpolate(z, size=out_size, mode='nearest')
        return F.interpolate(z, size=out_size, mode='bilinear', align_corners=False)

    def forward(self, features: Sequence[torch.Tensor], out_size: Optional[Sequence[int]] = None,
                pre_logits: bool = False) -> torch.Tensor:
        x = self.forward_features(features)
        return x if pre_logits else self.forward_head(x, out_size)


class CoordRegressionHead(nn.Module):
    """Direct coordinate regression: global average pool of the coarsest level, then ``Linear(C, 2K)``.

    Outputs normalised coordinates ``[B, K, 2]`` in ``[-1, 1]`` units of the image (``-1`` / ``+1`` = the outer
    edges, ``align_corners=False`` convention); :meth:`to_pixels` converts them to ``(x, y)`` input pixels. This is
    the "no heatmap" baseline; it is trained with a masked L1 / smooth-L1 loss on the normalised coordinates.
    :meth:`forward_features` is the coarsest level itself, :meth:`forward_head` the pooling and the linear layer.
    ``num_keypoints=0``: no linear layer (``forward_head`` returns the pooled features ``[B, C]``).
    """

    def __init__(self, in_channels: Sequence[int], num_keypoints: int, drop_rate: float = 0.0):
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.num_keypoints = _check_num_keypoints(num_keypoints, type(self).__name__)
        self.out_channels = self.in_channels[-1]
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Identity()
        self._make_fc(num_keypoints, {})

    def _make_fc(self, k: int, factory: dict) -> None:
        self.fc = nn.Linear(self.out_channels, 2 * k, **factory) if k else nn.Identity()
        if k:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def reset_classifier(self, num_keypoints: int, device=None, dtype=None) -> None:
        self.num_keypoints = _check_num_keypoints(num_keypoints, type(self).__name__)
        self._make_fc(num_keypoints, _factory(self, device, dtype))

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_pyramid(features, self.in_channels, type(self).__name__)
        return features[-1]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        check_head_input(x, self.out_channels, type(self).__name__)
        z = self.fc(self.drop(x.mean((-2, -1))))
        return z if self.num_keypoints == 0 else z.view(z.shape[0], self.num_keypoints, 2)

    def forward(self, features: Sequence[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        x = self.forward_features(features)
        return x if pre_logits else self.forward_head(x)

    @staticmethod
    def to_pixels(coords: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Normalised ``[-1, 1]`` (x, y) -> input pixels for an ``H x W`` image (``x = ((u + 1) W - 1) / 2``)."""
        h, w = size[0], size[1]
        return torch.stack([((coords[..., 0] + 1) * w - 1) / 2, ((coords[..., 1] + 1) * h - 1) / 2], -1)

    @staticmethod
    def to_normalised(keypoints: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Input pixels (x, y) -> normalised ``[-1, 1]``; the inverse of :meth:`to_pixels`."""
        h, w = size[0], size[1]
        return torch.stack([(2 * keypoints[..., 0] + 1) / w - 1, (2 * keypoints[..., 1] + 1) / h - 1], -1)


class DenoisingKeypointModel(nn.Module):
    """The paper's denoising keypoint model: one-hot keypoint maps in, corrected keypoint logits out.

    An encoder of ``depth`` stride-2 5x5 conv-BN-ReLU layers (no skip connections: a skip would let it copy the
    corrupted input) down to ``H / 2**depth``, then ``depth`` x2 nearest upsample + 3x3 conv-BN-ReLU stages back
    to ``H x W`` and a 1x1 conv to ``K`` logits. A global-context term (mean-pooled bottleneck -> Linear -> ReLU,
    added back at every bottleneck position) makes every output depend on every input keypoint, so it can learn
    where each keypoint sits relative to the others.

    Train it on :func:`keypoints_to_onehot` of :func:`corrupt_keypoints` with :func:`heatmap_cross_entropy`
    against the true keypoints.

    Shapes: ``[B, K, H, W] -> [B, K, H, W]`` (``H`` and ``W`` divisible by ``2**depth``).
    """

    def __init__(self, num_keypoints: int, width: int = 32, depth: int = 4):
        super().__init__()
        if depth < 1:
            raise ValueError(f"DenoisingKeypointModel: depth must be >= 1, got {depth}")
        self.num_keypoints, self.depth = num_keypoints, depth
        enc, c = [], num_keypoints
        for i in range(depth):
            cout = width * min(2 ** i, 4)
            enc.append(ConvNormAct(c, cout, 5, stride=2))
            c = cout
        self.encoder = nn.Sequential(*enc)
        self.context = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True))
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(depth - 1, -1, -1):
            cout = width * min(2 ** max(i - 1, 0), 4)
            self.ups.append(Upsample2d(c, 2, 'nearest'))
            self.decoder.append(ConvNormAct(c, cout, 3))
            c = cout
        self.classifier = nn.Conv2d(c, num_keypoints, 1)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        _check_heatmaps(onehot, type(self).__name__)
        if onehot.shape[1] != self.num_keypoints:
            raise ValueError(f"{type(self).__name__}: expected {self.num_keypoints} keypoint maps, got "
                             f"{onehot.shape[1]}")
        m = 2 ** self.depth
        if onehot.shape[-2] % m or onehot.shape[-1] % m:
            raise ValueError(f"{type(self).__name__}: map size {tuple(onehot.shape[-2:])} must be divisible by "
                             f"2**depth = {m}")
        sizes = []
        x = onehot
        for layer in self.encoder:
            sizes.append(x.shape[-2:])
            x = layer(x)
        x = x + self.context(x.mean((-2, -1)))[..., None, None]  # global context: every output sees every input
        for up, conv, size in zip(self.ups, self.decoder, reversed(sizes)):
            x = conv(up(x, size))
        return self.classifier(x)


class JointKeypointModel(nn.Module):
    """RCN + denoiser, combined as in the paper.

    ``forward(x)`` runs ``keypoint_net`` (any module giving heatmap logits ``[B, K, H, W]`` at ``stride``), takes
    its argmax keypoints as one-hot maps, runs ``denoiser`` on them and returns the joint logits
    ``log_softmax(z_rcn + weight * z_den)`` (see :func:`joint_log_probs`). ``weight`` is a plain float.
    """

    def __init__(self, keypoint_net: nn.Module, denoiser: DenoisingKeypointModel, stride: int = 1,
                 weight: float = 1.0):
        super().__init__()
        self.keypoint_net, self.denoiser, self.stride, self.weight = keypoint_net, denoiser, stride, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.keypoint_net(x)
        coords, _ = argmax_keypoints(z.detach(), self.stride)
        onehot = keypoints_to_onehot(coords, z.shape[-2:], self.stride).to(z.dtype)
        return joint_log_probs(z, self.denoiser(onehot), self.weight)


class RCNPaperTrunk(nn.Module):
    """The paper-style trunk: ``levels`` resolutions, each two 3x3 conv-BN-ReLU layers, 2x2 max-pool between.

    Modelled on the 5-branch RCN of Honari et al. (grayscale faces, one branch per resolution, the finest at
    input resolution); channel counts are ours (``channels``, finest first). Returns the list of per-level
    features, finest first, like a timm ``features_only`` model; ``channels`` and ``reductions`` describe them.
    ``forward(x, max_level=l)`` stops after level ``l``; :meth:`truncate` drops the stages after it for good.

    Shapes: ``[B, in_chans, H, W] -> [[B, channels[l], H / 2**l, W / 2**l] for l in range(levels)]``.
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (16, 32, 48, 64, 64)):
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.reductions = [2 ** i for i in range(len(self.channels))]
        self.in_chans = in_chans
        self.stages = nn.ModuleList()
        c = in_chans
        for cout in self.channels:
            self.stages.append(nn.Sequential(ConvNormAct(c, cout), ConvNormAct(cout, cout)))
            c = cout

    def truncate(self, levels: int) -> None:
        """Keep the first ``levels`` stages (finest first) and drop the rest."""
        if not 1 <= levels <= len(self.stages):
            raise ValueError(f"RCNPaperTrunk.truncate: levels must be in [1, {len(self.stages)}], got {levels}")
        del self.stages[levels:]
        self.channels, self.reductions = self.channels[:levels], self.reductions[:levels]

    def forward(self, x: torch.Tensor, max_level: Optional[int] = None) -> List[torch.Tensor]:
        check_trunk_input(x, self.in_chans, self.reductions[-1])
        out = []
        for i, stage in enumerate(self.stages):
            if max_level is not None and i > max_level:
                break
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            out.append(x)
        return out


def check_trunk_input(x: torch.Tensor, in_chans: int, multiple: int) -> None:
    """(Opaque to FX tracing: see :data:`NOTRACE_FUNCTIONS`.)"""
    check_float_tensor(x, 'RCNPaperTrunk', f'an image batch [B, {in_chans}, H, W]')
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"RCNPaperTrunk: expected [B, {in_chans}, H, W] ({in_chans} channels), got "
                         f"{tuple(x.shape)}")
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ValueError(f"RCNPaperTrunk: input size {tuple(x.shape[-2:])} must be divisible by {multiple} "
                         f"({multiple.bit_length()} levels)")


#: The Python-level checks that run inside ``forward`` of these modules. They branch on tensor shapes, which
#: symbolic tracing (torch.fx) cannot follow, so a tracer must treat them as opaque leaf functions: the timm-facing
#: models register them with ``timm.layers.register_notrace_function`` (this module does not import timm). Their names
#: have no leading underscore on purpose: torch.fx only autowraps public module-level names.
NOTRACE_FUNCTIONS = (check_pyramid, check_head_input, check_trunk_input, fit_size)
