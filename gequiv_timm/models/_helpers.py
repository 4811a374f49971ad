"""Shared plumbing for the timm-facing recipes: building through ``build_model_with_cfg`` and pretrained checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from timm.models import build_model_with_cfg

from ..weights import WeightsError, check_state_dict, read_metadata, verify_checksum

__all__ = ['create_gequiv_model', 'adapt_input_conv_nd']


def adapt_input_conv_nd(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Adapt a first-layer weight ``[C_out, C_in, ...]`` (any rank >= 3, e.g. GrouPy's 5-D) to ``in_chans``.

    As timm's ``adapt_input_conv``: going to 1 channel sums the input channels; going to more channels repeats
    them and rescales so the response to a constant image keeps its size.
    """
    c_in = weight.shape[1]
    if c_in == in_chans:
        return weight
    dtype = weight.dtype
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // c_in)
        w = w.repeat(1, reps, *([1] * (w.dim() - 2)))[:, :in_chans]
        w = w * (c_in / float(in_chans))
    return w.to(dtype)


def require_extras(variant: str) -> None:
    """Raise an ImportError naming the pip extra when the catalog entry of ``variant`` needs one that is missing
    (``requires = ["escnn"]``), before anything is built."""
    from .. import registry
    missing = registry.get_entry(variant).missing_extras()
    if missing:
        raise ImportError(f"{variant} needs the optional extra(s) {missing}: pip install "
                          f"'gequiv_timm[{','.join(missing)}]'")


def create_gequiv_model(model_cls, variant: str, pretrained: bool = False, *,
                        first_conv: Optional[str] = None, feature_cfg: Optional[Dict[str, Any]] = None,
                        pretrained_filter_fn: Optional[Callable] = None, **kwargs):
    """``build_model_with_cfg`` with the house defaults.

    * features through timm's getter wrapper (the model's ``forward_intermediates``), so ``features_only=True``
      works for every model;
    * ``first_conv`` names a first layer whose weight may be 5-D (GrouPy layout): its input channels are adapted
      to ``in_chans`` here (timm's own adaptation only handles 4-D weights);
    * a local weights file is checked against the manifest's sha256 before it is read;
    * the extras the catalog entry requires are checked first (:func:`require_extras`).
    """
    require_extras(variant)
    feature_cfg = dict(feature_cls='getter', **(feature_cfg or {}))
    in_chans = kwargs.get('in_chans', None)

    source = _check_pretrained_file(variant, kwargs) if pretrained else None

    def _filter(state_dict, model):
        if pretrained_filter_fn is not None:
            state_dict = pretrained_filter_fn(state_dict, model)
        if first_conv and in_chans is not None:
            key = first_conv + '.weight'
            if key in state_dict and state_dict[key].shape[1] != in_chans:
                state_dict[key] = adapt_input_conv_nd(in_chans, state_dict[key])
        _check_state_dict_fits(state_dict, model, source, kwargs)
        return state_dict

    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                 pretrained_filter_fn=_filter, **kwargs)
    # the arguments that rebuild this network (the builder's with the user's), for config.json on export
    skip = _BUILD_ONLY_KEYS | (_FEATURE_KEYS if kwargs.get('features_only') else set())
    model._model_args = {k: v for k, v in kwargs.items() if k not in skip}
    return model


# keys of create_model / build_model_with_cfg that configure the build, not the network
_BUILD_ONLY_KEYS = {'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_strict', 'cache_dir', 'device', 'dtype',
                    'features_only', 'feature_cfg'}
_FEATURE_KEYS = {'out_indices', 'feature_cls'}  # moved into feature_cfg by timm when features_only


def backbone_cfg(backbone: str, tag: str = '', keys: Optional[tuple] = None, **overrides) -> Dict[str, Any]:
    """timm's own PretrainedCfg of ``backbone`` (``backbone.tag``; the default tag when ``tag`` is empty), as a
    dict for a family's ``default_cfgs``, with ``overrides`` applied.

    ``keys`` keeps only those fields (e.g. the input settings a keypoint model inherits); by default every field
    of the checkpoint's cfg is kept except what names the backbone itself (architecture, tag, paper, notes), so
    that a model built on the backbone and loading its checkpoint preprocesses as timm does for it.
    """
    from timm.models import get_pretrained_cfg
    name = f'{backbone}.{tag}' if tag else backbone
    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise ValueError(f"{name}: timm has no pretrained cfg for it; check the backbone name and tag")
    src = cfg.to_dict()
    if keys is not None:
        src = {k: src[k] for k in keys if k in src}
    else:
        # url: timm's legacy (pickled .pth) location; gequiv_timm loads safetensors only, from hf_hub_id
        for k in ('architecture', 'tag', 'url', 'paper_name', 'paper_ids', 'origin_url', 'notes', 'description'):
            src.pop(k, None)
    src.update(overrides)
    return src


def _resolve_cfg(variant: str, kwargs: Dict[str, Any]):
    """The pretrained cfg the builder will use (as timm resolves it), with the overlay applied."""
    from timm.models import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg', None),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay', None))
    return cfg.to_dict()


def _fetch_from_hub(hub_id: str, filename: Optional[str], cache_dir) -> Path:
    from timm.models._hub import hf_split
    from huggingface_hub import hf_hub_download
    repo, revision = hf_split(hub_id)
    filename = filename or 'model.safetensors'
    if not filename.endswith('.safetensors'):
        raise WeightsError(f"hf-hub:{hub_id}: file {filename!r} is not safetensors; gequiv_timm loads "
                           f"safetensors only (it never unpickles). Publish model.safetensors.")
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                    library_name='gequiv_timm'))
    except EntryNotFoundError:
        raise WeightsError(f"hf-hub:{hub_id}: the repo has no {filename}; gequiv_timm loads safetensors only "
                           f"(it never unpickles). Publish it with `gequiv-timm push`.") from None


def _check_pretrained_file(variant: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """Find, fetch and check the weights file the builder is about to read, before the model is built.

    Resolves the source as timm does (``file`` / ``local-dir`` / ``hf-hub``); a Hub file is fetched into the
    Hugging Face cache first (timm then finds it there). The file must be readable safetensors (no pickle, ever),
    its metadata must name ``variant`` when it names an architecture, and when the manifest lists the file (the
    shipped copy, or the same bytes on the tag's Hub repo) its sha256 must match. Returns the file's path, used to
    name it in later errors; raises :class:`~gequiv_timm.weights.WeightsError` /
    :class:`~gequiv_timm.weights.ChecksumError` naming it.
    """
    from .. import registry
    cfg = _resolve_cfg(variant, kwargs)
    source = cfg.get('source') or ''
    tag = cfg.get('tag') or ''
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    entry = registry.manifest_entry(f'{variant}.{tag}') if tag else None
    expected = None
    if source == 'local-dir':
        folder = Path(cfg.get('file') or '')
        path = folder / 'model.safetensors'
        if not path.is_file():
            raise WeightsError(f"local-dir:{folder}: no model.safetensors there; gequiv_timm loads safetensors "
                               f"only. Write the folder with `gequiv-timm export`.")
    elif source == 'hf-hub' or (not cfg.get('file') and not cfg.get('state_dict') and cfg.get('hf_hub_id')):
        hub_id = cfg.get('hf_hub_id')
        path = _fetch_from_hub(hub_id, cfg.get('hf_hub_filename'), kwargs.get('cache_dir'))
        if entry and hub_id == registry.hub_id(f'{variant}.{tag}') and source != 'hf-hub':
            expected = entry.get('sha256')  # the tag's own repo serves the shipped bytes
    elif cfg.get('file'):
        path = Path(cfg['file'])
        if 'file' not in overlay and entry and path.name == entry.get('file'):
            expected = entry.get('sha256')
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found for {variant}{'.' + tag if tag else ''}; "
                               f"reinstall the package or pass pretrained_cfg_overlay=dict(file=...)")
    elif cfg.get('url') or cfg.get('state_dict') is not None:
        return None  # url / state_dict: timm's business
    else:
        # timm would only warn and keep the random init: a silent change of results, so refuse instead
        import timm
        tagged = [n for n in timm.list_pretrained(f'{variant}.*')]
        hint = f"pretrained tags: {', '.join(tagged)}" if tagged else 'this model has no pretrained weights yet'
        raise WeightsError(f"{variant}{'.' + tag if tag else ''}: pretrained=True but no weights are known for it "
                           f"({hint}). Pass pretrained_cfg_overlay=dict(file='weights.safetensors') or "
                           f"pretrained=False.")
    if path.suffix != '.safetensors':
        raise WeightsError(f"{path}: not a .safetensors file; gequiv_timm loads safetensors only (it never "
                           f"unpickles). Convert the checkpoint with safetensors.torch.save_file.")
    verify_checksum(path, expected, f'{variant}.{tag}')
    meta = read_metadata(path)
    arch = meta.get('architecture')
    if arch and arch != variant:
        raise WeightsError(f"{path}: weights are for {arch!r}, not {variant!r}; create {arch!r} instead, or "
                           f"load a checkpoint trained for {variant!r}")
    return str(path)


def _check_state_dict_fits(state_dict, model, source: Optional[str], kwargs: Dict[str, Any]) -> None:
    """Names, shapes of the pretrained state dict against ``model`` (before timm copies anything into it).

    The classifier is left out when timm is about to drop it (``num_classes`` differs, or ``features_only``).
    """
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    ignore = set()
    classifiers = cfg.get('classifier')
    if classifiers and (kwargs.get('features_only') or
                        getattr(model, 'num_classes', None) != cfg.get('num_classes')):
        classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
        ignore = {k for c in classifiers for k in (*state_dict.keys(), *model.state_dict().keys())
                  if k.startswith(c + '.')}
    check_state_dict(state_dict, model, source or cfg.get('hf_hub_id') or 'pretrained weights', ignore=ignore,
                     strict=kwargs.get('pretrained_strict', True) is not False)
