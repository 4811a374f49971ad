"""The Hub at the edge: the Hub layout, model cards, push, and checks of shipped weights against the manifest.

* :func:`save_weights` / :func:`load_weights` / :func:`read_metadata` / :func:`update_manifest`: re-exported from
  :mod:`gequiv_timm.weights` (safetensors files with metadata, the manifest), where they live.
* :func:`export`: the folder layout timm reads (``config.json``, ``model.safetensors``, ``README.md``) for
  ``timm.create_model('hf-hub:ORG/REPO')`` and ``timm.create_model('local-dir:DIR')``.
* :func:`push`: export to a folder, reload it through timm and compare outputs with the source model, then upload
  the folder as one commit with ``huggingface_hub``. The token comes from huggingface_hub's usual places
  (``HF_TOKEN``, ``hf auth login``); this module never reads, prints or logs it.
* :func:`check_entry`: a shipped checkpoint against its manifest entry (size, sha256, metadata, optionally the
  metric re-measured on the held-out split of the data set its recipe names, by the one measurement the data-set
  catalog fixes for that set's task).

Nothing here ever unpickles: weights are read with ``safetensors`` only.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ._version import __version__
from .data.catalog import DATASETS, dataset_of_recipe
from .outputs import atomic_copy, atomic_path, atomic_write_text
from .training.recipe import measure_checkpoint
from .weights import (  # save_weights ... update_manifest: re-exported, users import them from here
    ChecksumError, WeightsError, check_manifest_entry, check_state_dict, load_weights, read_metadata, save_weights,
    sha256_file, update_manifest, verify_checksum,
)

__all__ = ['save_weights', 'load_weights', 'read_metadata', 'update_manifest', 'WeightsError', 'ChecksumError',
           'check_state_dict', 'export', 'ExportResult', 'build_config', 'model_card', 'verify_export', 'push',
           'check_entry', 'render_card', 'write_cards', 'card_path', 'CONFIG_NAME', 'WEIGHTS_NAME', 'CARD_NAME']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'  # timm's HF_SAFE_WEIGHTS_NAME: what `hf-hub:` / `local-dir:` loading looks for
CARD_NAME = 'README.md'
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


# ----- resolving what to export --------------------------------------------------------------------------------
def _split(name_tag: str) -> Tuple[str, str]:
    name, _, tag = name_tag.partition('.')
    return name, tag


def _shipped_file(name_tag: str, entry: Optional[Mapping[str, Any]]) -> Optional[Path]:
    from ._resources import weights_dir
    if not entry or not entry.get('file'):
        return None
    try:
        p = weights_dir() / entry['file']
    except FileNotFoundError:
        return None
    return p if p.is_file() else None


@dataclass
class _Source:
    name: str
    tag: str
    model: torch.nn.Module
    weights: Path            # the safetensors file the model was loaded from
    entry: Dict[str, Any]    # manifest entry (or one made from the file's metadata)


def _load_source(name_tag: str, checkpoint=None, model_args: Optional[Mapping[str, Any]] = None) -> _Source:
    """Build ``name`` (with ``model_args`` over the catalog's) and load the tag's shipped weights (or
    ``checkpoint``), checked, in eval mode."""
    import timm

    from . import registry
    name, tag = _split(name_tag)
    cat = registry.get_entry(name)  # KeyError with the known names
    if checkpoint is None:
        if not tag:
            raise WeightsError(f"{name_tag}: nothing to export: give a pretrained tag ({sorted(cat.tags)}) or "
                               f"--checkpoint FILE")
        if tag not in cat.tags:
            raise WeightsError(f"{name_tag}: {name} has no tag {tag!r}; its tags: {sorted(cat.tags)}")
        entry = dict(registry.manifest_entry(name_tag) or {})
        path = _shipped_file(name_tag, entry)
        if path is None:
            raise WeightsError(f"{name_tag}: no local weights file (manifest entry: {entry.get('file')!r}); train it "
                               f"with `gequiv-timm train {name} --tag {tag} --out weights/{name_tag}.safetensors "
                               f"--manifest weights/manifest.json`, or pass --checkpoint FILE")
        verify_checksum(path, entry.get('sha256'), name_tag)
    else:
        path = Path(checkpoint)
        entry = dict(registry.manifest_entry(name_tag) or {}) if tag else {}
        if entry.get('sha256') and sha256_file(path) != entry['sha256']:
            entry = {}  # another file than the shipped one: the manifest's metrics do not describe it
    meta = read_metadata(path)
    if meta.get('architecture') and meta['architecture'] != name:
        raise WeightsError(f"{path}: weights are for {meta['architecture']!r}, not {name!r}")
    if not entry:
        try:
            metrics = json.loads(meta.get('metrics') or '{}')
        except json.JSONDecodeError:
            raise WeightsError(f"{path}: metadata 'metrics' is not JSON: {meta.get('metrics')!r}") from None
        entry = {'recipe': meta.get('recipe', ''), 'metrics': metrics if isinstance(metrics, dict) else {}}
    model = timm.create_model(name_tag if tag in cat.tags else name, pretrained=False, **dict(model_args or {}))
    load_weights(model, path, architecture=name)
    model.eval()
    return _Source(name, tag, model, path, entry)


# ----- config.json ---------------------------------------------------------------------------------------------


def build_config(model: torch.nn.Module, name: str, tag: str = '', entry: Optional[Mapping[str, Any]] = None
                 ) -> Dict[str, Any]:
    """timm's ``config.json`` for ``model`` (written by timm's own ``save_config_for_hf``).

    ``model_args`` holds the arguments the model was built with (its builder's, updated with the caller's;
    recorded by the build), so the Hub folder rebuilds the same network even if the builder's defaults change
    later; labels come from the training data of the recipe.
    """
    from timm.models._hub import save_config_for_hf

    from . import registry
    registry.get_entry(name)  # KeyError with the known names
    args = dict(getattr(model, '_model_args', {}))
    model_config: Dict[str, Any] = {'pretrained_cfg': {'architecture': name}}
    if tag:
        model_config['pretrained_cfg']['tag'] = tag
    ds = dataset_of_recipe((entry or {}).get('recipe', ''))  # the training data, from the data-set catalog
    labels = (entry or {}).get('label_names') or (ds.labels if ds is not None and ds.task == 'classify' else None)
    if labels and len(labels) == getattr(model, 'num_classes', None):
        model_config['label_names'] = list(labels)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / CONFIG_NAME
        save_config_for_hf(_ConfigView(model), str(p), model_config=model_config, model_args=args)
        cfg = json.loads(p.read_text())
    cfg['architecture'] = name
    cfg['gequiv_timm'] = {'version': __version__, 'tag': tag, 'recipe': (entry or {}).get('recipe', ''),
                          'task': _task(model)}
    return cfg


def _task(model) -> str:
    tag = getattr(model, 'pipeline_tag', None)  # a model that says its Hub task (segmentation networks)
    if isinstance(tag, str):
        return tag
    return 'keypoint-detection' if hasattr(model, 'num_keypoints') else 'image-classification'


class _ConfigView:
    """``model`` as timm's config writer sees it: heads without a pooled feature width (keypoint heatmaps) get
    ``num_features = None`` instead of an AttributeError."""

    def __init__(self, model):
        object.__setattr__(self, '_model', model)

    def __getattr__(self, key):
        model = object.__getattribute__(self, '_model')
        try:
            return getattr(model, key)
        except AttributeError:
            if key == 'num_features':
                return None
            raise


# ----- the model card -----------------------------------------------------------------------------------------
# BibTeX of the methods in the catalog, keyed by the arXiv id in the catalog's `paper_ids` / `paper`.
CITATIONS = {
    '1602.07576': """@inproceedings{cohen2016group,
  title     = {Group Equivariant Convolutional Networks},
  author    = {Cohen, Taco S. and Welling, Max},
  booktitle = {Proceedings of the 33rd International Conference on Machine Learning (ICML)},
  year      = {2016},
  eprint    = {1602.07576},
  archivePrefix = {arXiv}
}""",
    '1506.02025': """@inproceedings{jaderberg2015spatial,
  title     = {Spatial Transformer Networks},
  author    = {Jaderberg, Max and Simonyan, Karen and Zisserman, Andrew and Kavukcuoglu, Koray},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2015},
  eprint    = {1506.02025},
  archivePrefix = {arXiv}
}""",
    '1511.07356': """@inproceedings{honari2016recombinator,
  title     = {Recombinator Networks: Learning Coarse-to-Fine Feature Aggregation},
  author    = {Honari, Sina and Yosinski, Jason and Vincent, Pascal and Pal, Christopher},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2016},
  eprint    = {1511.07356},
  archivePrefix = {arXiv}
}""",
    '2001.09046': """@article{smets2023pde,
  title     = {PDE-based Group Equivariant Convolutional Neural Networks},
  author    = {Smets, Bart M. N. and Portegies, Jim and Bekkers, Erik J. and Duits, Remco},
  journal   = {Journal of Mathematical Imaging and Vision},
  year      = {2023},
  eprint    = {2001.09046},
  archivePrefix = {arXiv}
}""",
    '1911.08251': """@inproceedings{weiler2019general,
  title     = {General {E}(2)-Equivariant Steerable {CNN}s},
  author    = {Weiler, Maurice and Cesa, Gabriele},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2019},
  eprint    = {1911.08251},
  archivePrefix = {arXiv}
}""",
    '1711.07289': """@inproceedings{weiler2018learning,
  title     = {Learning Steerable Filters for Rotation Equivariant {CNN}s},
  author    = {Weiler, Maurice and Hamprecht, Fred A. and Storath, Martin},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2018},
  eprint    = {1711.07289},
  archivePrefix = {arXiv}
}""",
}
TIMM_CITATION = """@misc{rw2019timm,
  author       = {Wightman, Ross},
  title        = {PyTorch Image Models},
  year         = {2019},
  publisher    = {GitHub},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}},
  doi          = {10.5281/zenodo.4414861}
}"""


def _arxiv_ids(*texts: str) -> List[str]:
    import re
    out: List[str] = []
    for t in texts:
        for m in re.findall(r'(\d{4}\.\d{4,5})', t or ''):
            if m not in out:
                out.append(m)
    return out


RUN_KEYS = ('seed', 'epochs', 'steps', 'processes')


def _is_run_key(k: str) -> bool:
    """Metrics-dict keys that describe the run (seed, budget), not a measurement of the model."""
    return k in RUN_KEYS or 'seconds' in k


def _is_measure(k: str, v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_run_key(k)


def format_metric(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(name: str, tag: str, entry: Mapping[str, Any], config: Mapping[str, Any],
               repo_id: Optional[str] = None, weights_sha256: str = '', weights_size: int = 0,
               num_params: Optional[int] = None) -> str:
    """The ``README.md`` of a published checkpoint: front matter, metrics, recipe, usage, citations, licence.

    Written from the catalog entry (summary, paper) and the manifest entry (metrics, recipe, command, budget).
    """
    from . import registry
    cat = registry.get_entry(name)
    pcfg = config.get('pretrained_cfg', {})
    licence = pcfg.get('license', 'apache-2.0')
    name_tag = f"{name}.{tag}" if tag else name
    repo_id = repo_id or (registry.hub_id(name_tag) if tag else f"{registry.HUB_ORG}/{name}")
    recipe = entry.get('recipe', '')
    ds = dataset_of_recipe(recipe)  # the training data's catalog entry (None: an image folder)
    metrics = dict(entry.get('metrics') or {})
    task = config.get('gequiv_timm', {}).get('task', 'image-classification')
    lines = ['---', 'library_name: timm', f'license: {licence}', f'pipeline_tag: {task}', 'tags:']
    lines += [f'- {t}' for t in (task, 'timm', 'gequiv_timm', 'group-equivariant', 'safetensors')]
    if ds is not None and ds.hub_datasets:
        lines += ['datasets:'] + [f'- {d}' for d in ds.hub_datasets]
    lines += ['---', '', f'# Model card for {name_tag}', '', cat.summary + '.' if not cat.summary.endswith('.')
              else cat.summary, '']
    if pcfg.get('description'):
        lines += [pcfg['description'] + ('' if pcfg['description'].endswith('.') else '.'), '']
    lines += ['## Model details', '',
              f'- **Architecture:** `{name}` (gequiv_timm {__version__}; catalog `registry/{cat.source}`)',
              f'- **Pretrained tag:** `{tag or "-"}`',
              f'- **Model arguments:** `{json.dumps(config.get("model_args", {}), sort_keys=True)}`']
    if num_params is not None:
        lines.append(f'- **Parameters:** {num_params:,}')
    if pcfg.get('input_size'):
        lines.append(f'- **Input:** {"x".join(map(str, pcfg["input_size"]))}, mean {pcfg.get("mean")}, '
                     f'std {pcfg.get("std")}, classes {config.get("num_classes")}')
    if cat.paper:
        lines.append(f'- **Paper:** {cat.paper}')
    if ds is not None:
        lines.append(f'- **Data:** {ds.card}')
    if weights_sha256:
        lines.append(f'- **Weights:** `{WEIGHTS_NAME}`, {weights_size:,} bytes, sha256 `{weights_sha256}`')
    lines += ['', '## Metrics', '']
    scalars = {k: v for k, v in metrics.items() if _is_measure(k, v)}
    context = {k: v for k, v in metrics.items() if k not in scalars and not _is_run_key(k)}
    if scalars:
        lines += ['| metric | value |', '|---|---|'] + [f'| {k} | {format_metric(v)} |' for k, v in scalars.items()]
        if context:
            lines.append('')
            lines += [f"- **{k.replace('_', ' ').capitalize()}:** {v}" for k, v in context.items()]
    else:
        lines.append('No measured metrics were recorded for this checkpoint.')
    lines += ['', '## Training recipe', '']
    lines.append(f'- **Recipe id:** `{recipe or "unknown"}`')
    if entry.get('command'):
        lines.append(f"- **Command:** `{entry['command']}`")
    for k in metrics:
        if _is_run_key(k):
            lines.append(f"- **{k.replace('_', ' ').capitalize()}:** {metrics[k]}")
    if entry.get('budget'):
        lines.append(f"- **Budget:** {entry['budget']}")
    lines += ['', '## Usage', '', '```bash', "pip install gequiv_timm", '```', '', '```python',
              'import timm', 'import torch', 'import gequiv_timm  # registers the gequiv_ models with timm', '',
              f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
              "# or, with the weights that ship inside the package (no network):",
              f"# model = timm.create_model('{name_tag}', pretrained=True).eval()",
              'cfg = timm.data.resolve_data_config({}, model=model)',
              'x = torch.rand(1, *cfg["input_size"])  # images in [0, 1], as in training',
              'with torch.no_grad():',
              '    heatmaps = model(x)  # [1, keypoints, H, W]' if task == 'keypoint-detection'
              else '    probs = model(x).softmax(-1)', '```', '']
    lines += ['## Citation', '']
    ids = _arxiv_ids(pcfg.get('paper_ids', ''), cat.paper)
    cites = [CITATIONS[i] for i in ids if i in CITATIONS]
    if cat.paper and not cites:
        lines += [f'Cite the method: {cat.paper}.', '']
    for c in cites + [TIMM_CITATION]:
        lines += ['```bibtex', c, '```', '']
    lines += ['## Licence', '', f'The weights and code are released under the {licence} licence '
              '(https://www.apache.org/licenses/LICENSE-2.0).' if licence == 'apache-2.0'
              else f'The weights and code are released under the {licence} licence.']
    if ds is not None and 'mnist' in ds.hub_datasets:
        lines += ['', 'MNIST: Y. LeCun, C. Cortes and C. J. C. Burges, The MNIST database of handwritten digits.']
    return '\n'.join(lines).rstrip() + '\n'


# ----- export --------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    dir: Path
    name: str
    tag: str
    sha256: str
    size: int
    files: List[str] = field(default_factory=list)


def export(name_tag: str, out_dir, checkpoint=None, repo_id: Optional[str] = None, card_only: bool = False,
           model_args: Optional[Mapping[str, Any]] = None, _source: Optional[_Source] = None) -> ExportResult:
    """Write ``name[.tag]`` in the Hub layout to ``out_dir``: ``config.json``, ``model.safetensors``, ``README.md``.

    The weights file is the shipped (or given) safetensors file byte for byte when it already carries gequiv_timm
    metadata, so the Hub serves the same bytes as the manifest's sha256; otherwise it is rewritten with metadata.
    Files are written to temporary names and renamed, so an interrupted export never leaves a half-written file.
    """
    src = _source or _load_source(name_tag, checkpoint, model_args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(src.weights)
    weights_out = out / WEIGHTS_NAME
    files = []
    if card_only:
        sha, size = sha256_file(src.weights), src.weights.stat().st_size
    else:
        # atomic (gequiv_timm.outputs): a full disk or a kill leaves no half-written file behind, and a failed
        # write is one OutputWriteError naming the file
        if meta.get('architecture') == src.name and meta.get('gequiv_timm_version') and \
                meta.get('tag', '') == src.tag:
            atomic_copy(src.weights, weights_out, 'DIR')
        else:
            with atomic_path(weights_out, 'DIR') as tmp:
                save_weights(src.model, tmp, src.name, src.tag, src.entry.get('recipe', ''),
                             extra={'metrics': src.entry['metrics']} if src.entry.get('metrics') else None)
        sha, size = sha256_file(weights_out), weights_out.stat().st_size
        files.append(WEIGHTS_NAME)
    config = build_config(src.model, src.name, src.tag, src.entry)
    card = model_card(src.name, src.tag, src.entry, config, repo_id=repo_id, weights_sha256=sha,
                      weights_size=size, num_params=sum(p.numel() for p in src.model.parameters()))
    for fname, text in ((CONFIG_NAME, json.dumps(config, indent=2) + '\n'), (CARD_NAME, card)):
        if card_only and fname != CARD_NAME:
            continue
        atomic_write_text(out / fname, text, 'DIR')
        files.append(fname)
    return ExportResult(out, src.name, src.tag, sha, size, sorted(files))


@torch.no_grad()
def verify_export(folder, model: torch.nn.Module, batch: int = 4, seed: int = 0) -> float:
    """Rebuild ``folder`` through timm (``local-dir:``) and compare with ``model``; returns the max output diff.

    Raises :class:`WeightsError` when a tensor of the state dict differs or the outputs are not identical.
    """
    import timm
    folder = Path(folder)
    reloaded = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).eval()
    a, b = model.state_dict(), reloaded.state_dict()
    check_state_dict(b, model, folder / WEIGHTS_NAME)
    differ = sorted(k for k in a if not torch.equal(a[k].cpu(), b[k].cpu()))
    if differ:
        raise WeightsError(f"{folder}: reloaded weights differ from the source model in {differ}")
    in_size = tuple(reloaded.pretrained_cfg.get('input_size') or (getattr(model, 'in_chans', 3), 224, 224))
    x = torch.rand((batch, *in_size), generator=torch.Generator().manual_seed(seed))
    model.eval()
    from torch.utils._pytree import tree_flatten
    ya, yb = tree_flatten(model(x))[0], tree_flatten(reloaded(x))[0]
    shapes_a = [tuple(t.shape) for t in ya if torch.is_tensor(t)]
    shapes_b = [tuple(t.shape) for t in yb if torch.is_tensor(t)]
    if shapes_a != shapes_b or not shapes_a:
        raise WeightsError(f"{folder}: reloaded model gives outputs of shapes {shapes_b}, source {shapes_a}")
    diff = max((a - b).abs().max().item() for a, b in zip(ya, yb) if torch.is_tensor(a))
    if diff != 0.0:
        raise WeightsError(f"{folder}: reloaded model's outputs differ from the source model's by {diff:.3g}")
    return diff


# ----- push ----------------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    export: ExportResult
    commit_url: Optional[str] = None
    commit_oid: Optional[str] = None
    dry_run: bool = False


class PushError(RuntimeError):
    """The upload failed; the message says where the verified export was kept and how to retry."""


def push(name_tag: str, repo_id: str, private: bool = False, dry_run: bool = False, checkpoint=None,
         export_dir=None, commit_message: Optional[str] = None, endpoint: Optional[str] = None,
         model_args: Optional[Mapping[str, Any]] = None, log=print) -> PushResult:
    """Export ``name_tag``, verify the export through timm, then upload it to ``repo_id`` as one commit.

    ``export_dir`` (default: a new temporary folder) holds the export; on success a temporary folder is removed,
    on failure it is kept and the error says how to retry. ``dry_run`` stops after the verification and contacts
    nobody. The token is huggingface_hub's (``HF_TOKEN`` or the saved login); it is never printed.
    """
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"push: --repo must be ORG/NAME, got {repo_id!r}")
    src = _load_source(name_tag, checkpoint, model_args)
    keep = export_dir is not None
    folder = Path(export_dir) if keep else Path(tempfile.mkdtemp(prefix=f'gequiv-push-{src.name}-'))
    try:
        res = export(name_tag, folder, repo_id=repo_id, _source=src)
        verify_export(folder, src.model)
    except BaseException:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    log(f"exported and verified {name_tag} in {folder}: {', '.join(res.files)} "
        f"(model.safetensors sha256={res.sha256}, {res.size:,} bytes)")
    if dry_run:
        log(f"dry run: would create {'private ' if private else ''}repo {repo_id} (if needed) and upload "
            f"{', '.join(res.files)} in one commit")
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        return PushResult(repo_id, res, dry_run=True)
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(endpoint=endpoint, library_name='gequiv_timm', library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in EXPORT_FILES]
        info = api.create_commit(url.repo_id, ops, repo_type='model',
                                 commit_message=commit_message or f"Upload {name_tag} (gequiv_timm {__version__})",
                                 commit_description=f"model.safetensors sha256 {res.sha256}")
    except Exception as e:  # keep the export, say how to retry; never echo request headers (token)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        keep_note = (f"the verified export is kept in {folder}; retry with `gequiv-timm push {name_tag} --repo "
                     f"{repo_id} --export-dir {folder}`")
        raise PushError(f"push to {repo_id} failed ({type(e).__name__}: {msg}); {keep_note}. If the error is "
                        f"401/403, log in with `hf auth login` or set HF_TOKEN.") from e
    log(f"uploaded {name_tag} to {repo_id}: {info.commit_url}")
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return PushResult(repo_id, res, commit_url=info.commit_url, commit_oid=info.oid)


# ----- check ---------------------------------------------------------------------------------------------------
def check_entry(name_tag: str, entry: Mapping[str, Any], folder=None, metrics: bool = False,
                tolerance: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """Check a manifest entry against its file: size, sha256, metadata; with ``metrics`` re-measure the metrics.

    The metrics are re-measured by :func:`gequiv_timm.training.measure_checkpoint` on the held-out split of the
    built-in data set the entry's recipe names (its catalog entry fixes the task and the metric) and compared with
    the manifest's values within ``tolerance`` (default: two examples of the evaluated split, ``2 / n``, for an
    error rate; ``1e-3`` relative otherwise). Nothing in the manifest names code to run: an entry's fields come
    from a fixed table (:data:`gequiv_timm.weights.MANIFEST_FIELDS`) and a field such as ``evaluator`` is an
    error. Raises :class:`WeightsError` /
    :class:`ChecksumError` naming the file; returns ``{'measured': {...}, 'file': path}``.
    """
    import timm

    from ._resources import weights_dir
    check_manifest_entry(name_tag, dict(entry), 'manifest')  # data only: a field naming code ('evaluator') is an error
    folder = Path(folder) if folder is not None else weights_dir()
    if not entry.get('file'):
        raise WeightsError(f"manifest entry {name_tag}: no 'file' field")
    path = folder / entry['file']
    if not path.is_file():
        raise WeightsError(f"{path}: listed in the manifest for {name_tag} but missing")
    if entry.get('size') is not None and path.stat().st_size != entry['size']:
        raise ChecksumError(f"{path}: size {path.stat().st_size} does not match the manifest's {entry['size']} for "
                            f"{name_tag}; the file is truncated or was replaced")
    verify_checksum(path, entry.get('sha256'), name_tag)
    meta = read_metadata(path)
    name, tag = _split(name_tag)
    if meta.get('architecture') != name:
        raise WeightsError(f"{path}: metadata says architecture {meta.get('architecture')!r}, manifest key {name_tag}")
    if tag and meta.get('tag') not in ('', tag):
        raise WeightsError(f"{path}: metadata says tag {meta.get('tag')!r}, manifest key {name_tag}")
    out: Dict[str, Any] = {'file': str(path), 'measured': {}}
    if not metrics:
        return out
    if dataset_of_recipe(entry.get('recipe', '')) is None:
        raise WeightsError(f"manifest entry {name_tag}: recipe {entry.get('recipe')!r} names no built-in data set "
                           f"({', '.join(DATASETS)}), so there is nothing to re-measure its metrics on; check it "
                           f"without --metrics")
    model = timm.create_model(name_tag, pretrained=True, pretrained_cfg_overlay={'file': str(path)}).eval()
    measured = measure_checkpoint(model, dict(entry))
    out['measured'] = measured
    expected = entry.get('metrics') or {}
    problems = []
    for k, v in expected.items():
        if not _is_measure(k, v):
            continue
        if k not in measured:
            problems.append(f"{k}: not re-measurable on the recipe's data set (measured: {sorted(measured)})")
            continue
        tol = (tolerance or {}).get(k)
        if tol is None:
            n = measured.get('n') or measured.get(k + '_n')
            tol = 2.0 / n if ('error' in k or 'acc' in k) and n else 1e-3 * max(1.0, abs(v))
        if not math.isfinite(measured[k]) or abs(measured[k] - v) > tol + 1e-12:
            problems.append(f"{k}: measured {measured[k]:.6g}, manifest {v:.6g} (tolerance {tol:.3g})")
    if problems:
        raise WeightsError(f"{path}: metrics do not reproduce for {name_tag}: " + '; '.join(problems))
    return out


def card_path(name_tag: str, folder=None) -> Path:
    from ._resources import weights_dir
    return Path(folder if folder is not None else weights_dir() / 'cards') / f'{name_tag}.md'


def render_card(name_tag: str) -> str:
    """The model card of a shipped ``name.tag`` (catalog + manifest), as ``export`` writes it to README.md."""
    with tempfile.TemporaryDirectory() as tmp:
        export(name_tag, tmp, card_only=True)
        return (Path(tmp) / CARD_NAME).read_text(encoding='utf-8')


def write_cards(names: Optional[Sequence[str]] = None, folder=None) -> List[Path]:
    """Write ``weights/cards/<name>.<tag>.md`` for the shipped tags (default: every manifest entry with a file)."""
    from . import registry
    man = registry.manifest()
    names = list(names) if names else sorted(k for k, e in man.items() if _shipped_file(k, e) is not None)
    out = []
    for n in names:
        p = card_path(n, folder)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, render_card(n), 'model card')  # a crash leaves the old card or the new one
        out.append(p)
    return out


def default_repo(name_tag: str) -> Optional[str]:
    """Where ``push`` uploads a registered tag by default: the tag's ``hf_hub_id`` when it is ours
    (:func:`gequiv_timm.registry.hub_id`); None for a tag that loads someone else's checkpoint (a stem model's
    backbone on timm's repo) or no tag."""
    import timm

    from . import registry
    name, tag = _split(name_tag)
    cfg = timm.models.get_pretrained_cfg(name_tag) if tag else None
    own = registry.hub_id(name_tag) if tag else None
    return own if cfg is not None and cfg.hf_hub_id == own else None
