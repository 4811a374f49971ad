"""escnn steerable CNNs as timm models: the baselines that ``gequiv-timm compare`` runs beside our G-CNNs.

Two recipes, both built from escnn's regular-field modules (Weiler & Cesa, "General E(2)-Equivariant Steerable
CNNs", NeurIPS 2019; the library: https://github.com/QUVA-Lab/escnn):

* :class:`EscnnCNN` -- P4CNN-shaped (Cohen & Welling, ICML 2016, sec. 8.1): a lifting ``R2Conv`` from trivial to
  regular fields, then ``R2Conv`` regular -> regular; every conv is followed by ``InnerBatchNorm`` and ``ReLU``;
  a 2x2 ``PointwiseMaxPool2D`` after the second conv; group (max) pooling over the fibre at the end; global
  spatial pooling and a linear classifier. Seven unpadded 3x3 convs take a 28x28 digit to a 2x2 map, as ``gequiv_p4cnn``.
* :class:`EscnnWideResNet` -- a small pre-activation wide residual network (Zagoruyko & Komodakis 2016) with
  regular fields, the family of escnn's "E(2)-WRN" reference models; stages are joined by 2x2 max pooling.

The symmetry group is one of ``'c4'`` (rotations by 90 degrees, escnn ``rot2dOnR2(4)``), ``'c8'``
(``rot2dOnR2(8)``) or ``'d4'`` (rotations and mirrors, ``flipRot2dOnR2(4)``). Widths are counted in regular
fields; a field has ``|G|`` channels.

Feature layout handed to timm: ``forward_features`` returns the *invariant* map ``[B, C, H, W]`` (group pooled);
``forward_intermediates`` returns *folded* equivariant maps ``[B, C*|G|, H, W]`` (escnn stores a regular field's
``|G|`` channels contiguously, which is the ``fold_group`` layout of :mod:`gequiv_timm.layers`).

escnn is an optional dependency (``pip install 'gequiv_timm[escnn]'``): this module imports without it, and
building a model without it raises an ImportError naming the extra. ``export()`` swaps every escnn module for its
plain-PyTorch equivalent (escnn's own ``export()``), which is what evaluation and latency measurements use.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from timm.layers import get_device_dtype
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..registry import tagged_cfgs
from ..layers.checks import check_equivariance
from ._args import check_common, check_indices, check_int, check_ints
from ._helpers import create_gequiv_model, digits_cfg, require_extras
from ._timm_api import TimmApiMixin

__all__ = ['ESCNN_EXTRA_HINT', 'GROUPS', 'EscnnCNN', 'EscnnWideResNet', 'escnn_available', 'import_escnn']

ESCNN_EXTRA_HINT = "pip install 'gequiv_timm[escnn]'"
GROUPS = ('c4', 'c8', 'd4')
_SVD_PATCHED = False


def escnn_available() -> bool:
    """True when escnn can be imported."""
    try:
        import_escnn()
    except ImportError:
        return False
    return True


def _exact_svd(A, n_components=None, random_state=None, **_):
    """Deterministic stand-in for sklearn's ``randomized_svd`` inside escnn's null-space solver.

    escnn 1.0.11 hands it an ``np.matrix`` (rejected by scikit-learn >= 1.6) and asks for all singular values
    anyway, so an exact SVD is both what it wants and reproducible (the randomized one is seeded by the clock).
    """
    import numpy as np
    import scipy.linalg
    u, s, vh = scipy.linalg.svd(np.asarray(A), full_matrices=False)
    k = len(s) if n_components is None else n_components
    return u[:, :k], s[:k], vh[:k]


def import_escnn():
    """Import and return ``(gspaces, escnn.nn)``; raise an ImportError naming the extra when escnn is missing.

    Also replaces the randomized SVD escnn uses to solve for kernel bases by an exact one (see
    :func:`_exact_svd`): without it, building D4 (``flipRot2dOnR2``) bases fails with scikit-learn >= 1.6.
    The ``py3nj`` warning escnn prints on import concerns SO(3) only and is silenced here.
    """
    global _SVD_PATCHED
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*py3nj.*')
            from escnn import gspaces
            from escnn import nn as enn
            from escnn.group import _numerical
    except ImportError as e:
        raise ImportError(
            f"the escnn baselines (gequiv_escnn_*) need escnn, which is not installed: {e}. "
            f"Install the extra with `{ESCNN_EXTRA_HINT}`.") from e
    if not _SVD_PATCHED:
        if getattr(_numerical, 'randomized_svd', None) is not None:
            _numerical.randomized_svd = _exact_svd
        _SVD_PATCHED = True
    return gspaces, enn


def _gspace(group: str):
    gspaces, _ = import_escnn()
    g = str(group).lower()
    if g == 'c4':
        return gspaces.rot2dOnR2(N=4)
    if g == 'c8':
        return gspaces.rot2dOnR2(N=8)
    if g == 'd4':
        return gspaces.flipRot2dOnR2(N=4)
    raise ValueError(f"escnn baselines: group must be one of {GROUPS}, got {group!r}")


def _check_widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    return check_ints(name, 'widths', widths, 1, what='regular fields per layer')


class _Chain(nn.Module):
    """A sequence of modules applied in order; works on escnn ``GeometricTensor`` s and, after export, tensors."""

    def __init__(self, *mods: nn.Module):
        super().__init__()
        for i, m in enumerate(mods):
            self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class _Residual(nn.Module):
    """``y = body(x) + shortcut(x)`` (identity shortcut when ``shortcut`` is None)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class FieldMaxPool(nn.Module):
    """Group pooling of regular fields: ``[B, C*|G|, H, W] -> [B, C, H, W]``, the max over each field's ``|G|``
    contiguous channels (escnn's ``GroupPooling`` on regular fields, which allocates its output in float32 whatever
    the input dtype; this one keeps the dtype and is traceable)."""

    def __init__(self, field_size: int):
        super().__init__()
        self.field_size = int(field_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, self.field_size)).amax(2)

    def extra_repr(self) -> str:
        return f'field_size={self.field_size}'


class _Geometry(NamedTuple):
    """What a stage does to the shape: ``channels`` out; an optional 2x2 max pool before, a ``kernel`` conv with
    ``padding`` (padded convs that keep the size count as ``kernel=1, padding=0``), an optional 2x2 max pool after."""

    channels: int
    kernel: int = 1
    padding: int = 0
    pool_before: bool = False
    pool_after: bool = False

    def out_side(self, s: int) -> int:
        """The output side for an input side ``s`` (0 when a step has nothing left: the input is too small)."""
        if self.pool_before:
            s = s // 2 if s >= 2 else 0
        s = s + 2 * self.padding - self.kernel + 1 if s >= 1 else 0
        if self.pool_after:
            s = s // 2 if s >= 2 else 0
        return max(s, 0)

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        return self.out_side(int(h)), self.out_side(int(w))


class _Tensorized(nn.Module):
    """An escnn module seen from outside as ``Tensor -> Tensor``.

    Wraps the input in a ``GeometricTensor`` of ``in_type`` and returns the plain ``.tensor`` of the result, so the
    model around it (timm's head, gradient checkpointing, FX tracing, where this class is a leaf: :mod:`gequiv_timm.models._fx`) sees ordinary
    tensors. After :func:`_export_inplace` the wrapped module is plain PyTorch and the wrapping is skipped.
    """

    def __init__(self, module: nn.Module, in_type, geometry: Optional[_Geometry] = None):
        super().__init__()
        self.net = module
        self.in_type = in_type
        self.out_type = module.out_type if hasattr(module, 'out_type') else None
        self.plain = False
        self.geometry = geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0 and self.geometry is not None:
            # an empty batch: escnn's InnerBatchNorm cannot reshape it, and there is nothing to compute
            return x.new_zeros((0, self.geometry.channels, *self.geometry.out_size(x.shape[-2], x.shape[-1])))
        if self.plain:
            return self.net(x)
        _, enn = import_escnn()
        return self.net(enn.GeometricTensor(x, self.in_type)).tensor


def _export_inplace(module: nn.Module) -> nn.Module:
    """Replace every escnn ``EquivariantModule`` under ``module`` by its ``export()`` (plain PyTorch)."""
    _, enn = import_escnn()
    for name, child in list(module.named_children()):
        if isinstance(child, enn.EquivariantModule):
            setattr(module, name, child.export())
        else:
            _export_inplace(child)
        if isinstance(child, _Tensorized):
            child.plain = True
    return module


_IDENTITY_CLASSES: dict = {}


def _identity_class(cls: type) -> type:
    """A subclass of ``cls`` with object identity for ``==`` and ``hash`` (see :func:`_unshare_escnn_bases`)."""
    if cls not in _IDENTITY_CLASSES:
        _IDENTITY_CLASSES[cls] = type(cls.__name__, (cls,), {
            '__eq__': object.__eq__, '__ne__': object.__ne__, '__hash__': object.__hash__,
            '__module__': cls.__module__, '__doc__': cls.__doc__})
    return _IDENTITY_CLASSES[cls]


def _unshare_escnn_bases(module: nn.Module) -> None:
    """Give ``module`` its own copies of escnn's sampled kernel bases, compared by identity.

    escnn keeps one ``SingleBlockBasisExpansion`` module per (basis, grid) in a process-wide cache and hands the same
    instance to every conv that needs it, so moving one model (``.to('cuda')``, ``.to(torch.bfloat16)``, timm's
    ``device='meta'``) would silently move the bases of every other escnn model in the process. Its basis-expansion
    modules also define value equality (``torch.allclose`` of their bases), which ``Module.named_modules`` hits
    through its memo set: that breaks on the meta device and merges distinct modules. Here each model gets its own
    copies (a few hundred kB for the baselines) whose classes compare by identity, as every other ``nn.Module``.
    """
    from escnn.nn.modules.basismanager import basismanager, basisexpansion_singleblock, basissampler_singleblock
    shared = (basisexpansion_singleblock.SingleBlockBasisExpansion, basissampler_singleblock.SingleBlockBasisSampler)
    copies = {}
    stack = [module]
    while stack:  # walk ``_modules`` directly: ``modules()`` itself uses the equality being replaced
        parent = stack.pop()
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if isinstance(child, shared):
                if id(child) not in copies:
                    copies[id(child)] = copy.deepcopy(child)
                child = parent._modules[name] = copies[id(child)]
            if isinstance(child, basismanager.BasisManager) and type(child) not in _IDENTITY_CLASSES.values():
                child.__class__ = _identity_class(type(child))
            stack.append(child)


def _detach_escnn_filters(module: nn.Module) -> None:
    """Detach the expanded filters escnn's convs cache as buffers in eval mode.

    escnn computes them with autograd on, which leaves non-leaf tensors in the module: ``copy.deepcopy`` (timm's
    ``prune_intermediate_layers`` tests, ``FeatureGetterNet``, EMA copies) refuses those, and a second backward pass
    through them fails anyway. Evaluation mode is for inference; training mode recomputes the filters per step.
    """
    for m in module.modules():
        for key in ('filter', 'expanded_bias'):
            t = m._buffers.get(key) if hasattr(m, '_buffers') else None
            if t is not None and t.requires_grad:
                m._buffers[key] = t.detach()


class _EscnnBase(TimmApiMixin, nn.Module):
    """The escnn recipes on the one timm-API base (:class:`~gequiv_timm.models._timm_api.TimmApiMixin`: head,
    ``forward_head`` / ``forward``, ``reset_classifier``, ``get_classifier``, grad checkpointing, weight decay).

    Subclasses build ``self.stages`` (a ModuleList of escnn stages, each ``Tensor -> Tensor`` through
    :class:`_Tensorized`), ``self.gpool`` (group pooling), ``self.norm`` (final escnn module before pooling, may be
    Identity), ``self.in_type``, ``self.feature_info`` and the head (``_init_head``). The stage outputs are already
    folded 4-D maps (escnn's regular fields), so ``forward_features``, ``forward_intermediates`` and
    ``prune_intermediate_layers`` are this class's own.
    """

    stages: nn.ModuleList
    exported: bool = False
    stem_tap = False  # the first stage lifts

    # ----- construction / mode -------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            _detach_escnn_filters(self)
        return self

    def _build_on(self, device, dtype) -> None:
        """Move the freshly built model to the factory ``device`` / ``dtype`` (timm's ``device=`` / ``dtype=``
        kwargs; escnn builds its kernel bases on the CPU, see ``__init__``)."""
        _unshare_escnn_bases(self)
        device = torch.get_default_device() if device is None else torch.device(device)
        if device.type != 'cpu' or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def min_input_size(self) -> int:
        """The smallest input side: every stage leaves at least one pixel (unpadded convs shrink the map, each 2x2
        max pool needs a 2x2 map)."""
        geos = [stage.geometry for stage in self.stages]
        s = 1
        while True:
            side = s
            for g in geos:
                side = g.out_side(side)
            if side >= 1:
                return s
            s += 1

    # ----- timm API -------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] -> [B, num_features, H', W']``, invariant (pooled over the group)."""
        x = self._check_input(x)
        for stage in self.stages:
            x = self._run_stage(stage, x)
        x = self.norm(x)
        return self.gpool(x)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r'^stages\.0\.', blocks=r'^stages\.(\d+)')

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Features at the end of each stage, folded ``[B, C*|G|, H, W]`` (equivariant), plus the final invariant
        features ``[B, num_features, H', W']`` unless ``intermediates_only``."""
        from timm.models._features import feature_take_indices
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._check_input(x)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = self._run_stage(stage, x)
            if i in take:
                y = self.norm(x) if (norm and i == len(self.stages) - 1) else x
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        if len(stages) < len(self.stages):
            for stage in self.stages[len(stages):]:
                x = self._run_stage(stage, x)
        return self.gpool(self.norm(x)), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last tap in ``indices``.

        The group pooling before the head plays the role of timm's final norm: with ``prune_norm=True`` it is
        removed, so ``forward_features`` returns the last kept stage's folded map ``[B, C*|G|, h, w]``; otherwise it
        pools the kept stage's fields (``[B, C, h, w]``, invariant). The WRN's final BN-ReLU belongs to
        the last stage's width and goes when that stage is pruned. ``num_features`` / ``head_hidden_size`` follow.
        """
        from timm.models._features import feature_take_indices
        take, max_index = feature_take_indices(len(self.stages), indices)
        old_features = self.num_features
        if max_index + 1 < len(self.stages):
            self.stages = self.stages[:max_index + 1]
            self.feature_info = self.feature_info[:max_index + 1]
            self.norm = nn.Identity()
            self.num_features = len(self.stages[-1].out_type)
        if prune_norm:
            self.norm = nn.Identity()
            self.gpool = nn.Identity()
            self.num_features = self.feature_info[-1]['num_chs']
        self.head_hidden_size = self.num_features
        if prune_head:
            self.num_classes = 0
        if prune_head or self.num_features != old_features:
            self.head.reset(self.num_classes, pool_type='' if prune_head else None, in_features=self.num_features,
                            **get_device_dtype(self))
        return take

    # ----- escnn extras ---------------------------------------------------------------------------------------
    def export(self) -> _EscnnBase:
        """A copy in eval mode in which every escnn module is replaced by plain PyTorch (escnn's ``export()``).

        The copy computes the same function (to float rounding), takes plain tensors and is what evaluation and
        latency benchmarks use. Group pooling is :class:`FieldMaxPool`, plain PyTorch already.
        """
        if self.exported:
            return copy.deepcopy(self).eval()
        # escnn's R2Conv caches its expanded filter in eval mode and drops it in train mode: copy in train mode, so
        # that the copy's eval() expands the filters from the current weights, then restore the mode of ``self``.
        was = self.training
        self.train()
        try:
            m = copy.deepcopy(self)
        finally:
            self.train(was)
        m.eval()
        _export_inplace(m)
        m.exported = True
        return m.eval()

    @torch.no_grad()
    def check_invariance(self, x: torch.Tensor | None = None, size: int = 28) -> float:
        """Max abs change of the logits when the input is turned by multiples of 90 degrees (and mirrored for
        D4). For C8, 45 degree turns are not exact on the pixel grid and are not included."""
        was = self.training
        self.eval()
        if x is None:
            x = torch.randn(2, self.in_chans, size, size)
        turns = [('rot', k) for k in range(1, 4)] + ([('flip', 0)] if self.group == 'd4' else [])

        def act(t, g):
            return torch.rot90(t, g[1], dims=(-2, -1)) if g[0] == 'rot' else torch.flip(t, dims=(-1,))
        try:
            return check_equivariance(self, x, act, lambda y, g: y, turns, name=type(self).__name__)
        finally:
            self.train(was)


class EscnnCNN(_EscnnBase):
    """P4CNN-shaped steerable CNN with regular fields (escnn), see the module docstring.

    Args:
        group: ``'c4'``, ``'c8'`` or ``'d4'``.
        widths: regular fields per conv layer; one stage per layer (P4CNN: seven 3x3 layers).
        kernel_size: odd spatial kernel size of every conv.
        pool_after: 0-based indices of the conv layers followed by 2x2 max pooling.
        padding: spatial padding of every conv (0 as in P4CNN: 28 -> 2 through seven 3x3 convs and one pool).
        num_classes, in_chans, drop_rate, global_pool: as in timm.

    Shapes:
        input ``[B, in_chans, H, W]``; ``forward_features`` ``[B, widths[-1], H', W']`` (invariant);
        logits ``[B, num_classes]``.
    """

    def __init__(self, group: str = 'c4', widths: Sequence[int] = (12,) * 7, kernel_size: int = 3,
                 pool_after: Sequence[int] = (1,), padding: int = 0, num_classes: int = 10, in_chans: int = 1,
                 drop_rate: float = 0.0, global_pool: str = 'avg', device=None, dtype=None,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"EscnnCNN: unexpected arguments {sorted(kwargs)}")
        # escnn solves for its kernel bases with numpy and builds them on the CPU; the model moves afterwards
        with torch.device('cpu'):
            _, enn = import_escnn()
            widths = _check_widths('EscnnCNN', widths)
            check_int('EscnnCNN', 'kernel_size', kernel_size, 1, odd=True)
            check_int('EscnnCNN', 'padding', padding, 0)
            pool_after = tuple(sorted(set(check_indices('EscnnCNN', 'pool_after', pool_after, len(widths),
                                                        'conv layers followed by a 2x2 max pool'))))
            check_common('EscnnCNN', num_classes, in_chans, drop_rate)
            self.group = str(group).lower()
            self.gspace = _gspace(self.group)
            self.in_chans = in_chans
            self.widths = widths
            gs = self.gspace
            self.in_type = enn.FieldType(gs, in_chans * [gs.trivial_repr])
            stages, feature_info, reduction = [], [], 1
            t = self.in_type
            for i, w in enumerate(widths):
                out = enn.FieldType(gs, w * [gs.regular_repr])
                mods = [enn.R2Conv(t, out, kernel_size, padding=padding, bias=False),
                        enn.InnerBatchNorm(out), enn.ReLU(out, inplace=True)]
                if i in pool_after:
                    mods.append(enn.PointwiseMaxPool2D(out, 2))
                    reduction *= 2
                geo = _Geometry(w * gs.regular_repr.size, kernel_size, padding, pool_after=i in pool_after)
                stages.append(_Tensorized(enn.SequentialModule(*mods), t, geo))
                feature_info.append(dict(num_chs=w * gs.regular_repr.size, reduction=reduction, module=f'stages.{i}',
                                         group=self.group, layout='folded'))
                t = out
            self.stages = nn.ModuleList(stages)
            self.feature_info = feature_info
            self.norm = nn.Identity()
            self.gpool = FieldMaxPool(gs.regular_repr.size)
            self.num_classes, self.drop_rate, self.grad_checkpointing = num_classes, drop_rate, False
            self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        self._build_on(device, dtype)


class EscnnWideResNet(_EscnnBase):
    """Pre-activation wide ResNet with regular fields (escnn), see the module docstring.

    Args:
        group: ``'c4'``, ``'c8'`` or ``'d4'``.
        stem_width: regular fields of the 3x3 stem conv.
        widths: regular fields of each stage; a 2x2 max pool starts every stage after the first.
        depth: residual blocks per stage (each: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 conv shortcut when the
            width changes).
        kernel_size: odd kernel size of the 3x3 convs (padding keeps the size).
        num_classes, in_chans, drop_rate, global_pool: as in timm.

    Shapes:
        input ``[B, in_chans, H, W]`` (H, W divisible by ``2**(len(widths)-1)`` for exact 90 degree equivariance);
        ``forward_features`` ``[B, widths[-1], H / 2**(len(widths)-1), ...]``; logits ``[B, num_classes]``.
    """

    def __init__(self, group: str = 'c8', stem_width: int = 6, widths: Sequence[int] = (6, 12, 24), depth: int = 1,
                 kernel_size: int = 3, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0,
                 global_pool: str = 'avg', device=None, dtype=None,
                 **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"EscnnWideResNet: unexpected arguments {sorted(kwargs)}")
        # escnn solves for its kernel bases with numpy and builds them on the CPU; the model moves afterwards
        with torch.device('cpu'):
            _, enn = import_escnn()
            widths = _check_widths('EscnnWideResNet', widths)
            check_int('EscnnWideResNet', 'stem_width', stem_width, 1, what='regular fields')
            check_int('EscnnWideResNet', 'depth', depth, 1, what='residual blocks per stage')
            check_int('EscnnWideResNet', 'kernel_size', kernel_size, 1, odd=True)
            check_common('EscnnWideResNet', num_classes, in_chans, drop_rate)
            self.group = str(group).lower()
            self.gspace = gs = _gspace(self.group)
            self.in_chans = in_chans
            self.widths = widths
            self.in_type = enn.FieldType(gs, in_chans * [gs.trivial_repr])
            pad = kernel_size // 2

            def ftype(n):
                return enn.FieldType(gs, n * [gs.regular_repr])

            def block(t_in, t_out):
                body = enn.SequentialModule(
                    enn.InnerBatchNorm(t_in), enn.ReLU(t_in, inplace=False),
                    enn.R2Conv(t_in, t_out, kernel_size, padding=pad, bias=False),
                    enn.InnerBatchNorm(t_out), enn.ReLU(t_out, inplace=True),
                    enn.R2Conv(t_out, t_out, kernel_size, padding=pad, bias=False))
                short = None if t_in == t_out else enn.R2Conv(t_in, t_out, 1, bias=False)
                return _Residual(body, short)

            t = ftype(stem_width)
            stages: list[nn.Module] = []
            feature_info = []
            reduction = 1
            for si, w in enumerate(widths):
                t_in = self.in_type if si == 0 else t
                mods: list[nn.Module] = []
                if si == 0:
                    mods.append(enn.R2Conv(self.in_type, t, kernel_size, padding=pad, bias=False))
                else:
                    mods.append(enn.PointwiseMaxPool2D(t, 2))
                    reduction *= 2
                for _ in range(depth):
                    t_out = ftype(w)
                    mods.append(block(t, t_out))
                    t = t_out
                chain = _Chain(*mods)
                chain.out_type = t
                stages.append(_Tensorized(chain, t_in, _Geometry(w * gs.regular_repr.size, pool_before=si > 0)))
                feature_info.append(dict(num_chs=w * gs.regular_repr.size, reduction=reduction, module=f'stages.{si}',
                                         group=self.group, layout='folded'))
            self.stages = nn.ModuleList(stages)
            self.feature_info = feature_info
            self.norm = _Tensorized(enn.SequentialModule(enn.InnerBatchNorm(t), enn.ReLU(t, inplace=True)), t,
                                    _Geometry(widths[-1] * gs.regular_repr.size))
            self.gpool = FieldMaxPool(gs.regular_repr.size)
            self.num_classes, self.drop_rate, self.grad_checkpointing = num_classes, drop_rate, False
            self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        self._build_on(device, dtype)


_MODEL_CLASSES = {'cnn': EscnnCNN, 'wrn': EscnnWideResNet}


def _create_escnn(variant: str, pretrained: bool = False, arch: str = 'cnn', **kwargs) -> _EscnnBase:
    """Build an escnn baseline: ``arch`` picks the recipe (``'cnn'`` or ``'wrn'``)."""
    require_extras(variant)  # the catalog's requires = ["escnn"]: an ImportError naming the extra
    import_escnn()  # the same when the extra is listed as installed but escnn cannot be imported
    if arch not in _MODEL_CLASSES:
        raise ValueError(f"{variant}: arch must be one of {sorted(_MODEL_CLASSES)}, got {arch!r}")
    if pretrained:
        raise ValueError(f"{variant}: there are no pretrained weights for the escnn baselines; they are trained by "
                         f"`gequiv-timm compare` (use pretrained=False)")
    widths = kwargs.get('widths', ())  # a bad value is refused by the constructor, with its range
    n_stages = (len(widths) if isinstance(widths, (list, tuple)) else 0) or 5
    feature_cfg = dict(out_indices=tuple(range(min(n_stages, 5))))
    return create_gequiv_model(_MODEL_CLASSES[arch], variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    """28x28 grayscale digits (MNIST mean / std), no crop. No first_conv: R2Conv holds basis coefficients, not a
    ``.weight`` timm could adapt to another in_chans (a listed departure, tests/models/timm_departures.py)."""
    return digits_cfg(**{'pool_size': (2, 2), 'classifier': 'head.fc', 'paper_ids': 'arXiv:1911.08251', **kwargs})


# papers, descriptions and the extra they need (requires = ["escnn"]): registry/escnn.toml. The builders are
# registered with or without escnn installed (listed by timm.list_models); creating one without it raises an
# ImportError naming the extra.
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_escnn_c4cnn': _cfg(),
    'gequiv_escnn_c8cnn': _cfg(),
    'gequiv_escnn_d4cnn': _cfg(),
    'gequiv_escnn_c8_wrn': _cfg(pool_size=(7, 7)),
}))

# The P4CNN-shaped ones copy gequiv_p4cnn's layout (seven unpadded 3x3 convs, 2x2 max pool after the second,
# avg-pooled classifier) with widths (regular fields per layer) chosen to match its 21,940 parameters:
# gequiv_escnn_c4cnn 22,004; gequiv_escnn_c8cnn 22,346; gequiv_escnn_d4cnn 22,346 (num_classes=10). escnn
# parametrises a 3x3 kernel in a band-limited steerable basis (C4 regular->regular: 24 weights per field pair
# instead of the 36 of a free p4 filter), which is why its widths are larger at the same parameter count.


@register_model
def gequiv_escnn_c4cnn(pretrained: bool = False, **kwargs) -> EscnnCNN:
    """escnn C4 steerable CNN shaped like P4CNN (7 R2Conv 3x3, regular fields), widths matched to gequiv_p4cnn."""
    model_args = dict(arch='cnn', group='c4', widths=(13, 13, 12, 12, 12, 12, 12), kernel_size=3, padding=0,
                      pool_after=(1,), in_chans=1, num_classes=10)
    return _create_escnn('gequiv_escnn_c4cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_escnn_c8cnn(pretrained: bool = False, **kwargs) -> EscnnCNN:
    """escnn C8 steerable CNN shaped like P4CNN (7 R2Conv 3x3, regular fields), widths matched to gequiv_p4cnn."""
    model_args = dict(arch='cnn', group='c8', widths=(9, 9, 9, 9, 9, 8, 8), kernel_size=3, padding=0,
                      pool_after=(1,), in_chans=1, num_classes=10)
    return _create_escnn('gequiv_escnn_c8cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_escnn_d4cnn(pretrained: bool = False, **kwargs) -> EscnnCNN:
    """escnn D4 steerable CNN (rotations and mirrors) shaped like P4CNN, widths matched to gequiv_p4cnn."""
    model_args = dict(arch='cnn', group='d4', widths=(9, 9, 9, 9, 9, 8, 8), kernel_size=3, padding=0,
                      pool_after=(1,), in_chans=1, num_classes=10)
    return _create_escnn('gequiv_escnn_d4cnn', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_escnn_c8_wrn(pretrained: bool = False, **kwargs) -> EscnnWideResNet:
    """escnn C8 wide ResNet (pre-activation, regular fields, 3 stages): the deeper steerable reference."""
    model_args = dict(arch='wrn', group='c8', stem_width=6, widths=(6, 12, 24), depth=1, kernel_size=3, in_chans=1,
                      num_classes=10)
    return _create_escnn('gequiv_escnn_c8_wrn', pretrained, **dict(model_args, **kwargs))
