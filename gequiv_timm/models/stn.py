"""Spatial transformer front ends for any timm backbone (Jaderberg et al., Spatial Transformer Networks, 2015).

:class:`STNFrontEnd` puts a :class:`~gequiv_timm.layers.stn.SpatialTransformer` in front of a timm model (given by
name or as a module)::

    image [B, C, H, W] --stn--> rectified [B, C, h, w] --backbone--> features --head--> logits

* ``num_transforms = K > 1`` (the paper's 2x / 4x ST-CNN): one localisation net predicts ``K`` transforms, each
  rectified view goes through its own backbone (or one shared backbone, ``share_backbone=True``), the ``K``
  feature maps are concatenated along channels and one classifier reads them.
* ``stage_stn = i``: a second spatial transformer on the *feature maps* after backbone stage ``i`` (the module named
  by ``backbone.feature_info[i]['module']``), inserted with a forward hook, so it works for any timm model with
  ``feature_info`` and the backbone's parameter names do not change.
* the localisation net is the small default CNN or any timm model by name (``loc_backbone='resnet18'``, built with
  ``num_classes=0``); its learning rate is ``loc_lr_mult`` times the base rate (0.1 by default: the paper trains it
  about 10x slower) through :meth:`STNFrontEnd.param_groups` (``lr_scale``, honoured by timm's schedulers), and it
  is its own group (``stn``) in :meth:`STNFrontEnd.group_matcher`.

The forward is not a plain sequence of stages, so ``features_only=True`` goes through timm's getter wrapper
(``forward_intermediates``). ``model.last_theta`` holds the transforms of the last forward,
``model.rectify(x)`` returns the transformer's output, ``model.transform_loss()`` the regulariser to add to the
task loss. The classifier sees the rectified image: for a digit on a black background use
``padding_mode='border'`` (zero padding in *normalised* space would be grey, not black).

Builders at the bottom; tags, papers and descriptions: ``registry/stn.toml``. The transformer starts at the
identity (the model first behaves exactly as its backbone).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import generate_default_cfgs, register_model

from ..layers.stn import ParallelSpatialTransformer, SpatialTransformer
from ..registry import tagged_cfgs
from ._args import TIMM_RATES, check_common, check_float, check_int, check_ints, check_timm_kwargs
from ._helpers import create_gequiv_model, scaled_param_groups
from ._timm_api import check_image_input, model_name
from ._timm_api import min_input_size as backbone_min_input_size

# the input check stays one call in plain torch.fx traces too (timm's tracer knows it from models/_fx.py)
torch.fx.wrap('check_image_input')

__all__ = ['STNFrontEnd']


class _ApplyAfter:
    """Forward hook replacing a module's output by ``stn(output)``. A plain object (not a closure), so that
    ``copy.deepcopy`` of the model points the copy's hook at the copy's transformer."""

    def __init__(self, stn: nn.Module):
        self.stn = stn

    def __call__(self, module, inputs, output):
        return self.stn(output)


def _create_timm(name: str, **kwargs) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)


def _compile_matcher(matcher):
    """timm's dict group matcher -> list of (compiled regex, ordinal, suffix), as timm's ``group_with_matcher``."""
    if callable(matcher):
        return matcher
    compiled = []
    for ordinal, (_, spec) in enumerate(matcher.items()):
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            for sub in spec:
                compiled.append((re.compile(sub[0]), ordinal, sub[1]))
        else:
            compiled.append((re.compile(spec), ordinal, None))
    return compiled


class _PrefixedMatcher:
    """A callable group matcher: ``stn.*`` / ``stage_stn.*`` -> group 0 (the localisation nets and their heads);
    ``backbone.X`` / ``backbones.k.X`` -> the backbone's own grouping of ``X`` shifted by one; the rest (head) last.
    """

    def __init__(self, backbone_matcher):
        self.inner = _compile_matcher(backbone_matcher)

    def __call__(self, name: str):
        if name.startswith(('stn.', 'stage_stn.')):
            return (0.,)
        m = re.match(r'^backbones?\.(?:\d+\.)?(.*)$', name)
        if m is None:
            return (float('inf'),)
        sub = m.group(1)
        if callable(self.inner):
            ords = self.inner(sub)
            ords = ords if isinstance(ords, (tuple, list)) else (ords,)
            return (1.,) + tuple(float(o) for o in ords)
        for rx, ordinal, suffix in self.inner:
            r = rx.match(sub)
            if r:
                parts = [float(ordinal + 1)] + [float(g) for g in r.groups() if g is not None]
                if suffix is not None:
                    parts += [float(s) for s in suffix]
                return tuple(parts)
        return (float('inf'),)


def _check_size(owner: str, arg: str, size) -> None:
    """``None``, an int >= 1 or a pair of ints >= 1."""
    ok = size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1) or (
        isinstance(size, (list, tuple)) and len(size) == 2 and
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size))
    if not ok:
        raise ValueError(f"{owner}: {arg} must be None, an int >= 1 or a pair (h, w) of ints >= 1, got {size!r}")


def _check_loc_kwargs(owner: str, loc_kwargs: Dict[str, Any]) -> None:
    """The default localisation net's arguments (:class:`~gequiv_timm.layers.stn.LocalisationCNN`)."""
    if 'channels' in loc_kwargs:
        check_ints(owner, "loc_kwargs['channels']", loc_kwargs['channels'], 1, min_len=0)
    for key in ('kernel_size', 'hidden', 'pool_size'):
        if key in loc_kwargs:
            check_int(owner, f"loc_kwargs[{key!r}]", loc_kwargs[key], 1, odd=key == 'kernel_size')


class STNFrontEnd(nn.Module):
    """A spatial transformer in front of (and optionally inside) a timm backbone.

    Args:
        backbone: a timm model name (built with ``num_classes``, ``in_chans``, ``drop_rate``, ``global_pool`` and
            ``backbone_kwargs``) or a model instance (used as given; ``K = 1`` only).
        transform: the transform family (``affine``, ``similarity``, ``rotation``, ``attention``, ``translation``,
            ``projective``, ``tps``); ``transform_kwargs`` are its bounds (``max_translation``, ``scale_range``,
            ``max_angle``, ``max_linear``, ``max_perspective``, ``grid_size``, ``max_offset``).
        num_transforms: ``K`` parallel transformers (2 / 4 for the 2x / 4x ST-CNN); ``share_backbone`` runs all
            ``K`` views through one backbone instead of ``K`` copies. ``init_translations``: ``K`` start positions.
        loc_backbone: ``None`` (default :class:`LocalisationCNN`, configured by ``loc_kwargs``), a timm model name
            (built with ``num_classes=0`` and ``loc_kwargs``) or a module returning ``[B, F]``.
        loc_input_size: the localisation net sees the input resized to this size (the sampler reads full
            resolution).
        loc_lr_mult: learning-rate multiplier of the transformer parameters in :meth:`param_groups`.
        out_size: size handed to the backbone (``None``: the input size; an int / pair; or a float fraction of the
            input size, e.g. ``0.5``: the CUB trick).
        align_corners, mode, padding_mode, invalid: passed to the transformer (see
            :class:`~gequiv_timm.layers.stn.SpatialTransformer`).
        reg_weight, boundary_weight: weights of :meth:`transform_loss`.
        stage_stn: index into ``backbone.feature_info`` after which a feature-map transformer
            (``stage_transform``, identity start) is applied; ``None``: none.
        num_classes, in_chans, drop_rate, global_pool: as every timm model.

    Shapes: ``[B, in_chans, H, W] -> [B, num_classes]``; ``forward_features`` ``[B, K * C, h', w']``.
    """

    def __init__(self, backbone: Union[str, nn.Module] = 'resnet18', transform: str = 'affine',
                 transform_kwargs: Optional[Dict[str, Any]] = None, num_transforms: int = 1,
                 share_backbone: bool = False, init_translations: Optional[Sequence[Sequence[float]]] = None,
                 loc_backbone: Optional[Union[str, nn.Module]] = None, loc_kwargs: Optional[Dict[str, Any]] = None,
                 loc_input_size: Optional[Union[int, Sequence[int]]] = None, loc_lr_mult: float = 0.1,
                 out_size: Optional[Union[int, float, Sequence[int]]] = None, align_corners: bool = False,
                 mode: str = 'bilinear', padding_mode: str = 'zeros', invalid: str = 'raise',
                 reg_weight: float = 0.0, boundary_weight: float = 0.0, stage_stn: Optional[int] = None,
                 stage_transform: str = 'affine', backbone_kwargs: Optional[Dict[str, Any]] = None,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, global_pool: str = 'avg',
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_int(name, 'num_transforms', num_transforms, 1, what='parallel transformers')
        check_float(name, 'loc_lr_mult', loc_lr_mult, 0.0)
        check_float(name, 'reg_weight', reg_weight, 0.0)
        check_float(name, 'boundary_weight', boundary_weight, 0.0)
        _check_size(name, 'loc_input_size', loc_input_size)
        if isinstance(out_size, float):
            check_float(name, 'out_size', out_size, 0.0, 16.0, lo_open=True, what='a scale of the input size')
        else:
            _check_size(name, 'out_size', out_size)
        if loc_backbone is None and loc_kwargs:
            _check_loc_kwargs(name, loc_kwargs)
        check_common(name, num_classes, in_chans, drop_rate)
        if isinstance(backbone, str):
            check_timm_kwargs(name, backbone_kwargs, 'backbone_kwargs', rates=TIMM_RATES)
        if isinstance(loc_backbone, str):
            check_timm_kwargs(name, loc_kwargs, 'loc_kwargs', rates=TIMM_RATES)
        self.in_chans = in_chans
        self.num_transforms = k = num_transforms
        self.loc_lr_mult = float(loc_lr_mult)
        self.drop_rate = drop_rate
        ctx = torch.device(device) if device is not None else None
        if ctx is not None:
            with ctx:
                self._build(backbone, transform, transform_kwargs, k, share_backbone, init_translations,
                            loc_backbone, loc_kwargs, loc_input_size, out_size, align_corners, mode, padding_mode,
                            invalid, reg_weight, boundary_weight, stage_stn, stage_transform, backbone_kwargs,
                            num_classes, in_chans, drop_rate, global_pool)
        else:
            self._build(backbone, transform, transform_kwargs, k, share_backbone, init_translations, loc_backbone,
                        loc_kwargs, loc_input_size, out_size, align_corners, mode, padding_mode, invalid,
                        reg_weight, boundary_weight, stage_stn, stage_transform, backbone_kwargs, num_classes,
                        in_chans, drop_rate, global_pool)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # ----- construction -------------------------------------------------------------------------------------
    def _build(self, backbone, transform, transform_kwargs, k, share_backbone, init_translations, loc_backbone,
               loc_kwargs, loc_input_size, out_size, align_corners, mode, padding_mode, invalid, reg_weight,
               boundary_weight, stage_stn, stage_transform, backbone_kwargs, num_classes, in_chans, drop_rate,
               global_pool):
        name = type(self).__name__
        backbone_kwargs = dict(backbone_kwargs or {})
        # --- localisation net
        loc_kwargs = dict(loc_kwargs or {})
        if isinstance(loc_backbone, str):
            loc_net = _create_timm(loc_backbone, num_classes=0, in_chans=in_chans, **loc_kwargs)
            loc_kwargs = None
        else:
            loc_net = loc_backbone
            loc_kwargs = loc_kwargs or None
        stn_args = dict(loc_net=loc_net, loc_kwargs=loc_kwargs, loc_input_size=loc_input_size, out_size=out_size,
                        align_corners=align_corners, mode=mode, padding_mode=padding_mode, invalid=invalid,
                        reg_weight=reg_weight, boundary_weight=boundary_weight, **dict(transform_kwargs or {}))
        if k == 1:
            if init_translations is not None:
                raise ValueError(f"{name}: init_translations is for num_transforms > 1")
            self.stn = SpatialTransformer(in_chans, transform, **stn_args)
        else:
            self.stn = ParallelSpatialTransformer(in_chans, transform, num_transforms=k,
                                                  init_translations=init_translations, **stn_args)
        # --- backbone(s)
        if isinstance(backbone, nn.Module):
            if k > 1:
                raise ValueError(f"{name}: pass the backbone by name when num_transforms > 1 (it is built {k} times, "
                                 f"or once with share_backbone=True)")
            self.backbone = backbone
            self.backbone_name = type(backbone).__name__
            self.num_classes = getattr(backbone, 'num_classes', num_classes)
        elif isinstance(backbone, str):
            self.backbone_name = backbone
            if k == 1:
                self.backbone = _create_timm(backbone, num_classes=num_classes, in_chans=in_chans,
                                             drop_rate=drop_rate, global_pool=global_pool, **backbone_kwargs)
            else:
                n = 1 if share_backbone else k
                self.backbones = nn.ModuleList([
                    _create_timm(backbone, num_classes=0, global_pool='', in_chans=in_chans, **backbone_kwargs)
                    for _ in range(n)])
            self.num_classes = num_classes
        else:
            raise TypeError(f"{name}: backbone must be a timm model name or an nn.Module, got "
                            f"{type(backbone).__name__}")
        self.share_backbone = bool(share_backbone) and k > 1
        first = self.backbone if k == 1 else self.backbones[0]
        for attr in ('forward_features', 'forward_head', 'forward_intermediates', 'feature_info'):
            if not hasattr(first, attr):
                raise ValueError(f"{name}: the backbone {self.backbone_name} has no {attr!r}; STNFrontEnd needs a "
                                 f"timm model (forward_features / forward_head / forward_intermediates)")
        nf = first.num_features
        if k == 1:
            self.num_features = nf
            self.head_hidden_size = getattr(first, 'head_hidden_size', nf)
        else:
            self.num_features = self.head_hidden_size = k * nf
            self.head = ClassifierHead(k * nf, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        prefix = 'backbone.' if k == 1 else 'backbones.0.'
        # reductions are relative to the model's input: a float out_size f samples views of f times its size, so
        # every backbone level is 1 / f times coarser (a fixed out_size: relative to the sampled view)
        scale = 1.0 / out_size if isinstance(out_size, float) else 1.0
        self.feature_info = []
        for info in first.feature_info:
            info = dict(info)
            info['num_chs'] = info['num_chs'] * k
            if scale != 1.0 and 'reduction' in info:
                r = info['reduction'] * scale
                info['reduction'] = int(round(r)) if abs(r - round(r)) < 1e-9 else r
            if 'module' in info:
                info['module'] = prefix + info['module']
            self.feature_info.append(info)
        # --- transformer after a backbone stage (feature maps)
        self.stage_stn_index = stage_stn
        if stage_stn is not None:
            if k > 1:
                raise ValueError(f"{name}: stage_stn is supported with num_transforms=1 only")
            infos = list(first.feature_info)
            if not isinstance(stage_stn, int) or not -len(infos) <= stage_stn < len(infos):
                raise ValueError(f"{name}: stage_stn must index backbone.feature_info (0..{len(infos) - 1}), "
                                 f"got {stage_stn!r}")
            info = infos[stage_stn]
            target = first.get_submodule(info['module'])
            self.stage_stn = SpatialTransformer(info['num_chs'], stage_transform, align_corners=align_corners,
                                                mode=mode, padding_mode='zeros', invalid=invalid,
                                                reg_weight=reg_weight, boundary_weight=boundary_weight,
                                                loc_kwargs=dict(channels=(32,), hidden=32))
            self._stage_hook = target.register_forward_hook(_ApplyAfter(self.stage_stn))
            self.stage_stn_module = 'backbone.' + info['module']

    # ----- input ------------------------------------------------------------------------------------------------
    def min_input_size(self) -> int:
        """The smallest input side: what the backbone needs (its own ``min_input_size()``; 1 for a timm backbone,
        padded throughout) at the size the transformer hands it (the input size, a fraction of it, or a fixed
        size). The localisation net takes any size."""
        b = self._backbones()[0]
        states = hasattr(b, '_gequiv_input_policy') or callable(getattr(b, 'min_input_size', None))
        need = backbone_min_input_size(b) if states else 1  # a plain timm backbone: padded convolutions
        out = self.stn.out_size
        if out is None:
            return need
        if isinstance(out, float):
            s = 1
            while max(1, round(out * s)) < need:
                s += 1
            return s
        return 1  # a fixed output size: the backbone always sees the same size

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.min_input_size(), model_name(self))
        return x

    # ----- helpers ------------------------------------------------------------------------------------------
    def _backbones(self) -> List[nn.Module]:
        return [self.backbone] if self.num_transforms == 1 else list(self.backbones)

    def _branch(self, i: int) -> nn.Module:
        return self.backbones[0 if self.share_backbone else i]

    def rectify(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's output: ``[B, C, h, w]`` (``K = 1``) or ``[B, K, C, h, w]``."""
        return self.stn(self._check_input(x))

    @property
    def last_theta(self) -> Optional[torch.Tensor]:
        """The transforms of the last forward (detached), ``[B, *theta]`` or ``[B, K, *theta]``."""
        return self.stn.last_theta

    def transform_loss(self) -> torch.Tensor:
        """The transformers' regulariser of the last forward (identity + out-of-image terms, weighted by
        ``reg_weight`` / ``boundary_weight``); add it to the task loss."""
        loss = self.stn.transform_loss()
        if getattr(self, 'stage_stn', None) is not None:
            loss = loss + self.stage_stn.transform_loss()
        return loss

    def stn_parameters(self) -> List[nn.Parameter]:
        """Parameters of the transformer(s) (localisation nets and regression heads)."""
        ps = list(self.stn.parameters())
        if getattr(self, 'stage_stn', None) is not None:
            ps += list(self.stage_stn.parameters())
        return ps

    def param_groups(self, lr: Optional[float] = None, weight_decay: float = 0.0,
                     loc_lr_mult: Optional[float] = None) -> List[Dict[str, Any]]:
        """Two optimizer param groups: everything else, and the transformer(s) at ``loc_lr_mult`` times the rate.

        * ``lr=None`` (for timm): the transformer group carries ``lr_scale = loc_lr_mult``, which timm's
          schedulers apply to the optimizer's rate: ``create_optimizer_v2(model.param_groups(), lr=...)``.
        * ``lr`` given (for a plain torch optimizer and no timm scheduler): explicit ``lr`` and ``lr * loc_lr_mult``,
          no ``lr_scale`` (it would be applied twice).
        """
        mult = self.loc_lr_mult if loc_lr_mult is None else float(loc_lr_mult)
        stn_ids = {id(p) for p in self.stn_parameters()}
        rest = [p for p in self.parameters() if id(p) not in stn_ids]
        groups = [dict(params=rest, weight_decay=weight_decay), dict(params=self.stn_parameters(),
                                                                      weight_decay=weight_decay)]
        return scaled_param_groups(groups, [1.0, mult], lr)

    # ----- timm API ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return _PrefixedMatcher(self._backbones()[0].group_matcher(coarse=coarse))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for b in self._backbones():
            b.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        out = set()
        for i, b in enumerate(self._backbones()):
            prefix = 'backbone.' if self.num_transforms == 1 else f'backbones.{i}.'
            out |= {prefix + n for n in (b.no_weight_decay() if hasattr(b, 'no_weight_decay') else ())}
        return out

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier() if self.num_transforms == 1 else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        old = [p for p in self.get_classifier().parameters()] or list(self.parameters())[-1:]
        self.num_classes = num_classes
        if self.num_transforms == 1:
            if global_pool is None:
                self.backbone.reset_classifier(num_classes)
            else:
                self.backbone.reset_classifier(num_classes, global_pool)
        else:
            self.head.reset(num_classes, pool_type=global_pool)
        if old:  # keep the classifier on the model's device / dtype (some timm heads are rebuilt on the default one)
            self.get_classifier().to(device=old[0].device, dtype=old[0].dtype)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """The backbone's ``forward_intermediates`` on the rectified input; with ``K > 1`` the ``K`` branches'
        maps are concatenated along channels at every level."""
        y = self.stn(self._check_input(x))
        kw = dict(indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                  intermediates_only=intermediates_only)
        if self.num_transforms == 1:
            return self.backbone.forward_intermediates(y, **kw)
        outs = [self._branch(i).forward_intermediates(y[:, i], **kw) for i in range(self.num_transforms)]
        if intermediates_only:
            return [torch.cat(level, 1) for level in zip(*outs)]
        final = torch.cat([o[0] for o in outs], 1)
        inter = [torch.cat(level, 1) for level in zip(*[o[1] for o in outs])]
        return final, inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take = None
        for b in self._backbones():
            take = b.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if self.num_transforms > 1 and prune_head:
            self.reset_classifier(0, '')
        elif prune_head:
            self.num_classes = 0
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stn(self._check_input(x))
        if self.num_transforms == 1:
            return self.backbone.forward_features(y)
        return torch.cat([self._branch(i).forward_features(y[:, i]) for i in range(self.num_transforms)], 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.num_transforms == 1:
            return self.backbone.forward_head(x, pre_logits=pre_logits)
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_stn(variant: str, pretrained: bool = False, **kwargs) -> STNFrontEnd:
    feature_cfg = dict(out_indices=None)  # every level the backbone has (timm's default assumes 5)
    return create_gequiv_model(STNFrontEnd, variant, pretrained, first_conv=None, feature_cfg=feature_cfg,
                               **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """An ImageNet backbone behind the transformer (resnet18's a1 preprocessing); the localisation net needs 64x64."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 64, 64), 'pool_size': (7, 7),
        'crop_pct': 0.95, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'backbone.conv1', 'classifier': 'backbone.fc', 'paper_ids': 'arXiv:1506.02025', **kwargs,
    }


# tags, hub repos and descriptions: registry/stn.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_stn_cnn_mnist': _cfg(
        num_classes=10, input_size=(1, 42, 42), min_input_size=None, pool_size=(10, 10), crop_pct=1.0,
        interpolation='bilinear', mean=(0.1307,), std=(0.3081,), first_conv='backbone.stages.0.conv',
        classifier='backbone.head.fc'),
    'gequiv_stn_resnet18': _cfg(),
    'gequiv_stn_tps_resnet18': _cfg(),
    'gequiv_stn2x_resnet50': _cfg(
        input_size=(3, 448, 448), min_input_size=(3, 128, 128), crop_pct=1.0, first_conv='backbones.0.conv1',
        classifier='head.fc'),
}))


@register_model
def gequiv_stn_cnn_mnist(pretrained: bool = False, **kwargs) -> STNFrontEnd:
    """ST-CNN for 42x42 distorted MNIST: affine spatial transformer (small CNN localisation net) + a 3-layer CNN
    (gequiv_z2cnn 16-32-32, 5x5)."""
    # on this small problem the transformer learns at the full rate: with 0.1 x (the paper's CUB setting) it barely
    # left the identity in 6 epochs (benchmarks/results/stn_rts*.md: mean |theta - I| 0.014 against 0.095)
    model_args = dict(backbone='gequiv_z2cnn',
                      backbone_kwargs=dict(widths=(16, 32, 32), kernel_size=5, padding=2, pool_after=(0, 1)),
                      transform='affine', loc_kwargs=dict(channels=(20, 20), kernel_size=5, hidden=50, pool_size=2),
                      padding_mode='border', loc_lr_mult=1.0, in_chans=1, num_classes=10)
    return _create_stn('gequiv_stn_cnn_mnist', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_stn_resnet18(pretrained: bool = False, **kwargs) -> STNFrontEnd:
    """ResNet-18 (timm's resnet18) behind an affine spatial transformer that sees a 64x64 copy of the input."""
    model_args = dict(backbone='resnet18', transform='affine', loc_input_size=64)
    return _create_stn('gequiv_stn_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_stn_tps_resnet18(pretrained: bool = False, **kwargs) -> STNFrontEnd:
    """ResNet-18 behind a thin-plate-spline spatial transformer (4x4 control points, offsets bounded to 0.5)."""
    model_args = dict(backbone='resnet18', transform='tps', transform_kwargs=dict(grid_size=4, max_offset=0.5),
                      loc_input_size=64)
    return _create_stn('gequiv_stn_tps_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_stn2x_resnet50(pretrained: bool = False, **kwargs) -> STNFrontEnd:
    """2x ST-CNN on ResNet-50: two attention transformers crop 224x224 views of a 448x448 image, one ResNet-50 per
    view, features concatenated."""
    model_args = dict(backbone='resnet50', transform='attention',
                      transform_kwargs=dict(scale_range=(0.25, 1.1), max_translation=1.0), num_transforms=2,
                      out_size=0.5, loc_input_size=112)
    return _create_stn('gequiv_stn2x_resnet50', pretrained, **dict(model_args, **kwargs))
