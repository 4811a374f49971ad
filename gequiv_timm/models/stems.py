"""Equivariant stems for any timm CNN: swap a backbone's stem for group convolutions, keep everything else.

Two entry points:

* :func:`inject_stem` (generic): put *any* module in place of a timm model's stem. The stem is found through
  timm's own metadata, not a table of attribute names: ``pretrained_cfg['first_conv']`` names the stem
  convolution, and a traced forward pass on a small probe follows its output through the per-pixel modules that
  come right after it (norms, activations, spatial pooling). The chain ends at the first module that is none of
  these (a block, a residual, a conv). The replacement module must map ``[B, C_in, H, W]`` to the output of one
  point of that chain; the longest matching segment is replaced (the first conv is replaced by the new module,
  the rest of the segment by ``nn.Identity``), so every later layer and its weights are untouched. ``feature_info``
  entries that tap the replaced segment are annotated. Any module works, e.g. the PDE engineer's ``PDEStem``::

      model = timm.create_model('resnet18')
      inject_stem(model, PDEStem(3, 64, stride=4))   # replaces conv1, bn1, act1 and maxpool (stride 4)

* :func:`inject_equivariant_stem`: an :class:`~gequiv_timm.layers.stem.EquivariantStem` (pure torch, in
  ``layers/stem.py``: lifting group convolution, group convolution(s), then pooling over the group or a learned
  equivariant fold) with the original stem's output
  channels and stride, optionally warm-started from the original stem's filters.

The stem's output transforms as follows (``g`` a 90-degree rotation, or for p4m also a mirror, about the image
centre; exact when ``H`` and ``W`` are multiples of the stem's stride; a ``'cN'`` / ``'dN'`` stem also has the other
rotations of its group, approximately):

* ``mode='invariant'``: ``stem(g x) = g stem(x)``, the spatial rotation/flip only (channels untouched),
* ``mode='equivariant'``: the output is folded ``[B, C'*|G|, H', W']``; ``stem(g x) = fold(g . unfold(stem(x)))``:
  spatial transform plus the regular-representation permutation inside every block of ``|G|`` channels.

Loading a plain backbone checkpoint (say ``resnet18``'s) into the stem-injected model: every non-stem weight is
loaded and equals the source, the stem keeps its initialisation (or is warm-started from the source's first
conv), and :func:`adapt_backbone_state_dict` returns a report of what was and was not loaded. The registered
models (builders ``gequiv_p4_resnet18`` ... at the bottom, cfgs derived from timm's cfg of the backbone; catalog
data in ``registry/stems.toml``) do this through timm's ``pretrained=True`` path, so
``pretrained_cfg_overlay=dict(file='resnet18.safetensors')`` or the Hub (the plain backbone's ``hf_hub_id``)
both work.

The registered models' stem (issue 18) is ``mode='equivariant', stem_depth=0, stem_proj=False``: the lifting
convolution alone, its ``C / |G|`` fields at the ``|G|`` group elements folded into the backbone's ``C`` stem
channels after a group batch norm and a ReLU, so it costs what the plain ``conv -> BN -> act`` stem did
(``benchmarks/bench_stem.py``); ``mode='invariant', stem_depth=1, stem_proj=True`` builds the stem they had before
(a 3x3 group convolution after the lift, pooled over the group, then 1x1 conv, BN, ReLU).

Cohen & Welling, "Group Equivariant Convolutional Networks", ICML 2016 (lifting and group convolutions).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..layers.stem import EquivariantStem, PooledLift  # noqa: F401  (public here since 0.1.0; pure torch in layers/)
from ..registry import tagged_cfgs
from ..weights import WeightsError, check_finite, check_state_dict, read_state
from ._args import TIMM_RATES, check_timm_kwargs
from ._helpers import adapt_input_conv_nd, backbone_cfg, create_gequiv_model, dropped_head_keys, merge_backbone_state
from ._stem_args import STEM_STRIDES, check_stem_args, equivariant_stem_min_size
from ._timm_api import attach_input_policy

__all__ = ['StemError', 'StemInfo', 'EquivariantStem', 'find_stem', 'inject_stem', 'inject_equivariant_stem',
           'adapt_backbone_state_dict', 'load_backbone_checkpoint', 'get_stem', 'stem_output']

_logger = logging.getLogger(__name__)


class StemError(ValueError):
    """A model whose stem cannot be found or replaced; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# finding the stem
# ----------------------------------------------------------------------------------------------------------------
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_POOL_TYPES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ACT_MODULES = ('torch.nn.modules.activation', 'timm.layers.activations', 'timm.layers.activations_me')


def _kind(m: nn.Module) -> Optional[str]:
    """'norm' / 'act' / 'pool' for per-pixel modules that may follow a stem conv, 'pass' for Identity/Dropout."""
    if isinstance(m, _NORM_TYPES):
        return 'norm'
    if isinstance(m, _POOL_TYPES):
        return 'pool'
    if type(m).__module__ in _ACT_MODULES:
        return 'act'
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return 'pass'
    return None


@dataclass
class StemInfo:
    """Where a model's stem is.

    Attributes:
        first_conv: path of the stem convolution (``pretrained_cfg['first_conv']``).
        chain: the per-pixel modules that follow it in execution order, ``(path, kind, output shape)`` with
            kind ``'norm' | 'act' | 'pool'`` (the candidates to be replaced with it).
        in_chs, out_chs, stride, kernel_size: of the stem convolution.
        conv_shape: output shape of the stem convolution on the probe.
        probe_shape: the probe input shape used to trace (``[1, C_in, H, W]``).
        feature_info: the model's feature_info entries (timm metadata), used to annotate the taps of the stem.
    """

    first_conv: str
    chain: List[Tuple[str, str, Tuple[int, ...]]]
    in_chs: int
    out_chs: int
    stride: int
    kernel_size: int
    conv_shape: Tuple[int, ...]
    probe_shape: Tuple[int, ...]
    feature_info: List[Dict[str, Any]] = field(default_factory=list)

    def segment_ends(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """Every possible end of the stem segment with the output shape there (the conv itself first)."""
        return [(self.first_conv, self.conv_shape)] + [(p, s) for p, _, s in self.chain]


class _StopTrace(Exception):
    pass


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _probe_size(model: nn.Module, stride: int) -> Tuple[int, int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('fixed_input_size') and cfg.get('input_size'):
        return tuple(cfg['input_size'][-2:])
    return (64, 64) if stride <= 8 else (4 * stride, 4 * stride)


def find_stem(model: nn.Module, first_conv: Optional[str] = None) -> StemInfo:
    """Locate ``model``'s stem from timm's metadata and a traced forward pass.

    ``first_conv`` defaults to ``model.pretrained_cfg['first_conv']``. Raises :class:`StemError` (saying why) when
    the model has no single first conv, when it is not a plain ``nn.Conv2d``, or when it is not on the forward path.
    """
    name = _model_name(model)
    if getattr(model, '_gequiv_stem', None):
        raise StemError(f"{name}: its stem was already replaced ({model._gequiv_stem['path']}); create a fresh model "
                        f"to inject another stem")
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if first_conv is None:
        first_conv = cfg.get('first_conv')
    if not first_conv:
        raise StemError(f"{name}: the model's pretrained_cfg has no 'first_conv', so its stem cannot be located. "
                        f"Pass first_conv='<path of the stem conv>' explicitly.")
    if isinstance(first_conv, (list, tuple)):
        if len(first_conv) != 1:
            raise StemError(f"{name}: pretrained_cfg['first_conv'] lists several input convs {list(first_conv)}; "
                            f"a multi-branch stem cannot be replaced by one module. Pass first_conv= to pick one.")
        first_conv = first_conv[0]
    try:
        conv = model.get_submodule(first_conv)
    except AttributeError:
        raise StemError(f"{name}: first_conv {first_conv!r} is not a submodule of the model") from None
    if not isinstance(conv, nn.Conv2d):
        raise StemError(f"{name}: the stem {first_conv!r} is a {type(conv).__name__}, not an nn.Conv2d; only a "
                        f"convolutional stem can be replaced (was it replaced already?)")
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise StemError(f"{name}: the stem conv {first_conv!r} has groups={conv.groups}, dilation={conv.dilation}; "
                        f"expected a dense, undilated conv")
    if conv.stride[0] != conv.stride[1] or conv.kernel_size[0] != conv.kernel_size[1]:
        raise StemError(f"{name}: the stem conv {first_conv!r} is not square (kernel {conv.kernel_size}, stride "
                        f"{conv.stride}); a 90-degree rotation would not map its grid onto itself")
    stride = conv.stride[0]
    if stride > 4:
        raise StemError(f"{name}: the stem {first_conv!r} is a stride-{stride} patch embedding (a transformer-style "
                        f"patchify stem), not a CNN stem; a group convolution at full resolution in its place would "
                        f"cost ~{stride * stride}x the embedding. Use a CNN backbone.")
    size = _probe_size(model, stride)
    w = conv.weight
    x = torch.zeros(1, conv.in_channels, *size, device=w.device, dtype=w.dtype)

    chain: List[Tuple[str, str, Tuple[int, ...]]] = []
    state: Dict[str, Any] = dict(cur=None, conv_shape=None, inside=None, seen=False)
    handles = []

    def pre_hook(path, m, inputs):
        if not state['seen'] or state['inside'] is not None:
            return
        kind = _kind(m)
        inp = inputs[0] if inputs else None
        if len(list(m.children())) and kind is None:
            return  # a container starting: its children will tell
        if kind == 'pass':
            return
        if kind is None or inp is not state['cur']:
            raise _StopTrace
        state['inside'] = path

    def post_hook(path, m, inputs, output):
        if path == first_conv:
            state.update(cur=output, conv_shape=tuple(output.shape), seen=True)
            return
        if state['inside'] == path:
            state['inside'] = None
            chain.append((path, _kind(m), tuple(output.shape)))
            state['cur'] = output
        elif state['seen'] and state['inside'] is None and _kind(m) == 'pass' and inputs and \
                inputs[0] is state['cur']:
            state['cur'] = output

    for path, m in model.named_modules():
        if not path:
            continue
        handles.append(m.register_forward_pre_hook(partial(pre_hook, path)))
        handles.append(m.register_forward_hook(partial(post_hook, path)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except _StopTrace:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not state['seen']:
        raise StemError(f"{name}: the stem conv {first_conv!r} named by pretrained_cfg['first_conv'] is not used by "
                        f"the model's forward pass on a {tuple(x.shape)} probe")
    fi = list(getattr(model, 'feature_info', []) or [])
    fi = [dict(f) for f in fi if isinstance(f, dict)]
    return StemInfo(first_conv=first_conv, chain=chain, in_chs=conv.in_channels, out_chs=conv.out_channels,
                    stride=stride, kernel_size=conv.kernel_size[0], conv_shape=state['conv_shape'],
                    probe_shape=tuple(x.shape), feature_info=fi)


# ----------------------------------------------------------------------------------------------------------------
# generic injection
# ----------------------------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def _state_keys(model: nn.Module, path: str) -> List[str]:
    prefix = path + '.'
    return [k for k in model.state_dict().keys() if k.startswith(prefix)]


def inject_stem(model: nn.Module, stem_module: nn.Module, *, first_conv: Optional[str] = None,
                info: Optional[StemInfo] = None) -> nn.Module:
    """Replace ``model``'s stem by ``stem_module`` in place and return ``model``.

    Args:
        model: a timm CNN (anything with ``pretrained_cfg['first_conv']``, or pass ``first_conv``).
        stem_module: any ``nn.Module`` mapping ``[B, C_in, H, W]`` to the output of the original stem at some point
            of its chain ``first conv -> norm/act -> pool`` (same channels and stride), e.g. ``[B, 64, H/2, W/2]``
            (replaces ``conv1, bn1, act1`` of a ResNet) or ``[B, 64, H/4, W/4]`` (also ``maxpool``). It may have a
            ``first_conv`` attribute naming (relative to itself) its own first layer with a ``.weight``; the model's
            ``pretrained_cfg['first_conv']`` is then pointed at it, as timm expects.
        first_conv: overrides ``pretrained_cfg['first_conv']``.
        info: a :class:`StemInfo` from :func:`find_stem` (to skip tracing again).

    The first conv's slot receives ``stem_module``; the other modules of the replaced segment become
    ``nn.Identity`` (so ``forward``, ``forward_intermediates`` and ``features_only`` run through the new stem);
    every later module and parameter is untouched. ``model._gequiv_stem`` records what was replaced
    (``path``, ``replaced``, ``source_keys``: the state-dict keys of the old stem, ``stride``, ``out_chs``).

    Raises :class:`StemError` when the stem cannot be found or ``stem_module``'s output matches no point of the
    stem (message lists the shapes it could have produced).
    """
    info = info or find_stem(model, first_conv)
    conv = model.get_submodule(info.first_conv)
    probe = torch.zeros(*info.probe_shape, device=conv.weight.device, dtype=conv.weight.dtype)
    was_training = stem_module.training
    stem_module.eval()
    try:
        with torch.no_grad():
            out = stem_module(probe)
    except Exception as e:
        raise StemError(f"{_model_name(model)}: the stem module {type(stem_module).__name__} failed on a probe of "
                        f"shape {tuple(probe.shape)} ({type(e).__name__}: {e})") from e
    finally:
        stem_module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise StemError(f"{_model_name(model)}: the stem module must return a 4-D tensor [B, C, H, W], got "
                        f"{getattr(out, 'shape', type(out).__name__)}")
    ends = info.segment_ends()
    match = [i for i, (_, s) in enumerate(ends) if tuple(s) == tuple(out.shape)]
    if not match:
        options = ', '.join(f"{p} -> {list(s)}" for p, s in ends)
        raise StemError(f"{_model_name(model)}: the stem module maps {list(probe.shape)} to {list(out.shape)}, which "
                        f"matches no point of the original stem ({options}). Give it the channels and stride of one "
                        f"of these.")
    end = match[-1]
    replaced = [p for p, _ in ends[:end + 1]]
    source_keys = [k for p in replaced for k in _state_keys(model, p)]
    stem_module.to(device=conv.weight.device)
    _set_submodule(model, info.first_conv, stem_module)
    for p in replaced[1:]:
        _set_submodule(model, p, nn.Identity())

    stride = info.probe_shape[-1] // out.shape[-1]
    record = dict(path=info.first_conv, replaced=replaced, end=replaced[-1], source_keys=source_keys,
                  stride=stride, out_chs=int(out.shape[1]), in_chs=info.in_chs,
                  stem_type=type(stem_module).__name__)
    model._gequiv_stem = record
    # timm metadata: first_conv -> the new stem's own first layer (so `first_conv + '.weight'` exists)
    rel = getattr(stem_module, 'first_conv', None)
    new_first = f"{info.first_conv}.{rel}" if rel else None
    if new_first is not None:
        cfg = getattr(model, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            model.pretrained_cfg = dict(cfg, first_conv=new_first)
            model.default_cfg = model.pretrained_cfg
        traits = getattr(model, '_traits', None)
        if isinstance(traits, dict):
            model._traits = dict(traits, first_conv=new_first)
    # annotate the feature taps that now read the new stem; a tap on a replaced module (now nn.Identity, e.g.
    # ResNet's act1 when the new stem also does the maxpool's reduction) reads the new stem's output at its stride
    fi = getattr(model, 'feature_info', None)
    desc = dict(stem=type(stem_module).__name__, group=getattr(stem_module, 'group_name', None),
                layout=getattr(stem_module, 'layout', 'planar'))
    if isinstance(fi, list):
        for f in fi:
            if isinstance(f, dict) and (f.get('module') in replaced or any(
                    r.startswith(str(f.get('module')) + '.') for r in replaced)):
                f.update(desc)
                if f.get('module') in replaced:
                    f['reduction'] = stride
    return model


def get_stem(model: nn.Module) -> nn.Module:
    """The module injected by :func:`inject_stem` (raises when the model has none)."""
    rec = getattr(model, '_gequiv_stem', None)
    if not rec:
        raise StemError(f"{_model_name(model)}: no injected stem; call inject_stem / inject_equivariant_stem first")
    return model.get_submodule(rec['path'])


def stem_output(model: nn.Module, x: torch.Tensor, stem: Optional[nn.Module] = None) -> torch.Tensor:
    """The output of the (injected) stem inside a forward pass of ``model`` on ``x`` (captured by a hook; the rest
    of the forward is not run). ``stem`` defaults to ``get_stem(model)``; pass it when the stem was injected into a
    submodule of ``model`` (e.g. the backbone of a keypoint model)."""
    stem = get_stem(model) if stem is None else stem
    box = {}

    def hook(m, i, o):
        box['out'] = o
        raise _StopTrace

    h = stem.register_forward_hook(hook)
    try:
        model(x)
    except _StopTrace:
        pass
    finally:
        h.remove()
    if 'out' not in box:
        raise StemError(f"{_model_name(model)}: the stem {type(stem).__name__} was not called by forward()")
    return box['out']


def inject_equivariant_stem(model: Union[nn.Module, str], group: str = 'p4', mode: str = 'invariant', *,
                            width: Optional[int] = None, kernel_size: Optional[int] = None, depth: int = 1,
                            stride: Optional[int] = None, group_pool: str = 'max', proj: bool = True,
                            warm_start: bool = True, first_conv: Optional[str] = None, **create_kwargs) -> nn.Module:
    """Replace the stem of a timm CNN (instance or name) by an :class:`EquivariantStem`; return the model.

    Args:
        model: a timm model or a model name (created with ``timm.create_model(model, **create_kwargs)``).
        group: ``'p4'`` (90-degree rotations) or ``'p4m'`` (rotations and mirrors); or ``'cN'`` / ``'dN'``
            (``'c8'``: 45-degree rotations in harmonic filters, exact for the quarter turns when 4 divides N,
            approximate at the others: :meth:`EquivariantStem.check_equivariance`).
        mode: ``'invariant'`` (pool over the group) or ``'equivariant'`` (learned equivariant fold to the width).
        width, depth, group_pool, proj: see :class:`EquivariantStem` (``mode='equivariant', depth=0, proj=False``:
            the stem the registered ``gequiv_p4_*`` / ``gequiv_p4m_*`` models use, about the plain stem's cost).
        kernel_size: lifting filter size; default: the stem conv's, made odd (ConvNeXt's 4 -> 5).
        stride: the new stem's reduction; default: the stem conv's (a ResNet's 2; pass 4 to also replace its
            max pool).
        warm_start: copy the original stem filters into the lifting filters (:meth:`EquivariantStem.init_from_conv`).
        first_conv: overrides ``pretrained_cfg['first_conv']``.

    Every later layer (and its pretrained weights) is kept. Raises :class:`StemError` when the stem cannot be
    replaced.

    Example:
        >>> m = inject_equivariant_stem('resnet18', 'p4', 'invariant')
        >>> m(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    check_stem_args('inject_equivariant_stem', mode=mode, width=width, kernel_size=kernel_size,
                     depth=depth, stride=stride, group_pool=group_pool, proj=proj, prefix='')
    if isinstance(model, str):
        import timm
        check_timm_kwargs('inject_equivariant_stem', create_kwargs, rates=TIMM_RATES)
        model = timm.create_model(model, **create_kwargs)
    elif create_kwargs:
        raise TypeError(f"inject_equivariant_stem: unexpected keyword arguments {sorted(create_kwargs)} (they are "
                        f"only used when `model` is a name)")
    info = find_stem(model, first_conv)
    conv = model.get_submodule(info.first_conv)
    k = kernel_size if kernel_size is not None else (info.kernel_size if info.kernel_size % 2 else
                                                     info.kernel_size + 1)
    stride = info.stride if stride is None else stride
    if stride not in STEM_STRIDES:
        raise StemError(f"{_model_name(model)}: its stem conv has stride {stride}; an equivariant stem reduces by "
                        f"one of {STEM_STRIDES}: pass stride= explicitly")
    stem = EquivariantStem(info.in_chs, info.out_chs, stride, group=group, mode=mode, width=width,
                           kernel_size=k, depth=depth, group_pool=group_pool, proj=proj,
                           device=conv.weight.device, dtype=conv.weight.dtype)
    if warm_start and conv.weight.device.type != 'meta':
        stem.init_from_conv(conv.weight.detach())
    return inject_stem(model, stem, info=info)


# ----------------------------------------------------------------------------------------------------------------
# loading a plain backbone checkpoint
# ----------------------------------------------------------------------------------------------------------------
def adapt_backbone_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, warm_start: bool = True
                              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """Map a plain backbone's state dict onto a stem-injected model, changing only what the stem replaced.

    Returns ``(new_state_dict, report)``. ``new_state_dict`` is the source without the keys of the replaced stem
    (``conv1.weight``, ``bn1.*`` of a ResNet; they are extra by design) plus the model's own stem tensors (absent
    from the source by design; warm-started from the source's stem conv when ``warm_start``). Every other key is
    passed through untouched, so the checks that follow (:func:`gequiv_timm.weights.check_state_dict`) see and
    name the keys that do not fit: unexpected (another backbone's layers), missing, wrong shapes. ``report``:
    ``loaded`` (source keys that fit the model), ``initialised`` (stem keys taken from the model),
    ``not_loaded`` (source keys with the reason: replaced stem, not in the model, wrong shape), ``missing``
    (model keys neither the source nor the stem provide). The model is not modified.
    """
    rec = getattr(model, '_gequiv_stem', None)
    if not rec:
        raise StemError(f"{_model_name(model)}: no injected stem; adapt_backbone_state_dict is for stem-injected "
                        f"models")
    stem = model.get_submodule(rec['path'])
    own = model.state_dict()
    stem_prefix = rec['path'] + '.'
    source_stem = set(rec['source_keys'])
    conv_key = rec['path'] + '.weight'
    warm: Dict[str, torch.Tensor] = {}
    if warm_start and conv_key in state_dict and hasattr(stem, 'init_from_conv'):
        w = state_dict[conv_key]
        if not w.is_floating_point() or w.dim() != 4 or w.shape[0] != rec['out_chs']:
            raise WeightsError(f"{_model_name(model)}: the source's stem conv {conv_key} ({w.dtype}, "
                               f"{tuple(w.shape)}) is not a floating [{rec['out_chs']}, C_in, k, k] weight of this "
                               f"backbone's stem, so it cannot warm-start the equivariant stem; use this backbone's "
                               f"checkpoint, or warm_start=False")
        if w.shape[1] != rec['in_chs']:
            w = adapt_input_conv_nd(rec['in_chs'], w)
        lift = stem.lift.weight
        if lift.device.type != 'meta':
            lift_key = stem_prefix + 'lift.weight'
            saved = lift.detach().clone()
            with torch.no_grad():
                stem.init_from_conv(w)
                warm[lift_key] = lift.detach().clone()
                lift.copy_(saved)  # the model is only written by load_state_dict, after every check
    def replaced(k: str) -> Optional[str]:
        if k in source_stem or (k.startswith(stem_prefix) and k not in own):
            return 'replaced stem' + (' (warm-started the lifting filters)' if k == conv_key and warm else '')
        return None
    return merge_backbone_state(state_dict, own, stem_prefix, skip=replaced, fill=lambda k, v: warm.get(k, v))


def load_backbone_checkpoint(model: nn.Module, checkpoint: Union[str, Dict[str, torch.Tensor]],
                             warm_start: bool = True, strict: bool = True) -> Dict[str, List[str]]:
    """Load a plain backbone checkpoint (a path to a ``.safetensors`` file, or a state dict) into a stem-injected
    model; return the report of :func:`adapt_backbone_state_dict` (also kept as ``model.pretrained_load_report``).

    Only the keys the stem replaces may be absent or extra, and the classifier when the model's ``num_classes``
    differs from its cfg's (a new head keeps its initialisation, as in timm). Any other unexpected or missing key
    is refused unless ``strict=False`` (a partial load); wrong shapes, dtypes and NaN / inf values are always
    refused. Every check runs before anything is copied. Files are read with safetensors only (never unpickled):
    convert a ``.pth`` with ``safetensors.torch.save_file``."""
    source = 'state dict'
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, '__fspath__'):
        source = os.fsdecode(checkpoint)
        if not source.endswith('.safetensors'):
            raise WeightsError(f"{source}: not a .safetensors file; gequiv_timm loads safetensors only (it never "
                               f"unpickles). Convert it with safetensors.torch.save_file(state_dict, "
                               f"'{os.path.splitext(os.path.basename(source))[0]}.safetensors').")
        checkpoint = read_state(source)
    check_finite(checkpoint, source)
    sd, report = adapt_backbone_state_dict(checkpoint, model, warm_start=warm_start)
    head = dropped_head_keys(sd, model)
    check_state_dict(sd, model, source, strict=strict, ignore=head)
    model.load_state_dict({k: v for k, v in sd.items() if k not in head}, strict=False)
    model.pretrained_load_report = report
    return report


def _pretrained_filter(state_dict, model, warm_start: bool = True):
    """The stem models' ``pretrained_filter_fn``: :func:`adapt_backbone_state_dict`; the checks (strict unless
    ``pretrained_strict=False``) follow in :func:`~gequiv_timm.models._helpers.create_gequiv_model`."""
    sd, report = adapt_backbone_state_dict(state_dict, model, warm_start=warm_start)
    model.pretrained_load_report = report
    _logger.info(f"{_model_name(model)}: {len(report['loaded'])} backbone tensors fit; stem initialised "
                 f"({len(report['initialised'])} tensors); not loaded: {report['not_loaded']}")
    return sd


# ----------------------------------------------------------------------------------------------------------------
# registered models (catalog data: registry/stems.toml)
# ----------------------------------------------------------------------------------------------------------------
def _build(variant: str, backbone: str, group: str, mode: str, stem_args: Dict[str, Any], **kwargs):
    import timm
    model = timm.create_model(backbone, pretrained=False, **kwargs)
    model = inject_equivariant_stem(model, group, mode, warm_start=False, **stem_args)
    stem = get_stem(model)
    return attach_input_policy(model, stem, variant, stem.in_chs, equivariant_stem_min_size(stem, backbone))


def _create_stem_model(variant: str, pretrained: bool = False, *, backbone: str, group: str = 'p4',
                       mode: str = 'equivariant', stem_width: Optional[int] = None,
                       stem_kernel_size: Optional[int] = None, stem_depth: int = 0, stem_stride: Optional[int] = None,
                       stem_group_pool: str = 'max', stem_proj: bool = False, warm_start: bool = True, **kwargs):
    """Build ``backbone`` with an equivariant stem; ``pretrained=True`` loads the *plain backbone's* checkpoint
    (the cfg's file / Hub id) into every non-stem layer and initialises (warm-starts) the stem.

    The default stem (issue 18) is ``mode='equivariant', stem_depth=0, stem_proj=False``: the lifting
    convolution's ``out_chs / |G|`` fields times ``|G|`` orientations are the backbone's stem channels, folded, after
    one group batch norm and ReLU (:class:`EquivariantStem`), so the stem costs what the plain one did. The stem the
    models had before (a 3x3 group conv after the lift, pooled over the group, 1x1 conv, BN, ReLU) is
    ``mode='invariant', stem_depth=1, stem_proj=True``."""
    check_stem_args(variant, mode=mode, width=stem_width, kernel_size=stem_kernel_size,
                     depth=stem_depth, stride=stem_stride, group_pool=stem_group_pool, proj=stem_proj)
    check_timm_kwargs(variant, kwargs, rates=TIMM_RATES)  # passed on to the timm backbone
    stem_args = dict(width=stem_width, kernel_size=stem_kernel_size, depth=stem_depth, stride=stem_stride,
                     group_pool=stem_group_pool, proj=stem_proj)
    builder = partial(_build, variant, backbone, group, mode, stem_args)
    feature_cfg = None
    if kwargs.get('features_only') and 'out_indices' not in kwargs:
        import timm
        with torch.device('meta'):  # only the backbone's number of feature levels is needed
            n = len(timm.create_model(backbone, pretrained=False, device='meta').feature_info)
        feature_cfg = dict(out_indices=tuple(range(n)))
    return create_gequiv_model(builder, variant, pretrained, feature_cfg=feature_cfg,
                               pretrained_filter_fn=partial(_pretrained_filter, warm_start=warm_start),
                               source_architectures=(backbone,), **kwargs)


def stem_cfg(backbone: str, stem_first_conv: str = EquivariantStem.first_conv):
    """The cfg of a stem model on ``backbone``, per tag: timm's own cfg of the backbone checkpoint the tag names
    (``backbone.tag``: its hub repo, input size, crop, mean / std, classifier), with ``first_conv`` pointed at the
    new stem's first layer (the stem sits where the backbone's first conv was)."""
    def cfg(tag: str) -> Dict[str, Any]:
        src = backbone_cfg(backbone, tag)
        return dict(src, first_conv=f"{src['first_conv']}.{stem_first_conv}")
    return cfg


# the tags name the backbone checkpoints whose non-stem weights pretrained=True loads: registry/stems.toml
default_cfgs = generate_default_cfgs(tagged_cfgs({
    'gequiv_p4_resnet18': stem_cfg('resnet18'),
    'gequiv_p4m_resnet50': stem_cfg('resnet50'),
    'gequiv_p4_convnext_tiny': stem_cfg('convnext_tiny'),
    'gequiv_p4m_efficientnet_b0': stem_cfg('efficientnet_b0'),
    'gequiv_p4_regnety_016': stem_cfg('regnety_016'),
}))


@register_model
def gequiv_p4_resnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-18 (timm's resnet18) with a p4-equivariant stem: a lifting group convolution whose fields at
    their 4 rotations are the stem's channels. The rest is timm's resnet18; the model as a whole is not
    invariant."""
    model_args = dict(backbone='resnet18', group='p4')
    return _create_stem_model('gequiv_p4_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4m_resnet50(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50 (timm's resnet50) with a p4m-equivariant stem: a lifting group convolution whose fields at
    the 8 elements of p4m (4 rotations, with and without a mirror) are the stem's channels. The rest is timm's
    resnet50; the model as a whole is not invariant."""
    model_args = dict(backbone='resnet50', group='p4m')
    return _create_stem_model('gequiv_p4m_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4_convnext_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """ConvNeXt-Tiny (timm's convnext_tiny) with a p4-equivariant stem: a lifting group convolution whose fields at
    their 4 rotations are the stem's channels. The rest is timm's convnext_tiny; the model as a whole is not
    invariant."""
    model_args = dict(backbone='convnext_tiny', group='p4')
    return _create_stem_model('gequiv_p4_convnext_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4m_efficientnet_b0(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B0 (timm's efficientnet_b0) with a p4m-equivariant stem: a lifting group convolution whose
    fields at the 8 elements of p4m (4 rotations, with and without a mirror) are the stem's channels. The rest is
    timm's efficientnet_b0; the model as a whole is not invariant."""
    model_args = dict(backbone='efficientnet_b0', group='p4m')
    return _create_stem_model('gequiv_p4m_efficientnet_b0', pretrained, **dict(model_args, **kwargs))


@register_model
def gequiv_p4_regnety_016(pretrained: bool = False, **kwargs) -> nn.Module:
    """RegNetY-1.6GF (timm's regnety_016) with a p4-equivariant stem: a lifting group convolution whose fields at
    their 4 rotations are the stem's channels. The rest is timm's regnety_016; the model as a whole is not
    invariant."""
    model_args = dict(backbone='regnety_016', group='p4')
    return _create_stem_model('gequiv_p4_regnety_016', pretrained, **dict(model_args, **kwargs))
