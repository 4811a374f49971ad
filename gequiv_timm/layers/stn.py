"""Spatial transformers (Jaderberg, Simonyan, Zisserman, Kavukcuoglu, "Spatial Transformer Networks", NeurIPS 2015).

A spatial transformer has three parts:

1. a *localisation net* maps the input ``U [B, C, H, W]`` to transform parameters ``theta``;
2. a *grid generator* maps every output pixel ``(x_t, y_t)`` to a source location ``(x_s, y_s) = T_theta(x_t, y_t)``;
3. a differentiable *sampler* (here ``F.grid_sample``) reads ``U`` at those locations: ``V = U(T_theta(G))``.

The pieces live in three modules, a functional core with thin module wrappers (all re-exported here):

* :mod:`gequiv_timm.layers.stn_warp`: grids, the sampler and ``theta`` builders (functions);
* :mod:`gequiv_timm.layers.stn_transforms`: the transform families (parameters -> ``theta`` -> grid);
* this module: the warp modules, the localisation net and the spatial transformers.

Known problems and what this module does about them:

* *drifting out of the image / collapsing scale*: bounds (above) and :meth:`SpatialTransformer.transform_loss`, a
  regulariser toward the identity (mean squared displacement of probe points) plus a penalty on probe points that
  leave the image square;
* *``align_corners`` mismatch*: one explicit flag used by every grid and by the sampler;
* *unstable training*: identity start, bounds, and a separate (smaller) learning rate for the localisation net, as in
  the paper (see the models' ``param_groups``);
* *invalid ``theta``*: a non-finite ``theta`` or a singular / horizon-crossing projective matrix raises a
  ``ValueError`` saying which sample; with ``invalid='identity'`` the module instead replaces those samples' transforms
  by the identity and counts them in ``last_num_fallbacks`` (documented fallback, never silent NaNs).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stn_transforms import (
    TRANSFORMS, AffineTransform, AttentionTransform, ProjectiveTransform, RotationTransform, SimilarityTransform,
    TPSTransform, TransformFamily, TranslationTransform, create_transform,
)
from .stn_warp import (
    SizeLike, _check_image, _check_sampler, _size2, affine_grid, affine_warp, attention_theta, check_theta,
    homography_from_points, identity_grid, projective_grid, projective_warp, rotation_theta, similarity_theta,
    tps_control_points, tps_grid, tps_solve_matrix, tps_warp, transform_points, translation_theta, warp,
)

__all__ = [
    'TRANSFORMS', 'identity_grid', 'affine_grid', 'projective_grid', 'tps_grid', 'warp', 'affine_warp',
    'projective_warp', 'tps_warp', 'check_theta', 'similarity_theta', 'rotation_theta', 'attention_theta',
    'translation_theta', 'homography_from_points', 'tps_control_points', 'tps_solve_matrix', 'transform_points',
    'TransformFamily', 'AffineTransform', 'SimilarityTransform', 'RotationTransform', 'AttentionTransform',
    'TranslationTransform', 'ProjectiveTransform', 'TPSTransform', 'create_transform',
    'AffineWarp', 'ProjectiveWarp', 'TPSWarp', 'LocalisationCNN', 'SpatialTransformer',
    'ParallelSpatialTransformer',
]


# ----------------------------------------------------------------------------------------------------------------
# warp modules (thin wrappers around the functionals)
# ----------------------------------------------------------------------------------------------------------------
class _WarpBase(nn.Module):
    def __init__(self, out_size: Optional[SizeLike] = None, align_corners: bool = False, mode: str = 'bilinear',
                 padding_mode: str = 'zeros'):
        super().__init__()
        _check_sampler(mode, padding_mode, type(self).__name__)
        self.out_size = None if out_size is None else _size2(out_size, 'out_size')
        self.align_corners, self.mode, self.padding_mode = bool(align_corners), mode, padding_mode

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, align_corners={self.align_corners}, mode={self.mode!r}, "
                f"padding_mode={self.padding_mode!r}")


class AffineWarp(_WarpBase):
    """Module form of :func:`affine_warp`: ``forward(x [B, C, H, W], theta [B, 2, 3]) -> [B, C, *out_size]``."""

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return affine_warp(x, theta, self.out_size, self.align_corners, self.mode, self.padding_mode)


class ProjectiveWarp(_WarpBase):
    """Module form of :func:`projective_warp`: ``forward(x [B, C, H, W], theta [B, 3, 3])``."""

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return projective_warp(x, theta, self.out_size, self.align_corners, self.mode, self.padding_mode)


class TPSWarp(_WarpBase):
    """Module form of :func:`tps_warp` for a ``grid_size`` lattice of control points:
    ``forward(x [B, C, H, W], src [B, N, 2])``."""

    def __init__(self, grid_size: SizeLike = 4, **kwargs):
        super().__init__(**kwargs)
        self.family = TPSTransform(grid_size)

    def forward(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__)
        grid = self.family.grid(src, self.out_size or x.shape[-2:], self.align_corners)
        return warp(x, grid, self.align_corners, self.mode, self.padding_mode)


# ----------------------------------------------------------------------------------------------------------------
# localisation net and the spatial transformer
# ----------------------------------------------------------------------------------------------------------------
class LocalisationCNN(nn.Sequential):
    """The default localisation net: ``[conv k x k -> max-pool 2 -> ReLU] x len(channels)`` -> adaptive average
    pool to ``pool_size`` -> flatten -> linear ``hidden`` -> ReLU. Works for any input size;
    ``num_features = hidden``.

    Shapes: ``[B, in_chans, H, W] -> [B, hidden]``.
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (20, 20), kernel_size: int = 5, hidden: int = 50,
                 pool_size: int = 2):
        layers = []
        c = in_chans
        for co in channels:
            layers += [nn.Conv2d(c, co, kernel_size, padding=kernel_size // 2), nn.MaxPool2d(2, ceil_mode=True),
                       nn.ReLU(inplace=True)]
            c = co
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(), nn.Linear(c * pool_size * pool_size, hidden),
                   nn.ReLU(inplace=True)]
        super().__init__(*layers)
        self.in_chans = in_chans
        self.num_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__, self.in_chans)
        return super().forward(x)


class SpatialTransformer(nn.Module):
    """Spatial transformer: localisation net -> ``num_transforms`` transforms of one family -> warped outputs.

    Args:
        in_chans: channels of the input (image or feature map).
        transform: a family name (:data:`TRANSFORMS`) or a :class:`TransformFamily`.
        loc_net: a module mapping ``[B, in_chans, h, w]`` to features ``[B, F]`` (e.g. a timm model built with
            ``num_classes=0``); ``None`` builds :class:`LocalisationCNN` from ``loc_kwargs``.
        loc_features: ``F``; read from ``loc_net.num_features`` when omitted.
        loc_input_size: resize the input to this size (antialiased bilinear) before the localisation net: predict
            the transform from a small image, sample from the full-resolution one.
        out_size: output size ``(h, w)`` (or an int), or a float ``f``: ``round(f * (H, W))`` of each input;
            ``None`` keeps the input size. Smaller than the input = the paper's CUB trick (transform at high
            resolution, hand a smaller crop on).
        num_transforms: ``K`` transforms predicted in parallel from the same localisation features (the 2x / 4x
            ST-CNN). With ``K > 1`` the output is ``[B, K, C, h, w]``.
        align_corners, mode, padding_mode: passed to every grid generator and to ``grid_sample``.
        invalid: ``'raise'`` (default) raises a ``ValueError`` on a non-finite theta or an unusable homography;
            ``'identity'`` replaces those samples' theta by the identity (counted in ``last_num_fallbacks``).
        reg_weight, boundary_weight: weights of :meth:`transform_loss` (identity regulariser and out-of-image
            penalty).
        **family_kwargs: bounds of the family (``max_translation``, ``scale_range``, ``max_angle``, ...).

    The final regression layer (``self.head``) has zero weight and zero bias, and raw parameters zero mean the
    identity in every family, so at initialisation ``forward(x) == x`` (to float rounding) when ``out_size`` is the
    input size. (Consequence: at the very first step the localisation net itself gets zero gradient — only
    ``head`` does; from the second step on the gradient reaches the whole localisation net.)

    Shapes: ``[B, C, H, W] -> [B, C, h, w]`` (``K = 1``) or ``[B, K, C, h, w]``. After each forward,
    ``last_theta`` holds the (detached) transforms ``[B, ...]`` (``[B, K, ...]`` for ``K > 1``).

    Example:
        >>> stn = SpatialTransformer(1, 'similarity', scale_range=(0.5, 1.5))
        >>> x = torch.rand(2, 1, 28, 28)
        >>> torch.allclose(stn(x), x, atol=1e-5)
        True
    """

    def __init__(self, in_chans: int = 1, transform: Union[str, TransformFamily] = 'affine',
                 loc_net: Optional[nn.Module] = None, loc_features: Optional[int] = None,
                 loc_kwargs: Optional[dict] = None, loc_input_size: Optional[SizeLike] = None,
                 out_size: Optional[SizeLike] = None, num_transforms: int = 1, align_corners: bool = False,
                 mode: str = 'bilinear', padding_mode: str = 'zeros', invalid: str = 'raise',
                 reg_weight: float = 0.0, boundary_weight: float = 0.0, **family_kwargs):
        super().__init__()
        name = type(self).__name__
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
        if not isinstance(num_transforms, int) or num_transforms < 1:
            raise ValueError(f"{name}: num_transforms must be a positive int, got {num_transforms!r}")
        if invalid not in ('raise', 'identity'):
            raise ValueError(f"{name}: invalid must be 'raise' or 'identity', got {invalid!r}")
        _check_sampler(mode, padding_mode, name)
        self.family = create_transform(transform, **family_kwargs)
        if loc_net is None:
            loc_net = LocalisationCNN(in_chans, **(loc_kwargs or {}))
        elif loc_kwargs:
            raise ValueError(f"{name}: loc_kwargs configure the default LocalisationCNN; they cannot be used with a "
                             f"given loc_net")
        if loc_features is None:
            loc_features = getattr(loc_net, 'num_features', None)
            if not isinstance(loc_features, int):
                raise ValueError(f"{name}: cannot tell the localisation net's output size: pass loc_features=F "
                                 f"(it must map [B, {in_chans}, H, W] to [B, F])")
        self.in_chans = in_chans
        self.loc_net = loc_net
        self.loc_features = loc_features
        self.loc_input_size = None if loc_input_size is None else _size2(loc_input_size, 'loc_input_size')
        self.num_transforms = num_transforms
        self.head = nn.Linear(loc_features, num_transforms * self.family.num_params)
        if isinstance(out_size, float):
            if not 0 < out_size <= 16:
                raise ValueError(f"{name}: a float out_size is a scale factor of the input size and must be in "
                                 f"(0, 16], got {out_size}")
            self.out_size = out_size
        else:
            self.out_size = None if out_size is None else _size2(out_size, 'out_size')
        self.align_corners, self.mode, self.padding_mode, self.invalid = bool(align_corners), mode, padding_mode, \
            invalid
        self.reg_weight, self.boundary_weight = float(reg_weight), float(boundary_weight)
        self._theta: Optional[torch.Tensor] = None
        self.last_num_fallbacks = 0
        self.reset_head()

    def reset_head(self) -> None:
        """Zero weight and bias: every transform starts at the identity."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def extra_repr(self) -> str:
        return (f"in_chans={self.in_chans}, num_transforms={self.num_transforms}, out_size={self.out_size}, "
                f"align_corners={self.align_corners}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
                f"invalid={self.invalid!r}")

    # ---------------------------------------------------------------------------------------------------------
    def localise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw parameters ``[B, K, P]`` from the localisation net."""
        z = x
        if self.loc_input_size is not None and tuple(z.shape[-2:]) != self.loc_input_size:
            z = F.interpolate(z, size=self.loc_input_size, mode='bilinear', align_corners=False, antialias=True)
        feats = self.loc_net(z)
        if feats.dim() != 2 or feats.shape[1] != self.loc_features:
            raise ValueError(f"{type(self).__name__}: the localisation net returned {tuple(feats.shape)}, expected "
                             f"[B, {self.loc_features}] (build a timm loc net with num_classes=0 so it returns "
                             f"pooled features)")
        return self.head(feats).view(x.shape[0], self.num_transforms, self.family.num_params)

    def output_size(self, x: torch.Tensor) -> Tuple[int, int]:
        """The output size ``(h, w)`` for input ``x``."""
        if self.out_size is None:
            return int(x.shape[-2]), int(x.shape[-1])
        if isinstance(self.out_size, float):
            return max(1, round(self.out_size * x.shape[-2])), max(1, round(self.out_size * x.shape[-1]))
        return self.out_size

    def predict_theta(self, x: torch.Tensor) -> torch.Tensor:
        """Transforms ``[B*K, ...]`` (sample-major) for ``x``, after the invalid-theta policy."""
        params = self.localise(x).flatten(0, 1)
        theta = self.family.to_theta(params)
        if theta.device.type == 'meta':  # shape-only run (timm's meta-device checks): nothing to validate
            self.last_num_fallbacks = 0
            return theta
        size = self.output_size(x)
        bad = self.family.invalid(theta, size, self.align_corners)
        self.last_num_fallbacks = int(bad.sum())
        if self.last_num_fallbacks:
            if self.invalid == 'raise':
                self.family.check(theta)  # non-finite: raises with its own message
                if self.family.kind == 'projective':
                    self.family.grid(theta, size, self.align_corners)  # singular: raises
                raise ValueError(f"{type(self).__name__}: unusable transform for samples {bad.nonzero().flatten()}")
            ident = self.family.identity_theta(1, theta.dtype, theta.device).expand_as(theta)
            theta = torch.where(bad.view(-1, *([1] * (theta.dim() - 1))), ident, theta)
        return theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, type(self).__name__, self.in_chans)
        theta = self.predict_theta(x)
        self._theta = theta
        b, k = x.shape[0], self.num_transforms
        size = self.output_size(x)
        grid = self.family.grid(theta, size, self.align_corners)  # [B*K, h, w, 2]
        src = x if k == 1 else x[:, None].expand(b, k, *x.shape[1:]).flatten(0, 1)
        out = warp(src, grid, self.align_corners, self.mode, self.padding_mode)
        return out if k == 1 else out.view(b, k, *out.shape[1:])

    # ---------------------------------------------------------------------------------------------------------
    @property
    def last_theta(self) -> Optional[torch.Tensor]:
        """The transforms of the last forward (detached): ``[B, *theta]`` or ``[B, K, *theta]``."""
        if self._theta is None:
            return None
        t = self._theta.detach()
        return t if self.num_transforms == 1 else t.view(-1, self.num_transforms, *t.shape[1:])

    def sampling_grid(self, size: Optional[SizeLike] = None) -> Optional[torch.Tensor]:
        """The sampling grid ``[B*K, h, w, 2]`` of the last transforms (for inspection / plotting)."""
        if self._theta is None:
            return None
        with torch.no_grad():
            if size is None:
                size = self.out_size if isinstance(self.out_size, tuple) else (16, 16)
            return self.family.grid(self._theta.detach(), size, self.align_corners)

    def transform_loss(self, reg_weight: Optional[float] = None,
                       boundary_weight: Optional[float] = None) -> torch.Tensor:
        """``reg_weight * mean deviation from identity + boundary_weight * mean out-of-image penalty`` of the last
        forward's transforms (differentiable; add it to the task loss). Zero before the first forward."""
        rw = self.reg_weight if reg_weight is None else float(reg_weight)
        bw = self.boundary_weight if boundary_weight is None else float(boundary_weight)
        if self._theta is None:
            return self.head.bias.new_zeros(())
        loss = self._theta.new_zeros(())
        if rw:
            loss = loss + rw * self.family.deviation(self._theta).mean()
        if bw:
            loss = loss + bw * self.family.out_of_bounds(self._theta).mean()
        return loss


class ParallelSpatialTransformer(SpatialTransformer):
    """``K`` parallel transformers sharing one localisation net (the paper's 2x / 4x ST-CNN):
    ``[B, C, H, W] -> [B, K, C, h, w]``. Same arguments as :class:`SpatialTransformer`, ``num_transforms=2`` by
    default. Each transform starts at the identity; ``init_translations`` (``K`` pairs ``(tx, ty)``) may instead start
    them on different parts of the image for the translating families (attention, similarity, affine, translation).
    """

    def __init__(self, in_chans: int = 3, transform: Union[str, TransformFamily] = 'attention', num_transforms: int = 2,
                 init_translations: Optional[Sequence[Sequence[float]]] = None, **kwargs):
        super().__init__(in_chans, transform, num_transforms=num_transforms, **kwargs)
        self.init_translations = None if init_translations is None else [tuple(map(float, t)) for t in
                                                                         init_translations]
        self.reset_head()

    def reset_head(self) -> None:
        super().reset_head()
        init = getattr(self, 'init_translations', None)
        if init is None:
            return
        if len(init) != self.num_transforms or any(len(t) != 2 for t in init):
            raise ValueError(f"{type(self).__name__}: init_translations must be {self.num_transforms} pairs (tx, ty), "
                             f"got {init!r}")
        idx = {'affine': (2, 5), 'similarity': (2, 3), 'attention': (1, 2), 'translation': (0, 1)}.get(
            self.family.name)
        if idx is None:
            raise ValueError(f"{type(self).__name__}: init_translations needs a family with a translation "
                             f"(affine, similarity, attention, translation), not {self.family.name!r}")
        bound = getattr(self.family, 'max_translation', None)
        p = self.family.num_params
        with torch.no_grad():
            for k, t in enumerate(init):
                for j, v in zip(idx, t):
                    if bound is not None:
                        if not abs(v) < bound:
                            raise ValueError(f"{type(self).__name__}: init translation {v} is outside the bound "
                                             f"max_translation={bound}")
                        v = math.atanh(v / bound)
                    self.head.bias[k * p + j] = v
