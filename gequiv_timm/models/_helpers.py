"""Shared plumbing for the timm-facing recipes: building through ``build_model_with_cfg`` and pretrained checks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from timm.models import build_model_with_cfg

from .. import registry
from ..weights import (
    WeightsError, check_finite, check_state_dict, read_metadata, verify_checksum, verify_digest,
)
from ._args import check_timm_kwargs

__all__ = ['create_gequiv_model', 'adapt_input_conv_nd', 'dropped_head_keys']


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


def merge_backbone_state(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], fresh_prefix: str,
                         skip: Optional[Callable[[str], Optional[str]]] = None,
                         fill: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None
                         ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """A backbone's checkpoint merged into a model that adds its own modules (the stem models' new stem, the
    canonicalizers): ``(state dict for load_state_dict, report)``. A key that ``skip`` gives a reason for is left out;
    every other key is kept and reported ``loaded``, or ``not_loaded`` (not in the model, or another shape: the
    load then names it); the model's keys the file lacks are ``initialised`` under ``fresh_prefix`` (with
    ``fill(key, value)``, default the model's own value) and ``missing`` elsewhere."""
    out: Dict[str, torch.Tensor] = {}
    report: Dict[str, List[str]] = dict(loaded=[], initialised=[], not_loaded=[], missing=[])
    for k, v in state_dict.items():
        reason = skip(k) if skip is not None else None
        if reason:
            report['not_loaded'].append(f"{k}: {reason}")
            continue
        out[k] = v
        if k not in own:
            report['not_loaded'].append(f"{k}: not in the model")
        elif tuple(own[k].shape) != tuple(v.shape):
            report['not_loaded'].append(f"{k}: shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
        else:
            report['loaded'].append(k)
    for k, v in own.items():
        if k in out:
            continue
        if k.startswith(fresh_prefix):
            out[k] = fill(k, v) if fill is not None else v
            report['initialised'].append(k)
        else:
            report['missing'].append(k)
    return out, report


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
                        pretrained_filter_fn: Optional[Callable] = None, source_architectures: Tuple[str, ...] = (),
                        **kwargs):
    """``build_model_with_cfg`` with the house defaults.

    * features through timm's getter wrapper (the model's ``forward_intermediates``), so ``features_only=True``
      works for every model;
    * ``first_conv`` names a first layer whose weight may be 5-D (GrouPy layout): its input channels are adapted
      to ``in_chans`` here (timm's own adaptation only handles 4-D weights);
    * ``pretrained=True`` loads exactly the bytes that were verified (:func:`_verified_weights`): the weights file
      is found (shipped file, ``file=`` / ``local-dir:``, or downloaded from the Hub) and checked before the model is
      built, and timm is handed that local file, so it never downloads again and never falls back to a pickle file;
      the model's ``pretrained_cfg`` then reads as timm resolved it (``source='hf-hub'``, ``hf_hub_id``, ...);
    * the state dict is checked against the model before timm copies anything (names, shapes, dtypes, values:
      :func:`gequiv_timm.weights.check_state_dict`); missing or unexpected keys are refused unless a partial load
      is asked for with timm's own ``pretrained_strict=False`` (wrong shapes, dtypes and values never load);
      ``source_architectures`` are further names a file's ``architecture`` metadata may give (a stem model takes
      its plain backbone's checkpoint);
    * the extras the catalog entry requires are checked first (:func:`require_extras`), and before them the
      arguments every timm model takes (:func:`~gequiv_timm.models._args.check_timm_kwargs`: ``num_classes``,
      ``in_chans``, ``drop_rate``, ``drop_path_rate``, ``drop_block_rate``), for every family alike.
    """
    check_timm_kwargs(variant, kwargs)
    require_extras(variant)
    feature_cfg = dict(feature_cls='getter', **(feature_cfg or {}))
    in_chans = kwargs.get('in_chans', None)

    verified = _verified_weights(variant, kwargs, source_architectures) if pretrained else None
    build_kwargs = dict(kwargs)
    if verified is not None:
        build_kwargs['pretrained_cfg'] = verified.run_cfg
        build_kwargs.pop('pretrained_cfg_overlay', None)
    source = verified.name if verified is not None else None

    def _filter(state_dict, model):
        check_finite(state_dict, source or 'pretrained weights')  # before a family filter uses any tensor
        if pretrained_filter_fn is not None:
            state_dict = pretrained_filter_fn(state_dict, model)
        if first_conv and in_chans is not None:
            key = first_conv + '.weight'
            if key in state_dict and state_dict[key].shape[1] != in_chans:
                state_dict[key] = adapt_input_conv_nd(in_chans, state_dict[key])
        _check_state_dict_fits(state_dict, model, source, kwargs)
        return state_dict

    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                 pretrained_filter_fn=_filter, **build_kwargs)
    if verified is not None:
        verified.show_resolved_cfg(model)
    # the arguments that rebuild this network (the builder's with the user's), for config.json on export
    skip = _BUILD_ONLY_KEYS | (_FEATURE_KEYS if kwargs.get('features_only') else set())
    model._model_args = {k: v for k, v in kwargs.items() if k not in skip}
    return model


# keys of create_model / build_model_with_cfg that configure the build, not the network
_BUILD_ONLY_KEYS = {'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_strict', 'cache_dir', 'device', 'dtype',
                    'features_only', 'feature_cfg'}
_FEATURE_KEYS = {'out_indices', 'feature_cls'}  # moved into feature_cfg by timm when features_only


def digits_cfg(**overrides) -> Dict[str, Any]:
    """The pretrained cfg of a model for the project's grayscale digit data (MNIST mean / std, no crop, 28x28 and
    10 classes unless ``overrides`` say otherwise, e.g. ``input_size``, ``pool_size``, ``first_conv``,
    ``classifier``, ``paper_ids``)."""
    return {'num_classes': 10, 'input_size': (1, 28, 28), 'crop_pct': 1.0, 'interpolation': 'bilinear',
            'mean': (0.1307,), 'std': (0.3081,), **overrides}


def scaled_param_groups(groups: List[Dict[str, Any]], scales: List[float], lr: Optional[float] = None
                        ) -> List[Dict[str, Any]]:
    """Optimizer param groups, each with its rate multiplier (the models' ``param_groups``): with ``lr=None`` (for
    timm's optimizer and scheduler factories) a group carries ``lr_scale``, which timm's schedulers apply; with ``lr``
    given (a plain torch optimizer, no timm scheduler) an explicit ``lr * scale`` and no ``lr_scale`` (it would be
    applied twice). Groups without parameters are left out."""
    out = []
    for g, scale in zip(groups, scales):
        if not g['params']:
            continue
        g = dict(g)
        if lr is None:
            g['lr_scale'] = scale
        else:
            g['lr'] = lr * scale
        out.append(g)
    return out


def backbone_cfg(backbone: str, tag: str = '', keys: Optional[tuple] = None, **overrides) -> Dict[str, Any]:
    """timm's own PretrainedCfg of ``backbone`` (``backbone.tag``; the default tag when ``tag`` is empty), as a
    dict for a family's ``default_cfgs``, with ``overrides`` applied.

    ``keys`` keeps only those fields (e.g. the input settings a keypoint model inherits); by default every field
    of the checkpoint's cfg is kept except what names the backbone itself (architecture, tag, paper, notes), so
    that a model built on the backbone and loading its checkpoint preprocesses as timm does for it. The legacy
    ``url`` (a pickled ``.pth``) is never kept: gequiv_timm loads safetensors only, from ``hf_hub_id`` or a file.
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
        for k in ('architecture', 'tag', 'url', 'paper_name', 'paper_ids', 'origin_url', 'notes', 'description'):
            src.pop(k, None)
    if 'url' in overrides:
        raise ValueError(f"backbone_cfg({name!r}): url= is a pickled checkpoint location; gequiv_timm loads "
                         f"safetensors only (give hf_hub_id or file)")
    src.update(overrides)
    return src


def _resolve_cfg(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The pretrained cfg the builder will use (as timm resolves it), with the overlay applied."""
    from timm.models import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg', None),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay', None))
    return cfg.to_dict()


# the PretrainedCfg fields that say where weights come from (timm's resolution order: state_dict, file, hf_hub_id,
# url; source 'hf-hub' / 'local-dir' first)
_SOURCE_KEYS = ('source', 'file', 'hf_hub_id', 'hf_hub_filename', 'url', 'state_dict', 'custom_load')
_LOCAL_FIX = "pretrained_cfg_overlay=dict(file='path/to/model.safetensors')"


@dataclass
class _Verified:
    """A weights file found and checked before the build: ``path`` (local, verified), ``name`` (how errors name
    it), ``run_cfg`` (the cfg handed to timm: the same fields, but the only source is ``file=path``) and
    ``shown_cfg`` (the cfg as timm resolved it, what the model shows afterwards)."""

    path: Path
    name: str
    run_cfg: Dict[str, Any]
    shown_cfg: Dict[str, Any]

    def show_resolved_cfg(self, model) -> None:
        """Put the resolved source fields back into the built model's cfg (and its feature wrapper's copy)."""
        for m in model.modules():
            cfg = getattr(m, 'pretrained_cfg', None)
            if isinstance(cfg, dict) and cfg.get('file') == str(self.path):
                for k in _SOURCE_KEYS:
                    if self.shown_cfg.get(k) is not None:
                        cfg[k] = self.shown_cfg[k]
                    else:
                        cfg.pop(k, None)


def _verified_weights(variant: str, kwargs: Dict[str, Any], source_architectures: Tuple[str, ...] = ()
                      ) -> Optional[_Verified]:
    """Find, fetch and check the weights file ``pretrained=True`` will load, before the model is built.

    Resolves the source as timm does (``source='hf-hub'`` / ``'local-dir'``, then ``state_dict``, ``file``,
    ``hf_hub_id``). The file must be readable safetensors (no pickle, ever: a ``url`` source, a ``.pth`` / ``.bin``
    file and a repo without ``model.safetensors`` are refused); its metadata must name ``variant`` (or one of
    ``source_architectures``) when it names an architecture; and its bytes must be the expected ones:

    * a shipped file of a tag: the manifest's sha256;
    * a Hub file from a repo the manifest lists (:func:`gequiv_timm.registry.hub_repos`, whichever way the repo
      is reached: a tag's default or ``timm.create_model('hf-hub:...')``): the manifest's sha256;
    * a Hub file from any other repo: the checksum the Hub reports for it (the sha256 of an LFS file, the git id
      of a file kept in git), read from the Hugging Face cache (where a download is stored under that checksum)
      or asked from the Hub when the cache does not keep it.

    Returns the verified file with the cfg to build with (None for an in-memory ``state_dict``: no file, checked
    by the filter like any other); raises :class:`~gequiv_timm.weights.WeightsError` /
    :class:`~gequiv_timm.weights.ChecksumError` naming the file, before anything is built.
    """
    cfg = _resolve_cfg(variant, kwargs)
    source = cfg.get('source') or ''
    tag = cfg.get('tag') or ''
    name_tag = f'{variant}.{tag}' if tag else variant
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if overlay.get('url'):
        raise WeightsError(f"{variant}: pretrained_cfg_overlay url={overlay['url']!r} is not supported: a url "
                           f"names a pickled .pth checkpoint and gequiv_timm never unpickles. Download it, convert "
                           f"it with safetensors.torch.save_file and pass {_LOCAL_FIX}.")
    expected, expected_what = None, ''
    if source == 'hf-hub':
        path, name, expected, expected_what = _fetch_from_hub(cfg.get('hf_hub_id'), cfg.get('hf_hub_filename'),
                                                              kwargs.get('cache_dir'), variant)
    elif source == 'local-dir':
        folder = Path(cfg.get('file') or '')
        path = folder / 'model.safetensors'
        name = str(path)
        if not path.is_file():
            raise WeightsError(f"local-dir:{folder}: no model.safetensors there; gequiv_timm loads safetensors "
                               f"only (it never unpickles). Write the folder with `gequiv-timm export`.")
    elif cfg.get('state_dict') is not None:
        return None  # in memory: nothing to download, nothing to unpickle; checked by the filter
    elif cfg.get('file'):
        path = Path(cfg['file'])
        name = str(path)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found for {name_tag}; reinstall the package or pass "
                               f"{_LOCAL_FIX}")
        if 'file' not in overlay and tag:
            entry = registry.manifest_entry(name_tag)  # a broken manifest: an error naming it
            if entry and path.name == entry.get('file'):
                expected, expected_what = entry.get('sha256'), name_tag
    elif cfg.get('hf_hub_id'):
        path, name, expected, expected_what = _fetch_from_hub(cfg['hf_hub_id'], cfg.get('hf_hub_filename'),
                                                              kwargs.get('cache_dir'), variant)
    elif cfg.get('url'):
        raise WeightsError(f"{name_tag}: its only weights are at url {cfg['url']!r}, a pickled .pth checkpoint; "
                           f"gequiv_timm never unpickles. Download it, convert it with safetensors.torch.save_file "
                           f"and pass {_LOCAL_FIX}.")
    else:
        # timm would only warn and keep the random init: a silent change of results, so refuse instead
        import timm
        tagged = [n for n in timm.list_pretrained(f'{variant}.*')]
        hint = f"pretrained tags: {', '.join(tagged)}" if tagged else 'this model has no pretrained weights yet'
        raise WeightsError(f"{name_tag}: pretrained=True but no weights are known for it ({hint}). Pass "
                           f"pretrained_cfg_overlay=dict(file='weights.safetensors') or pretrained=False.")
    if path.suffix != '.safetensors':
        raise WeightsError(f"{name}: not a .safetensors file; gequiv_timm loads safetensors only (it never "
                           f"unpickles). Convert the checkpoint with safetensors.torch.save_file.")
    if expected:
        verify_checksum(path, expected, expected_what)
    meta = read_metadata(path)
    arch = meta.get('architecture')
    if arch and arch != variant and arch not in source_architectures:
        raise WeightsError(f"{name}: weights are for {arch!r}, not {variant!r}; create {arch!r} instead, or "
                           f"load a checkpoint trained for {variant!r}")
    run_cfg = {k: v for k, v in cfg.items() if k not in _SOURCE_KEYS}
    run_cfg.update(file=str(path), custom_load=False)
    return _Verified(path=path, name=name, run_cfg=run_cfg, shown_cfg=cfg)


def _fetch_from_hub(hub_id: str, filename: Optional[str], cache_dir, variant: str
                    ) -> Tuple[Path, str, Optional[str], str]:
    """Download ``filename`` (default ``model.safetensors``) of ``hub_id`` (``repo[@revision]``) into the Hugging
    Face cache and check it against the Hub's own checksum, unless the manifest lists the repo (then the caller
    checks the manifest's sha256). Returns ``(path, name for errors, expected sha256 or None, what it is for)``."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError,
    )
    from timm.models._hub import hf_split
    repo, revision = hf_split(hub_id)
    filename = filename or 'model.safetensors'
    name = f"hf-hub:{hub_id}"
    if not filename.endswith('.safetensors'):
        raise WeightsError(f"{name}: file {filename!r} is not safetensors; gequiv_timm loads safetensors only (it "
                           f"never unpickles). Publish model.safetensors.")
    listed = registry.hub_repos().get(repo.lower()) if filename == 'model.safetensors' else None
    try:
        path = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                    library_name='gequiv_timm'))
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass of it
        offline = constants.HF_HUB_OFFLINE or isinstance(e.__cause__ or e.__context__, OfflineModeIsEnabled)
        why = ('offline mode is on (HF_HUB_OFFLINE)' if offline else
               f"the Hub at {constants.ENDPOINT} is unreachable ({_cause(e)})")
        raise WeightsError(f"{name}: cannot download {filename}: {why}, and it is not in the local cache. Connect "
                           f"(or unset HF_HUB_OFFLINE), or load a local copy: timm.create_model({variant!r}, "
                           f"pretrained=True, {_LOCAL_FIX}).") from None
    except EntryNotFoundError:
        raise WeightsError(f"{name}: the repo has no {filename}; gequiv_timm loads safetensors only "
                           f"(it never unpickles). Publish it with `gequiv-timm push`.") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise WeightsError(f"{name}: repository not found, or private / gated for this login; check the id or log "
                           f"in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise WeightsError(f"{name}: the repo has no revision {revision!r}") from None
    except HfHubHTTPError as e:
        raise WeightsError(f"{name}: the Hub answered {_cause(e)} for {filename}; try again later, or {_LOCAL_FIX}"
                           ) from None
    if listed:
        entry = registry.manifest_entry(listed) or {}
        return path, name, entry.get('sha256'), f"{listed}, served by {name}"
    verify_digest(path, _hub_digest(path, repo, filename), f"{name} {filename}")
    return path, name, None, ''


def _cause(e: BaseException) -> str:
    c = e.__cause__ or e.__context__ or e
    text = str(c).splitlines()[0] if str(c) else ''
    return f"{type(c).__name__}: {text}" if text else type(c).__name__


def _hub_digest(path: Path, repo: str, filename: str) -> str:
    """The checksum the Hub reported for a downloaded file: the cache stores a download as ``blobs/<etag>`` (the
    etag of an LFS file is its sha256, of a git file its git id) and links the snapshot path to it. When the cache
    keeps no link (symlinks unavailable), the Hub is asked for the file's metadata at the snapshot's commit."""
    if path.is_symlink():  # the snapshot's own link (a blob may itself link on into a shared store)
        target = Path(os.readlink(path))
        if target.parent.name == 'blobs':
            return target.name
    parts = path.parts
    commit = parts[parts.index('snapshots') + 1] if 'snapshots' in parts[:-1] else None
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    try:
        return get_hf_file_metadata(hf_hub_url(repo, filename, revision=commit)).etag or ''
    except Exception as e:  # offline or unreachable: the bytes cannot be verified
        raise WeightsError(f"{path}: cannot verify this cached download of hf-hub:{repo} {filename}: the cache keeps "
                           f"no checksum for it (no symlinks) and the Hub cannot be asked ({_cause(e)}). Connect, "
                           f"or load a local copy you trust with {_LOCAL_FIX}.") from None


def dropped_head_keys(state_dict, model, features_only: bool = False) -> set:
    """The classifier keys timm drops when loading pretrained weights into ``model`` (its ``num_classes`` differs
    from the cfg's, or ``features_only``): a new head keeps its initialisation by design, so they are left out of
    the checks. Empty otherwise."""
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    classifiers = cfg.get('classifier')
    if not classifiers or not (features_only or getattr(model, 'num_classes', None) != cfg.get('num_classes')):
        return set()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    return {k for c in classifiers for k in (*state_dict.keys(), *model.state_dict().keys()) if k.startswith(c + '.')}


def _check_state_dict_fits(state_dict, model, source: Optional[str], kwargs: Dict[str, Any]) -> None:
    """Names, shapes, dtypes and values of the pretrained state dict against ``model`` (before timm copies anything
    into it); the classifier is left out when timm is about to drop it (:func:`dropped_head_keys`). Missing and
    unexpected keys are refused unless ``pretrained_strict=False`` asks for a partial load."""
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    check_state_dict(state_dict, model, source or cfg.get('hf_hub_id') or 'pretrained weights',
                     ignore=dropped_head_keys(state_dict, model, bool(kwargs.get('features_only'))),
                     strict=kwargs.get('pretrained_strict', True) is not False,
                     partial_hint='pretrained_strict=False')
