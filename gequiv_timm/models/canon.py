"""Learned canonicalization for any timm model: a small equivariant network predicts the input's pose, the input is
turned back to a canonical pose, and the wrapped model (CNN or ViT, pretrained weights and all) runs unchanged.

Kaba et al., "Equivariance with Learned Canonicalization Functions", ICML 2023 (arXiv:2211.06489); Mondal et al.,
"Equivariant Adaptation of Large Pretrained Models", NeurIPS 2023 (arXiv:2310.01647). Their equiadapt package builds
the canonicalizer on escnn, outside timm; here it is a G-CNN from gequiv_timm's own group layers and the whole is a
timm model::

    image x [B, C, H, W] --canonicalizer--> group logits l(x) [B, |G|] --argmax--> element c(x)
    x --T(c(x))^-1--> canonical image [B, C, H, W] --backbone (any timm model)--> features --head--> logits

**Why it is invariant.** The group logits permute under the group, ``l(g x)[h] = l(x)[g^-1 h]``
(:class:`~gequiv_timm.layers.canon.GroupCanonicalizer`: group convolutions and a spatial mean), so the predicted
element is equivariant, ``c(g x) = g c(x)``, and the canonical image is the same for ``x`` and every turned or
mirrored ``g x``: ``T(g c)^-1 T(g) x = T(c)^-1 x``. For p4 / p4m every step is exact: the logits permute to float
rounding, and the turn back is ``rot90`` / ``flip``, an index permutation, so the backbone receives bit-identical
inputs and the logits of ``x`` and ``g x`` are equal (measured 0.0, :meth:`CanonicalizedModel.check_invariance`),
whatever the backbone. The one exception is a near tie of the two largest group logits within float rounding
(about 1e-7 relative), where ``argmax`` may pick differently for ``x`` and ``g x``. An image that is itself
symmetric gives exact ties, which are harmless (both choices give the same canonical image).

**Cost.** The canonicalizer sees a copy downscaled with ``F.adaptive_avg_pool2d`` to ``min(canon_size, H, W)``
pixels a side (default 64). Adaptive average pooling commutes exactly with ``rot90`` and flips for every ``H, W``
(its bins are mirror-symmetric and the axes are treated alike), so the downscaling costs no exactness; the
canonicalizer's cost is then fixed whatever the input size (default settings, 32 channels: about 0.09 GMACs for
p4, p4m and c8 alike; resnet18 at 224: 1.8 GMACs). Turning the input back costs |G| transforms of the image, not of
the network. Measured batch-1 latency on one CPU thread at 224 (round-robin medians, a loaded machine): resnet18
1.10x (p4) / 1.17x (p4m), vit_small_patch16_224 1.02x / 1.05x, efficientnet_b0 (its builders use ``canon_size=48``)
0.98x / 1.04x; group averaging (p4) 3.4-4.9x.

**C_N / D_N** (``group='c8'``...): rotations by other than quarter turns are resampled (``grid_sample``, bilinear by
default, zeros outside the image) and the group convolutions are only approximately equivariant at them; the quarter
turns and mirrors stay exact. Measured on ``gequiv_canon_c8_resnet18`` (untrained, seeds 0-2, smooth 64-pixel fields
in a disc turned exactly by 45 degrees; ``tests/models/test_canon.py``): the predicted element follows the turn for
48 of 48 samples, and the logits then change by the bilinear turn back's interpolation error, at most 2.1% of
``max |logits|``. An untrained canonicalizer's group logits can nearly tie, and where the approximate equivariance
flips its choice the logits change by far more: :meth:`check_invariance` (2 images) measured 1.4%, 14% and 27% of
``max |logits|`` for seeds 0-2; the symmetry table's figure (``registry/symmetry.json``, generic weights) is the same
kind.

**Training** (Mondal et al.). The choice is a hard ``argmax`` in the forward pass; its gradient is the softmax's
(straight-through): the canonical image is ``sum_h w_h T(h)^-1 x`` with ``w = onehot + p - p.detach()`` (value
exactly the one-hot, gradient of ``p = softmax(l / temperature)``), so the canonicalizer learns from the task loss.
The canonicalization prior keeps upright training images at the identity: ``prior_weight * cross_entropy(l(x), e)``
on the last forward's logits, returned by :meth:`CanonicalizedModel.transform_loss`. ``gequiv-timm train`` adds it
(its Stepper adds ``model.transform_loss()`` when the model has one); a plain PyTorch loop adds it itself::

    out = model(x)
    loss = F.cross_entropy(out, y) + model.transform_loss()
    loss.backward()

``freeze_backbone=True`` trains the canonicalizer only (the backbone's parameters do not require gradients and it
stays in eval mode, batch-norm statistics included).

Two measured helps (``benchmarks/results/canon.md`` and ``canon_sweep.md``: resnet18 trained on upright digits, 3
seeds): :func:`pretrain_canonicalizer` trains the canonicalizer on the prior alone first (cheap: no backbone
forward), which is what keeps upright inputs upright (the task loss's straight-through gradient does not: from a
random canonicalizer, one epoch of it with the prior left 6% (canonicalizer only) and 15% (joint) of the upright
test digits turned; after the pretraining, about 1%); and ``backbone_lr_mult`` (e.g.
0.1) fine-tunes a pretrained backbone jointly at a lower rate than the canonicalizer (:meth:`param_groups`), so
that the backbone keeps its upright accuracy::

    pretrain_canonicalizer(model, upright_images, epochs=15, weight_decay=0.05)
    fit(model, train_set, lr=1e-3)  # with backbone_lr_mult=0.1: the backbone at 1e-4

**Group averaging** (``mode='average'``): the logits averaged over all ``|G|`` transformed copies of the input
(no canonicalizer); exactly invariant, ``|G|`` times the backbone's cost.

**Dense outputs.** ``forward_intermediates`` and ``features_only=True`` return the backbone's feature maps of the
canonical image turned back by the predicted element, ``T(c(x)) F(T(c(x))^-1 x)``: equivariant,
``maps(g x) = T(g) maps(x)`` (exact for p4 / p4m), where a plain backbone's maps are only approximately so.
``forward_features`` returns the backbone's features of the canonical image (what its head takes; invariant).
"""
# No ``from __future__ import annotations``: TorchScript reads the annotations of the scripted forward.
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_device_dtype, register_notrace_function, register_notrace_module
from timm.models import generate_default_cfgs, register_model

from ..layers.canon import GroupAction, GroupCanonicalizer, select_elements, straight_through_onehot
from ..layers.checks import EquivarianceError, check_equivariance
from ..layers.groups import get_group
from ..registry import tagged_cfgs
from ._args import TIMM_RATES, check_choice, check_float, check_int, check_timm_kwargs
from ._helpers import backbone_cfg, create_gequiv_model, merge_backbone_state, scaled_param_groups
from ._timm_api import _fx_tracing, check_image_input, model_name
from .stn import _PrefixedMatcher

# (and the builders, which register_model adds)
__all__ = ['CanonicalizedModel', 'canonicalize', 'check_canon_input', 'pretrain_canonicalizer', 'smooth_disc_field']

MODES = ('canonicalize', 'average')


def check_canon_input(x: torch.Tensor, in_chans: int, min_size: int, name: str, square: bool) -> None:
    """The input policy of every model (:func:`~gequiv_timm.models._timm_api.check_image_input`) and, when the group
    has quarter turns, a square image: a quarter turn of a non-square image changes its shape, so the turned-back
    images of a batch could not be stacked."""
    check_image_input(x, in_chans, min_size, name)
    if square and x.shape[-2] != x.shape[-1]:
        raise ValueError(f"{name}: input {x.shape[-2]}x{x.shape[-1]} is not square; its group has quarter turns, "
                         f"which would change the shape of a non-square image: pad or crop it to a square")


torch.fx.wrap('check_canon_input')  # a leaf in FX traces (with the notrace registrations below)


class _CanonMatcher(_PrefixedMatcher):
    """``canonicalizer.*`` -> group 0 (with the stem); the backbone's own groups shifted by one; the rest last."""

    def __call__(self, name: str):
        if name.startswith('canonicalizer.'):
            return (0.,)
        return super().__call__(name)


def _prefixed(value, prefix: str):
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(prefix + v for v in value)
    return prefix + value


class CanonicalizedModel(nn.Module):
    """A timm model behind a learned, equivariant canonicalizer (module docstring): invariant logits, equivariant
    feature maps, the backbone's weights unchanged.

    Args:
        backbone: a timm model name (built with ``num_classes``, ``in_chans``, ``drop_rate``, ``global_pool`` and
            the remaining keyword arguments, e.g. ``img_size`` or ``drop_path_rate``) or a model instance (used as
            given, with its weights; no further keyword arguments then).
        group: ``'p4'`` (quarter turns), ``'p4m'`` (quarter turns and mirrors): exact; or ``'cN'`` / ``'dN'``
            (``'c8'``: 45-degree turns; the other rotations than quarter turns are resampled, approximate).
        mode: ``'canonicalize'`` (default) or ``'average'`` (group averaging: the logits of the ``|G|`` transformed
            copies averaged; no canonicalizer, ``|G|`` times the backbone's cost).
        canon_size: side of the downscaled copy the canonicalizer sees (``min(canon_size, H, W)``).
        canon_width: fields per hidden layer of the canonicalizer (``canon_width * |G|`` channels); default
            ``max(2, 32 // |G|)`` (32 channels: p4 8 fields, p4m / c8 4), so its cost hardly depends on the group.
        canon_depth: hidden group convolutions after its lifting layer.
        canon_kernel_size: odd size of its lifting filter (the hidden ones are 3x3).
        prior_weight: weight of the canonicalization prior in :meth:`transform_loss` (0 turns it off).
        temperature: softmax temperature of the straight-through gradient.
        freeze_backbone: train the canonicalizer only: the backbone (head included) requires no gradients and stays
            in eval mode (:meth:`set_backbone_frozen`).
        backbone_lr_mult: the backbone's learning rate relative to the canonicalizer's in joint training
            (:meth:`param_groups`, which ``gequiv-timm train`` and :func:`~gequiv_timm.training.fit` use); default 1.
            A pretrained backbone fine-tuned jointly keeps its accuracy better at a lower rate (the canonicalization
            benchmark uses 0.1, ``benchmarks/results/canon.md``).
        interpolation: ``'bilinear'`` (default), ``'bicubic'`` or ``'nearest'``: how ``cN`` / ``dN`` resample the
            rotations that are not quarter turns (unused by p4 / p4m).
        num_classes, in_chans, drop_rate, global_pool: timm's, passed to a backbone built by name.

    Shapes: ``[B, C, H, W]`` (square when the group has quarter turns) -> logits ``[B, num_classes]``.

    Example:
        >>> m = CanonicalizedModel('resnet18', 'p4', num_classes=10, in_chans=1).eval()
        >>> x = torch.randn(2, 1, 32, 32)
        >>> bool(torch.equal(m(x), m(torch.rot90(x, 1, (-2, -1)))))
        True
    """

    __jit_ignored_attributes__ = ['group']

    def __init__(self, backbone: Union[str, nn.Module] = 'resnet18', group='p4', mode: str = 'canonicalize', *,
                 canon_size: int = 64, canon_width: Optional[int] = None, canon_depth: int = 2,
                 canon_kernel_size: int = 5,
                 prior_weight: float = 1.0, temperature: float = 1.0, freeze_backbone: bool = False,
                 backbone_lr_mult: float = 1.0, interpolation: str = 'bilinear', num_classes: Optional[int] = None,
                 in_chans: Optional[int] = None,
                 drop_rate: Optional[float] = None, global_pool: Optional[str] = None, **kwargs):
        super().__init__()
        name = 'CanonicalizedModel'
        # every argument is checked before anything is built
        try:
            grp = get_group(group)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if grp.order == 1:
            raise ValueError(f"{name}: group {grp.name!r} has one element, nothing to canonicalize; use 'p4', 'p4m', "
                             f"'cN' or 'dN'")
        check_choice(name, 'mode', mode, MODES)
        check_int(name, 'canon_size', canon_size, 1)
        canon_width = check_int(name, 'canon_width', canon_width, 1, none_ok=True) or max(2, 32 // grp.order)
        check_int(name, 'canon_depth', canon_depth, 0)
        check_int(name, 'canon_kernel_size', canon_kernel_size, 1, odd=True)
        check_float(name, 'prior_weight', prior_weight, 0.0)
        check_float(name, 'temperature', temperature, 0.0, lo_open=True)
        check_float(name, 'backbone_lr_mult', backbone_lr_mult, 0.0)
        check_choice(name, 'interpolation', interpolation, ('bilinear', 'bicubic', 'nearest'))
        if not isinstance(freeze_backbone, bool):
            raise ValueError(f"{name}: freeze_backbone must be True or False, got {freeze_backbone!r}")
        if isinstance(backbone, str):
            timm_kw = dict(kwargs, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                           global_pool=global_pool)
            timm_kw = {k: v for k, v in timm_kw.items() if v is not None}
            check_timm_kwargs(name, timm_kw, rates=TIMM_RATES)
            import timm
            self.backbone = timm.create_model(backbone, pretrained=False, **timm_kw)
            self.backbone_name = backbone
        elif isinstance(backbone, nn.Module):
            given = {k: v for k, v in dict(kwargs, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                                           global_pool=global_pool).items() if v is not None}
            if given:
                raise TypeError(f"{name}: unexpected keyword arguments {sorted(given)} with a backbone instance (they "
                                f"are only used when the backbone is given by name); set them on the backbone")
            self.backbone = backbone
            self.backbone_name = model_name(backbone)
        else:
            raise TypeError(f"{name}: backbone must be a timm model name or an nn.Module, got "
                            f"{type(backbone).__name__}")
        b = self.backbone
        for attr in ('forward_features', 'forward_head', 'num_features'):
            if not hasattr(b, attr):
                raise ValueError(f"{name}: the backbone {self.backbone_name} has no {attr!r}; a timm model is needed "
                                 f"(forward_features / forward_head / num_features)")
        self.group = grp
        self.order = grp.order
        self.mode = mode
        self.prior_weight = float(prior_weight)
        self.temperature = float(temperature)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.num_classes = int(getattr(b, 'num_classes', 0))
        self.in_chans = int(getattr(b, 'in_chans', in_chans or 3))
        self.num_features = b.num_features
        self.head_hidden_size = getattr(b, 'head_hidden_size', b.num_features)
        self.drop_rate = getattr(b, 'drop_rate', drop_rate or 0.0)
        if hasattr(b, 'output_fmt'):
            self.output_fmt = b.output_fmt
        self.feature_info = []
        for info in getattr(b, 'feature_info', None) or []:
            info = dict(info)
            if 'module' in info:
                info['module'] = 'backbone.' + info['module']
            self.feature_info.append(info)
        self.grad_checkpointing = False
        self.action = GroupAction(grp, interpolation)  # out[h] = T(h) x
        self.inverse_action = GroupAction(grp, interpolation, inverse=True)  # out[h] = T(h)^-1 x
        self.square = self.action.swaps_axes
        if mode == 'canonicalize':
            self.canonicalizer = GroupCanonicalizer(self.in_chans, grp, canon_width, canon_depth, canon_kernel_size,
                                                    canon_size)
            dd = get_device_dtype(b)
            if dd.get('device') is not None or dd.get('dtype') is not None:
                self.canonicalizer.to(**{k: v for k, v in dd.items() if v is not None})
        else:
            self.canonicalizer = None
        self.canon_args = dict(canon_size=canon_size, canon_width=canon_width, canon_depth=canon_depth,
                               canon_kernel_size=canon_kernel_size)
        self.last_logits = None  # the last forward's group logits (with their graph), for the prior
        self.last_elements = None  # the last forward's predicted elements [B] (detached)
        self.backbone_frozen = False
        self.dense_features = False  # set by prune_intermediate_layers: forward_features is then a tap, turned back
        self.set_backbone_frozen(freeze_backbone)

    # ----- freezing -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_backbone_frozen(self, frozen: bool = True) -> 'CanonicalizedModel':
        """Freeze (or unfreeze) the backbone, head included: ``requires_grad`` off and eval mode (its batch-norm
        statistics and dropout stay fixed) while frozen, so that only the canonicalizer trains. Returns ``self``."""
        self.backbone_frozen = bool(frozen)
        self.backbone.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()
        else:
            self.backbone.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, 'backbone_frozen', False):
            self.backbone.eval()
        return self

    @torch.jit.ignore
    def param_groups(self, lr: Optional[float] = None, weight_decay: float = 0.0,
                     backbone_lr_mult: Optional[float] = None) -> List[Dict[str, Any]]:
        """Optimizer param groups: the canonicalizer at the rate, the backbone at ``backbone_lr_mult`` times it
        (default: the model's ``backbone_lr_mult``), each split as timm splits a model's parameters: no weight decay
        for 1-D parameters, biases and :meth:`no_weight_decay`'s names (all of them when ``weight_decay`` is 0).
        Parameters that require no gradient (a frozen backbone) are left out; empty groups are dropped.

        * ``lr=None`` (for timm): the backbone's groups carry ``lr_scale = backbone_lr_mult`` (1 for the others),
          which timm's schedulers apply to the optimizer's rate: ``create_optimizer_v2(model.param_groups(), lr=...)``.
        * ``lr`` given (for a plain torch optimizer and no timm scheduler): explicit ``lr`` and
          ``lr * backbone_lr_mult``, no ``lr_scale`` (it would be applied twice).

        With ``backbone_lr_mult=1`` the optimizer steps are those of timm's own grouping of the model.
        """
        mult = self.backbone_lr_mult if backbone_lr_mult is None else float(backbone_lr_mult)
        nwd = set(self.no_weight_decay())
        buckets: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = not weight_decay or p.ndim <= 1 or n.endswith('.bias') or n in nwd
            buckets.setdefault((n.startswith('backbone.'), no_decay), []).append(p)
        keys = sorted(buckets, key=lambda k: (k[0], not k[1]))
        groups = [dict(params=buckets[k], weight_decay=0.0 if k[1] else weight_decay) for k in keys]
        return scaled_param_groups(groups, [mult if k[0] else 1.0 for k in keys], lr)

    @torch.jit.ignore
    def canonicalizer_parameters(self) -> List[nn.Parameter]:
        """The canonicalizer's parameters (empty in ``mode='average'``)."""
        return [] if self.canonicalizer is None else list(self.canonicalizer.parameters())

    @torch.jit.ignore
    def backbone_parameters(self) -> List[nn.Parameter]:
        """The wrapped model's parameters (its head included)."""
        return list(self.backbone.parameters())

    # ----- input ------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def min_input_size(self) -> int:
        """The smallest input side: the backbone's; the canonicalizer takes any. A gequiv backbone states its own; a
        plain timm backbone: a ViT whose patch embedding is strict about the size, that size (its only size); another
        ViT, its patch; a ConvNeXt, its total stride (its stem and downsampling convs are unpadded); any other, 1
        (its own layers then refuse what they cannot take, with torch's messages)."""
        from ._timm_api import min_input_size as backbone_min
        b = self.backbone
        if hasattr(b, '_gequiv_input_policy') or callable(getattr(b, 'min_input_size', None)):
            return backbone_min(b)
        pe = getattr(b, 'patch_embed', None)
        if pe is not None and getattr(pe, 'img_size', None) is not None and getattr(pe, 'strict_img_size', False):
            return int(max(pe.img_size))
        if pe is not None and getattr(pe, 'patch_size', None) is not None:
            return int(max(pe.patch_size))
        if type(b).__name__ == 'ConvNeXt':
            return int(max(f['reduction'] for f in b.feature_info))
        return 1

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_canon_input(x, self.in_chans, self.min_input_size(), model_name(self), self.square)
        return x

    # ----- canonicalization -------------------------------------------------------------------------------------
    def group_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The canonicalizer's logits ``[B, |G|]``; ``l(g x)[h] = l(x)[g^-1 h]`` (exact for p4 / p4m)."""
        if self.canonicalizer is None:
            raise RuntimeError(f"{model_name(self)}: mode='average' has no canonicalizer (group averaging)")
        return self.canonicalizer(x)

    def _canonical(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(canonical image [B, C, H, W], selection weights [B, |G|])``; the weights are the straight-through
        one-hot of the predicted element (value exactly one-hot, softmax gradient)."""
        assert self.canonicalizer is not None
        logits = self.canonicalizer(x)
        w = straight_through_onehot(logits, self.temperature)
        if not torch.jit.is_scripting():
            self._record(logits, w)
        return select_elements(self.inverse_action(x), w), w

    @torch.jit.unused
    def _record(self, logits: torch.Tensor, w: torch.Tensor) -> None:
        if _fx_tracing():
            return
        self.last_logits = logits
        self.last_elements = w.detach().argmax(-1)

    def canonicalize(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(canonical image [B, C, H, W], predicted elements [B] long)``: ``T(c(x))^-1 x`` and ``c(x)``, indices
        into the group's elements (:mod:`gequiv_timm.layers.groups`: ``M^m R^r`` is ``m * N + r``)."""
        xc, w = self._canonical(self._check_input(x))
        return xc, w.detach().argmax(-1)

    def prior_loss(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``prior_weight * cross_entropy(l(x), identity)``: the canonicalization prior (Mondal et al.) on an upright
        batch ``x``, or on the logits of the last forward when ``x`` is None (0 when there are none, in
        ``mode='average'`` or with ``prior_weight=0``)."""
        if self.canonicalizer is None or self.prior_weight == 0.0:
            p = next(self.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        logits = self.group_logits(self._check_input(x)) if x is not None else self.last_logits
        if logits is None:
            return torch.zeros((), device=next(self.canonicalizer.parameters()).device)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # element 0: the identity
        return self.prior_weight * F.cross_entropy(logits.float(), target)

    @torch.jit.ignore
    def transform_loss(self) -> torch.Tensor:
        """The canonicalization prior on the last forward's batch (:meth:`prior_loss`): add it to the task loss.
        ``gequiv-timm train`` does (training/loop.py); the prior assumes that batch is upright (untransformed
        training data, as Mondal et al.)."""
        return self.prior_loss()

    # ----- timm API ---------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return _CanonMatcher(self.backbone.group_matcher(coarse=coarse))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        nwd = self.backbone.no_weight_decay() if hasattr(self.backbone, 'no_weight_decay') else ()
        return {'backbone.' + n for n in nwd}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        old = next(self.backbone.parameters(), None)
        if global_pool is None:
            self.backbone.reset_classifier(num_classes)
        else:
            self.backbone.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        if old is not None:  # keep the classifier on the model's device / dtype
            self.get_classifier().to(device=old.device, dtype=old.dtype)
        if self.backbone_frozen:
            self.backbone.requires_grad_(False)

    @torch.jit.ignore
    def _average_back(self, f: torch.Tensor) -> torch.Tensor:
        """``(1/|G|) sum_h T(h)^-1 f_h`` for the maps ``f_h`` of the copies ``T(h) x`` ([|G| B, ...] -> [B, ...])."""
        f = f.unflatten(0, (self.order, -1))
        return torch.stack([self.inverse_action.transform(f[h], h) for h in range(self.order)]).mean(0)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """The backbone's ``forward_intermediates`` on the canonical image, each feature map turned back by the
        predicted element: ``T(c(x)) F_i(T(c(x))^-1 x)``, equivariant (``maps(g x) = T(g) maps(x)``, exact for
        p4 / p4m). The final output is :meth:`forward_features`' (canonical frame). ``mode='average'``: the maps of
        the ``|G|`` copies turned back and averaged (exactly equivariant); the final output is the copies' features.
        NCHW only (a token sequence has no plane to turn)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{model_name(self)}: output_fmt must be 'NCHW' (feature maps are turned back by the "
                             f"predicted group element, which needs a plane), got {output_fmt!r}")
        if not hasattr(self.backbone, 'forward_intermediates'):
            raise ValueError(f"{model_name(self)}: the backbone {self.backbone_name} has no forward_intermediates")
        x = self._check_input(x)
        kw = dict(indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                  intermediates_only=intermediates_only)
        if x.shape[0] == 0:  # an empty batch gives empty maps of the right shapes (timm's ViT cannot reshape 0 tokens)
            out = self.forward_intermediates(x.new_zeros((1, *x.shape[1:])), **kw)
            if intermediates_only:
                return [f[:0] for f in out]
            return out[0][:0], [f[:0] for f in out[1]]
        if self.mode == 'average':
            out = self.backbone.forward_intermediates(self.action(x).flatten(0, 1), **kw)
            if intermediates_only:
                return [self._average_back(f) for f in out]
            return out[0], [self._average_back(f) for f in out[1]]
        xc, w = self._canonical(x)
        out = self.backbone.forward_intermediates(xc, **kw)
        if intermediates_only:
            return [select_elements(self.action(f), w) for f in out]
        final = out[0]
        if self.dense_features and final.dim() == 4:
            final = select_elements(self.action(final), w)
        return final, [select_elements(self.action(f), w) for f in out[1]]

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """The backbone's pruning. The pruned model is a feature extractor: from then on :meth:`forward_features`
        returns its last map turned back by the predicted element (equivariant, like the taps)."""
        take = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.dense_features = True
        if prune_head:
            self.num_classes = 0
        self.num_features = self.backbone.num_features
        self.head_hidden_size = getattr(self.backbone, 'head_hidden_size', self.num_features)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features of the canonical image, what its head takes (``mode='average'``: of the ``|G|``
        transformed copies, stacked on the batch axis as ``[|G| * B, ...]``, copy-major; :meth:`forward_head` averages
        them). After :meth:`prune_intermediate_layers` a 4-D output is turned back by the predicted element."""
        x = self._check_input(x)
        if self.mode == 'average':
            return self.backbone.forward_features(self.action(x).flatten(0, 1))
        xc, w = self._canonical(x)
        y = self.backbone.forward_features(xc)
        if self.dense_features and y.dim() == 4:
            y = select_elements(self.action(y), w)
        return y

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        y = self.backbone.forward_head(x, pre_logits=pre_logits)
        if self.mode == 'average':
            y = y.unflatten(0, (self.order, -1)).mean(0)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def export(self) -> nn.Module:
        """A frozen copy for inference, in eval mode: the canonicalizer's group convolutions become plain convolutions
        holding their expanded filter banks (:func:`~gequiv_timm.layers.export_group_convs`), so no filter expansion
        runs per call; same logits (to float rounding), the model itself unchanged."""
        from ..layers.gconv import export_group_convs
        return export_group_convs(self, inplace=False).eval()

    # ----- invariance ---------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def default_check_size(self) -> int:
        """The input side :meth:`check_invariance` uses by default: the cfg's when the backbone's input size is
        fixed (a ViT), else ``min(cfg side, 64)`` (64 without a cfg), at least :meth:`min_input_size`."""
        cfg = getattr(self, 'pretrained_cfg', None) or getattr(self.backbone, 'pretrained_cfg', None) or {}
        side = int(cfg['input_size'][-1]) if cfg.get('input_size') else 64
        if not cfg.get('fixed_input_size'):
            side = min(side, 64)
        return max(side, self.min_input_size())

    @torch.no_grad()
    @torch.jit.ignore
    def check_invariance(self, x: Optional[torch.Tensor] = None, size: Optional[int] = None,
                         elements: Optional[List[int]] = None, atol: Optional[float] = None,
                         rtol: Optional[float] = None, seed: int = 0) -> EquivarianceError:
        """Turn / mirror an input by every group element (or ``elements``) and compare the logits:
        ``max_g max |f(g x) - f(x)|`` (:func:`~gequiv_timm.layers.checks.check_equivariance`).

        Returns an :class:`~gequiv_timm.layers.checks.EquivarianceError`: a float (the absolute error) with
        ``.relative`` (divided by ``max |f(x)|``) and ``.per_element``; raises an AssertionError when ``atol`` /
        ``rtol`` is given and exceeded. Runs in eval mode (restored afterwards) on ``x`` or a seeded batch of two
        ``N(0, 1)`` images of side ``size`` (default :meth:`default_check_size`).

        Elements that map the pixel grid to itself (all of p4 / p4m) act by ``rot90`` / ``flip``: the error is 0
        for p4 / p4m (bit-identical logits) barring a float-rounding tie of the top group logits. The other rotations
        of ``cN`` / ``dN`` cannot move pixels exactly: for them the input (given or not) is a smooth random field
        (wavelengths >= 8 pixels) inside a disc, rotated exactly (:class:`~gequiv_timm.layers.fields.RandomField`),
        and the figure measures the canonicalizer's resampled turn back, i.e. interpolation error.
        """
        grp = self.group
        els = list(grp.elements() if elements is None else elements)
        for g in els:
            if not (isinstance(g, int) and 0 <= g < grp.order):
                raise ValueError(f"check_invariance: elements must be ints in [0, {grp.order - 1}] (group "
                                 f"{grp.name!r}), got {g!r}")
        p = next(self.parameters())
        n = size or (x.shape[-1] if x is not None else self.default_check_size())
        was = self.training
        self.eval()
        try:
            if all(grp.is_grid_element(g) for g in els):
                if x is None:
                    gen = torch.Generator().manual_seed(seed)
                    x = torch.randn(2, self.in_chans, n, n, generator=gen).to(device=p.device, dtype=p.dtype)
                return check_equivariance(self, x, lambda t, g: grp.transform_plane(t, g), lambda t, g: t, els,
                                          atol=atol, rtol=rtol, name=f'{model_name(self)}.check_invariance')
            field = smooth_disc_field(grp, (2, self.in_chans), n, seed=seed, dtype=p.dtype, device=p.device)
            return check_equivariance(self, field(0), lambda _, g: field(g), lambda t, g: t, els, atol=atol,
                                      rtol=rtol, name=f'{model_name(self)}.check_invariance')
        finally:
            self.train(was)


def smooth_disc_field(group, shape, size: int, seed: int = 0, wavelength: float = 8.0, dtype=torch.float32,
                      device=None):
    """A callable ``g -> [*shape, size, size]``: a smooth random field (:class:`~gequiv_timm.layers.fields.RandomField`,
    wavelengths >= ``wavelength`` pixels) turned exactly by element ``g`` of ``group``, times a radial taper to zero
    between 0.6 and 1 of the inscribed radius (so nothing is turned out of the image). The input of
    :meth:`CanonicalizedModel.check_invariance` at the rotations that do not map the pixel grid to itself."""
    from ..layers.fields import RandomField
    grp = get_group(group)
    field = RandomField(shape, (size, size), wavelength, seed=seed, dtype=dtype, device=device)
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    rad = (r.view(-1, 1) ** 2 + r.view(1, -1) ** 2).sqrt() / max((size - 1) / 2, 1)
    disc = (0.5 * (1 + torch.cos(math.pi * rad.clamp(0.6, 1.0).sub(0.6).div(0.4)))).to(device=device, dtype=dtype)
    return lambda g: field.sample(grp, g) * disc


def pretrain_canonicalizer(model: 'CanonicalizedModel', data, epochs: int = 3, lr: float = 3e-3,
                           batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0,
                           augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
                           ) -> List[float]:
    """Train the canonicalizer of ``model`` on the canonicalization prior alone: ``cross_entropy(l(x), identity)``
    on upright images ``x``, before the task loss (a warm start for canonicalizer-only or joint training).

    By equivariance, ``l(g x)[h] = l(x)[g^-1 h]``, this is the same as learning to tell every turned / mirrored copy
    ``g x`` of the upright images apart (pose classification), with no turned copies made and no backbone forward:
    it costs the canonicalizer's forward and backward only (the 14x14 p4 canonicalizer of
    ``benchmarks/bench_canon.py``: about 0.05 CPU-s a step of 64 digits, against 0.37 s for a train step of its
    resnet18 at 28 pixels). The backbone is not run and not changed.

    Args:
        model: a :class:`CanonicalizedModel` with a canonicalizer (``mode='canonicalize'``).
        data: upright training images: a tensor ``[N, C, H, W]`` or a dataset of ``(x, ...)`` tuples (the labels are
            not used).
        epochs: passes over ``data`` (>= 1); lr, weight_decay: AdamW's, on a per-step cosine schedule to 0;
        batch_size: images per step; seed: the order of the images (a ``torch.Generator``).
        augment: optional ``fn(x, generator) -> x`` applied to every batch (as :func:`~gequiv_timm.training.fit`'s),
            e.g. small turns that the prior should still map to the identity; its generator is seeded
            ``seed + 1``.

    Returns the mean prior loss (unweighted cross-entropy, nats) of every epoch. The model's train / eval mode is
    restored.

    Example:
        >>> m = CanonicalizedModel('resnet18', 'p4', num_classes=10, in_chans=1, canon_size=14)
        >>> losses = pretrain_canonicalizer(m, torch.randn(32, 1, 28, 28), epochs=2, batch_size=16)
        >>> len(losses)
        2
    """
    name = 'pretrain_canonicalizer'
    if not isinstance(model, CanonicalizedModel) or model.canonicalizer is None:
        raise ValueError(f"{name}: model must be a CanonicalizedModel with a canonicalizer (mode='canonicalize'), "
                         f"got {type(model).__name__}" + (" in mode='average'" if isinstance(model, CanonicalizedModel)
                                                          else ''))
    check_int(name, 'epochs', epochs, 1)
    check_int(name, 'batch_size', batch_size, 1)
    check_float(name, 'lr', lr, 0.0, lo_open=True)
    check_float(name, 'weight_decay', weight_decay, 0.0)
    if isinstance(data, torch.Tensor):
        images = data
    else:
        tensors = getattr(data, 'tensors', None)
        images = tensors[0] if tensors is not None else torch.stack([data[i][0] for i in range(len(data))])
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{name}: data must hold images [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}")
    net = model.canonicalizer
    p0 = next(net.parameters())
    images = images.to(device=p0.device, dtype=p0.dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    target = torch.zeros(len(images), dtype=torch.long, device=p0.device)  # element 0: the identity
    history: List[float] = []
    was = model.training
    net.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen).to(p0.device)
            tot = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                x = images[idx]
                if augment is not None:
                    x = augment(x, aug_gen)
                x = model._check_input(x)
                loss = F.cross_entropy(net(x).float(), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(idx)
            history.append(tot / len(images))
    finally:
        model.train(was)
    return history


register_notrace_module(GroupAction)
register_notrace_module(GroupCanonicalizer)
register_notrace_function(check_canon_input)
register_notrace_function(straight_through_onehot)
register_notrace_function(select_elements)


# ----------------------------------------------------------------------------------------------------------------
# any timm model: canonicalize()
# ----------------------------------------------------------------------------------------------------------------
def _derived_cfg(backbone: nn.Module) -> Dict[str, Any]:
    cfg = dict(getattr(backbone, 'pretrained_cfg', None) or {})
    for k in ('first_conv', 'classifier'):
        if cfg.get(k):
            cfg[k] = _prefixed(cfg[k], 'backbone.')
    return cfg


def canonicalize(model: Union[str, nn.Module], group: str = 'p4', **kwargs) -> CanonicalizedModel:
    """Wrap a timm model (instance or name) in a learned canonicalizer: invariant to ``group`` (exactly for
    ``'p4'`` / ``'p4m'``), its weights untouched. ``kwargs``: :class:`CanonicalizedModel`'s options, and, for a
    model given by name, timm's (``num_classes``, ``in_chans``, ``pretrained``...).

    The result carries the backbone's ``pretrained_cfg`` (``first_conv`` / ``classifier`` under ``backbone.``), so
    ``timm.data.resolve_data_config({}, model=m)`` gives the backbone's preprocessing.

    Example:
        >>> m = canonicalize('resnet18', 'p4m', num_classes=10).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> float(m.check_invariance(x))
        0.0
    """
    if isinstance(model, str) and kwargs.get('pretrained'):
        import timm
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _OWN_ARGS}
        kwargs.pop('pretrained')
        model = timm.create_model(model, pretrained=True, **kwargs)
        kwargs = own
    kwargs.pop('pretrained', None)
    out = CanonicalizedModel(model, group, **kwargs)
    out.pretrained_cfg = out.default_cfg = _derived_cfg(out.backbone)
    return out


_OWN_ARGS = ('mode', 'canon_size', 'canon_width', 'canon_depth', 'canon_kernel_size', 'prior_weight', 'temperature',
             'freeze_backbone', 'backbone_lr_mult', 'interpolation')


# ----------------------------------------------------------------------------------------------------------------
# registered models (catalog data: registry/canon.toml)
# ----------------------------------------------------------------------------------------------------------------
_CANON_PREFIXES = ('backbone.', 'canonicalizer.')


def _pretrained_filter(state_dict: Dict[str, torch.Tensor], model: CanonicalizedModel) -> Dict[str, torch.Tensor]:
    """The plain backbone's checkpoint (keys of the timm model, e.g. ``conv1.weight``) goes under ``backbone.``; the
    canonicalizer keeps its initialisation (no checkpoint of it exists for a plain backbone). A checkpoint of this
    model itself (keys ``backbone.*`` / ``canonicalizer.*``) is passed through. The checks that follow
    (:func:`~gequiv_timm.models._helpers.create_gequiv_model`) name any key that does not fit.
    ``model.pretrained_load_report``: ``loaded``, ``initialised``, ``not_loaded``, ``missing``."""
    own = model.state_dict()
    if any(k.startswith(_CANON_PREFIXES) for k in state_dict):
        out = dict(state_dict)
    else:
        out = {'backbone.' + k: v for k, v in state_dict.items()}
    out, report = merge_backbone_state(out, own, 'canonicalizer.')
    model.pretrained_load_report = report
    return out


def _create_canon(variant: str, pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """Build through timm (``build_model_with_cfg``); ``pretrained=True`` loads the *plain backbone's* checkpoint (the
    cfg's Hub id or file) into ``backbone.*`` and initialises the canonicalizer."""
    from timm.models import get_pretrained_cfg
    backbone = kwargs.get('backbone')
    first_conv = getattr(get_pretrained_cfg(variant), 'first_conv', None)  # adapted to in_chans before the checks
    return create_gequiv_model(CanonicalizedModel, variant, pretrained, feature_cfg=dict(out_indices=None),
                               first_conv=first_conv if isinstance(first_conv, str) else None,
                               pretrained_filter_fn=_pretrained_filter,
                               source_architectures=(backbone,) if isinstance(backbone, str) else (), **kwargs)


def canon_cfg(backbone: str):
    """The cfg of a canonicalized ``backbone``, per tag: timm's own cfg of the backbone checkpoint the tag names
    (hub repo, input size, crop, mean / std), with ``first_conv`` / ``classifier`` under ``backbone.`` (and, for a
    backbone with a fixed input size, ``min_input_size`` = ``input_size``)."""
    def cfg(tag: str) -> Dict[str, Any]:
        src = backbone_cfg(backbone, tag)
        out = dict(src, first_conv=_prefixed(src.get('first_conv'), 'backbone.'),
                   classifier=_prefixed(src.get('classifier'), 'backbone.'))
        if src.get('fixed_input_size'):  # a ViT at its one size: that is also the smallest it takes
            out['min_input_size'] = src['input_size']
        return out
    return cfg


# the tags name the backbone checkpoints whose weights pretrained=True loads: registry/canon.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_canon_p4_resnet18': canon_cfg('resnet18'),
    'gequiv_canon_p4m_resnet18': canon_cfg('resnet18'),
    'gequiv_canon_c8_resnet18': canon_cfg('resnet18'),
    'gequiv_canon_p4_resnet50': canon_cfg('resnet50'),
    'gequiv_canon_p4m_resnet50': canon_cfg('resnet50'),
    'gequiv_canon_p4_convnext_tiny': canon_cfg('convnext_tiny'),
    'gequiv_canon_p4m_convnext_tiny': canon_cfg('convnext_tiny'),
    'gequiv_canon_p4_efficientnet_b0': canon_cfg('efficientnet_b0'),
    'gequiv_canon_p4m_efficientnet_b0': canon_cfg('efficientnet_b0'),
    'gequiv_canon_p4_vit_small_patch16_224': canon_cfg('vit_small_patch16_224'),
    'gequiv_canon_p4m_vit_small_patch16_224': canon_cfg('vit_small_patch16_224'),
}))


@register_model
def gequiv_canon_p4_resnet18(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ResNet-18 (timm's resnet18) behind a p4 canonicalizer: logits invariant to quarter turns."""
    model_args = dict(backbone='resnet18', group='p4')
    return _create_canon('gequiv_canon_p4_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4m_resnet18(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ResNet-18 behind a p4m canonicalizer: logits invariant to quarter turns and mirrors."""
    model_args = dict(backbone='resnet18', group='p4m')
    return _create_canon('gequiv_canon_p4m_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_c8_resnet18(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ResNet-18 behind a C8 canonicalizer: invariant to quarter turns, approximately to 45-degree turns (bilinear
    resampling)."""
    model_args = dict(backbone='resnet18', group='c8')
    return _create_canon('gequiv_canon_c8_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4_resnet50(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ResNet-50 (timm's resnet50) behind a p4 canonicalizer: logits invariant to quarter turns."""
    model_args = dict(backbone='resnet50', group='p4')
    return _create_canon('gequiv_canon_p4_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4m_resnet50(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ResNet-50 behind a p4m canonicalizer: logits invariant to quarter turns and mirrors."""
    model_args = dict(backbone='resnet50', group='p4m')
    return _create_canon('gequiv_canon_p4m_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4_convnext_tiny(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ConvNeXt-Tiny (timm's convnext_tiny) behind a p4 canonicalizer: logits invariant to quarter turns."""
    model_args = dict(backbone='convnext_tiny', group='p4')
    return _create_canon('gequiv_canon_p4_convnext_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4m_convnext_tiny(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ConvNeXt-Tiny behind a p4m canonicalizer: logits invariant to quarter turns and mirrors."""
    model_args = dict(backbone='convnext_tiny', group='p4m')
    return _create_canon('gequiv_canon_p4m_convnext_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4_efficientnet_b0(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """EfficientNet-B0 (timm's efficientnet_b0) behind a p4 canonicalizer (on a 48x48 copy): logits invariant to
    quarter turns."""
    model_args = dict(backbone='efficientnet_b0', group='p4', canon_size=48)  # light backbone, lighter canonicalizer
    return _create_canon('gequiv_canon_p4_efficientnet_b0', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4m_efficientnet_b0(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """EfficientNet-B0 behind a p4m canonicalizer (on a 48x48 copy): logits invariant to quarter turns and mirrors."""
    model_args = dict(backbone='efficientnet_b0', group='p4m', canon_size=48)  # light backbone, lighter canonicalizer
    return _create_canon('gequiv_canon_p4m_efficientnet_b0', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ViT-S/16 (timm's vit_small_patch16_224) behind a p4 canonicalizer: logits invariant to quarter turns."""
    model_args = dict(backbone='vit_small_patch16_224', group='p4')
    return _create_canon('gequiv_canon_p4_vit_small_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_canon_p4m_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> CanonicalizedModel:
    """ViT-S/16 behind a p4m canonicalizer: logits invariant to quarter turns and mirrors."""
    model_args = dict(backbone='vit_small_patch16_224', group='p4m')
    return _create_canon('gequiv_canon_p4m_vit_small_patch16_224', pretrained, **dict(model_args, **kwargs))
