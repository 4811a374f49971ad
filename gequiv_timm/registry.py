"""The model catalog (``registry/*.toml``): what is data about each model.

Each TOML file in ``registry/`` holds one family. Every top-level table is one model::

    [gequiv_p4cnn]
    family = "gcnn"                  # the module whose builder registers it: gequiv_timm.models.gcnn
    summary = "P4CNN of Cohen & Welling (2016) for rotated MNIST"
    paper = "Cohen & Welling, Group Equivariant Convolutional Networks, ICML 2016"   # optional
    requires = []                    # optional: extras needed (e.g. ["escnn"])
    symmetry = {group = "p4", claim = "invariant"}   # optional: the claimed symmetry, checked against the
                                     # measurement (gequiv_timm.symmetry, tests/test_symmetry.py); a C_N / D_N
                                     # classifier adds approx = "c8" (its larger group, exact only on p4 / p4m:
                                     # the figure at the other rotations is measured, not claimed)

    [gequiv_p4cnn.tags.rotmnist]     # pretrained tags, the first one is the default; any PretrainedCfg field
    description = "Trained on rotated MNIST ..."   # of that checkpoint

The recipe itself is code, as in timm: the model's arguments are set by its visible builder
``@register_model def gequiv_p4cnn(pretrained=False, **kwargs)`` at the bottom of its family module, and its
PretrainedCfg by that module's ``default_cfgs = generate_default_cfgs(tagged_cfgs({...}))`` (:func:`tagged_cfgs`
adds the catalog's tags, paper and the shipped weights file to the family's own cfgs).

A tag's weights file, checksum and metrics live in ``weights/manifest.json`` under ``"name.tag"``. When the
file is present locally it is what ``pretrained=True`` loads (no network needed); otherwise the tag's
``hf_hub_id``: the repo its cfg names (a stem model's backbone checkpoint on timm's repo), else ours,
:func:`hub_id` = ``HUB_ORG/name.tag`` (the one place the organisation is written). A repo the manifest lists
(:func:`hub_repos`) must serve the manifest's bytes, whichever way it is reached.

A broken manifest (truncated, not JSON, an entry outside the fixed table of fields) does not break ``import
gequiv_timm``: the models register without its data, and everything that needs it (pretrained loading of a tag,
``gequiv-timm check``) raises one error naming the file; :func:`manifest_problem` says what is wrong.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._resources import registry_dir, weights_dir
from .weights import WeightsError, read_manifest

__all__ = ['CatalogError', 'CatalogEntry', 'load_catalog', 'load_manifest', 'tagged_cfgs', 'get_entry',
           'catalog', 'manifest', 'manifest_entry', 'manifest_problem', 'hub_repos', 'EXTRAS', 'HUB_ORG', 'hub_id']

PREFIX = 'gequiv_'
#: the Hugging Face organisation of every checkpoint gequiv_timm publishes: ``HUB_ORG/name.tag``
HUB_ORG = 'gequiv-timm'
# extra name -> python module that must be importable
EXTRAS = {'escnn': 'escnn'}
_ENTRY_KEYS = {'family', 'summary', 'paper', 'requires', 'symmetry', 'tags'}
# fields that used to be data here and are now the builder's (gequiv_timm/models/<family>.py)
_CODE_KEYS = {'args', 'cfg'}
# what a model can claim in its `symmetry` field (gequiv_timm.symmetry measures it)
SYMMETRY_CLAIMS = ('invariant', 'equivariant', 'equivariant stem', 'none')


class CatalogError(ValueError):
    """A malformed catalog entry; the message names the file, the entry and the field."""


@dataclass
class CatalogEntry:
    name: str
    family: str
    summary: str
    source: str
    paper: str = ''
    requires: List[str] = field(default_factory=list)
    symmetry: Dict[str, str] = field(default_factory=dict)
    tags: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f'gequiv_timm.models.{self.family}'

    def missing_extras(self) -> List[str]:
        return [r for r in self.requires if importlib.util.find_spec(EXTRAS.get(r, r)) is None]


def _cfg_fields() -> set:
    from timm.models import PretrainedCfg
    return {f.name for f in dataclasses.fields(PretrainedCfg)}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_cfg_values(cfg: Dict[str, Any], where: str) -> None:
    """Type-check the PretrainedCfg values timm relies on, so a bad catalog fails at load, not at create time."""
    size = cfg.get('input_size')
    if size is not None:
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v > 0 for v in size)):
            raise CatalogError(f"{where}: input_size must be [channels, height, width] positive ints, got {size!r}")
    for key in ('mean', 'std'):
        v = cfg.get(key)
        if v is None:
            continue
        if not (isinstance(v, list) and v and all(_is_num(x) for x in v)):
            raise CatalogError(f"{where}: {key} must be a list of numbers, got {v!r}")
        if size is not None and len(v) != size[0]:
            raise CatalogError(f"{where}: {key} has {len(v)} values but input_size has {size[0]} channels")
        if key == 'std' and any(x <= 0 for x in v):
            raise CatalogError(f"{where}: std must be positive, got {v!r}")
    nc = cfg.get('num_classes')
    if nc is not None and not (isinstance(nc, int) and not isinstance(nc, bool) and nc >= 0):
        raise CatalogError(f"{where}: num_classes must be an int >= 0, got {nc!r}")
    cp = cfg.get('crop_pct')
    if cp is not None and not (_is_num(cp) and 0 < cp <= 1):
        raise CatalogError(f"{where}: crop_pct must be a number in (0, 1], got {cp!r}")


def _check_symmetry(sym: Any, where: str) -> Dict[str, str]:
    """The ``symmetry`` field: ``{group = "p4" | "p4m", claim = one of SYMMETRY_CLAIMS}`` (group optional for
    ``claim = "none"``), and for an invariant C_N / D_N classifier ``approx = "cN" | "dN"``: N a multiple of 4 above
    4, mirrors iff the group is p4m (its quarter turns and mirrors are the claimed group; its other rotations are
    measured)."""
    if not isinstance(sym, dict):
        raise CatalogError(f"{where}: field 'symmetry' must be a table like {{group = \"p4\", claim = \"invariant\"}}")
    bad = set(sym) - {'group', 'claim', 'approx'}
    if bad:
        raise CatalogError(f"{where}: field 'symmetry' has unknown key(s) {sorted(bad)}; allowed: ['approx', "
                           f"'claim', 'group']")
    if not sym:
        return {}
    claim = sym.get('claim')
    if claim not in SYMMETRY_CLAIMS:
        raise CatalogError(f"{where}: field 'symmetry.claim' must be one of {list(SYMMETRY_CLAIMS)}, got {claim!r}")
    group = sym.get('group')
    if group is None and claim != 'none':
        raise CatalogError(f"{where}: field 'symmetry' claims {claim!r} but names no group; add group = \"p4\" or "
                           f"\"p4m\"")
    if group is not None and group not in ('p4', 'p4m'):
        raise CatalogError(f"{where}: field 'symmetry.group' must be 'p4' or 'p4m' (the groups that act exactly on "
                           f"the pixel grid), got {group!r}")
    approx = sym.get('approx')
    if approx is not None:
        m = re.fullmatch(r'([cd])(\d+)', str(approx))
        want = 'd' if group == 'p4m' else 'c'
        if claim != 'invariant' or m is None or m.group(1) != want or int(m.group(2)) % 4 or int(m.group(2)) <= 4:
            raise CatalogError(f"{where}: field 'symmetry.approx' names the larger group of an invariant classifier "
                               f"whose quarter turns{' and mirrors' if want == 'd' else ''} are the claimed "
                               f"{group or 'group'}: '{want}N' with N a multiple of 4 above 4 (e.g. '{want}8'), "
                               f"with claim = \"invariant\"; got approx = {approx!r}, claim = {claim!r}")
    return dict(sym)


def _parse_entry(name: str, raw: Any, source: str, cfg_fields: set) -> CatalogEntry:
    where = f"{source}: entry [{name}]"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a table, got {type(raw).__name__}")
    if not name.startswith(PREFIX):
        raise CatalogError(f"{where}: model names must start with {PREFIX!r}")
    if not name.isidentifier():
        raise CatalogError(f"{where}: the name must be a python identifier (letters, digits, underscores)")
    code = set(raw) & _CODE_KEYS
    if code:
        raise CatalogError(f"{where}: field(s) {sorted(code)} are not catalog data: a model's arguments and its "
                           f"PretrainedCfg are set by its builder (def {name}(pretrained=False, **kwargs) and "
                           f"default_cfgs in gequiv_timm/models/<family>.py); keep summary, paper, requires, "
                           f"symmetry and tags here")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
    for key in ('family', 'summary'):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            raise CatalogError(f"{where}: field {key!r} is required and must be a non-empty string")
    if not raw['family'].isidentifier():
        raise CatalogError(f"{where}: field 'family' must name a module in gequiv_timm/models, got {raw['family']!r}")
    if not isinstance(raw.get('paper', ''), str):
        raise CatalogError(f"{where}: field 'paper' must be a string")
    requires = raw.get('requires', [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise CatalogError(f"{where}: field 'requires' must be a list of extra names")
    unknown_extras = [r for r in requires if r not in EXTRAS]
    if unknown_extras:
        raise CatalogError(f"{where}: field 'requires' names unknown extra(s) {unknown_extras}; "
                           f"known extras: {sorted(EXTRAS)}")
    symmetry = _check_symmetry(raw.get('symmetry', {}), where)
    if not isinstance(raw.get('tags', {}), dict):
        raise CatalogError(f"{where}: field 'tags' must be a table")
    tags = {}
    for tag, tcfg in raw.get('tags', {}).items():
        if not isinstance(tcfg, dict):
            raise CatalogError(f"{where}: field 'tags.{tag}' must be a table")
        if not tag or not all(c.isascii() and (c.isalnum() or c in '_-') for c in tag):
            raise CatalogError(f"{where}: tag {tag!r} must be ASCII letters, digits, '_' or '-'")
        bad = set(tcfg) - cfg_fields
        if bad:
            raise CatalogError(f"{where}: field 'tags.{tag}' has key(s) {sorted(bad)} unknown to PretrainedCfg")
        _check_cfg_values(tcfg, f"{where}: field 'tags.{tag}'")
        tags[tag] = dict(tcfg)
    return CatalogEntry(name=name, family=raw['family'], summary=raw['summary'], source=source,
                        paper=raw.get('paper', ''), requires=list(requires), symmetry=symmetry, tags=tags)


def load_catalog(path: Optional[Path] = None) -> Dict[str, CatalogEntry]:
    """Read and validate every ``*.toml`` in the catalog folder; raise :class:`CatalogError` on a bad entry."""
    folder = Path(path) if path is not None else registry_dir()
    cfg_fields = _cfg_fields()
    entries: Dict[str, CatalogEntry] = {}
    files = sorted(folder.glob('*.toml'))
    if not files:
        raise CatalogError(f"no catalog files (*.toml) in {folder}")
    for f in files:
        try:
            data = tomllib.loads(f.read_text(encoding='utf-8'))
        except tomllib.TOMLDecodeError as e:
            raise CatalogError(f"{f.name}: not valid TOML: {e}") from None
        for name, raw in data.items():
            if name in entries:
                raise CatalogError(f"{f.name}: entry [{name}] is already defined in {entries[name].source}")
            entries[name] = _parse_entry(name, raw, f.name, cfg_fields)
    return entries


def load_manifest(path: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """The weights manifest (``weights/manifest.json``): ``{"name.tag": {file, sha256, size, metrics, ...}}``."""
    return read_manifest(Path(path) if path is not None else weights_dir() / 'manifest.json')


_CATALOG: Optional[Dict[str, CatalogEntry]] = None
_MANIFEST: Optional[Dict[str, Dict[str, Any]]] = None
_MANIFEST_ERROR: Optional[WeightsError] = None


def catalog() -> Dict[str, CatalogEntry]:
    global _CATALOG
    if _CATALOG is None:
        _CATALOG = load_catalog()
    return _CATALOG


def _read_package_manifest() -> None:
    global _MANIFEST, _MANIFEST_ERROR
    if _MANIFEST is None and _MANIFEST_ERROR is None:
        try:
            _MANIFEST = load_manifest()
        except WeightsError as e:
            _MANIFEST_ERROR = e
        except FileNotFoundError as e:  # no weights/ folder: the installation is broken
            _MANIFEST_ERROR = WeightsError(str(e))


def manifest(strict: bool = True) -> Dict[str, Dict[str, Any]]:
    """The package's weights manifest (read once). A broken one (truncated, not JSON, a bad entry) raises
    :class:`~gequiv_timm.weights.WeightsError` naming the file on every call; with ``strict=False`` it reads as
    empty instead (for the model registration at import and ``gequiv-timm list``, which then say it is broken:
    :func:`manifest_problem`)."""
    _read_package_manifest()
    if _MANIFEST_ERROR is not None:
        if strict:
            raise WeightsError(str(_MANIFEST_ERROR))
        return {}
    return _MANIFEST


def manifest_problem() -> Optional[str]:
    """Why the package manifest cannot be used (the message names the file), or None when it is fine."""
    _read_package_manifest()
    return None if _MANIFEST_ERROR is None else str(_MANIFEST_ERROR)


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry of ``name`` (with or without a ``.tag``)."""
    base = name.split('.', 1)[0]
    try:
        return catalog()[base]
    except KeyError:
        raise KeyError(f"{base!r} is not in the gequiv_timm catalog; known: {sorted(catalog())}") from None


def manifest_entry(name_tag: str) -> Optional[Dict[str, Any]]:
    """The manifest entry of ``name.tag`` (None when it has none); raises naming the file when the manifest is
    broken."""
    return manifest().get(name_tag)


def hub_repos() -> Dict[str, str]:
    """``{repo id (lower case): 'name.tag'}`` of every manifest entry with a sha256: the Hub repos whose
    ``model.safetensors`` must be the manifest's bytes, whichever way they are reached (a tag's default, or
    ``timm.create_model('hf-hub:...')``). Raises naming the file when the manifest is broken."""
    return {hub_id(k).lower(): k for k, e in manifest().items() if e.get('sha256')}


def hub_id(name_tag: str) -> str:
    """The Hub repo of our published checkpoint ``name.tag``: ``gequiv-timm/name.tag``.

    >>> hub_id('gequiv_p4cnn.rotmnist')
    'gequiv-timm/gequiv_p4cnn.rotmnist'
    """
    name, _, tag = name_tag.partition('.')
    if not name or not tag:
        raise ValueError(f"hub_id: expected 'name.tag', got {name_tag!r}")
    return f'{HUB_ORG}/{name_tag}'


def _to_cfg_value(v):
    return tuple(v) if isinstance(v, list) else v


def tagged_cfgs(cfgs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """A family's cfgs with the catalog's data added, for ``generate_default_cfgs``.

    ``cfgs`` maps a model name to its PretrainedCfg dict (the family's ``_cfg(...)``), or to a function
    ``tag -> dict`` when the cfg depends on the tag (a stem model takes the cfg of the backbone checkpoint the tag
    names). Returns ``{'name.tag': cfg}`` for each of the catalog's tags of ``name`` (``{'name': cfg}`` when it has
    none), each with the catalog's paper (``paper_name``), the tag's fields (``description``, ...), the tag's
    ``hf_hub_id`` when the family's cfg names none (:func:`hub_id`: ours) and, when the manifest lists a shipped
    file that is present, its path (``file``). Raises
    :class:`CatalogError` for a name the catalog does not have.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        if name not in catalog():
            raise CatalogError(f"the builder {name} has no catalog entry; add [{name}] (summary, paper, symmetry, "
                               f"tags) to the family's registry/*.toml")
        entry = catalog()[name]
        for tag in (entry.tags or {'': {}}):
            base = dict(cfg(tag) if callable(cfg) else cfg)
            base.setdefault('license', 'apache-2.0')
            if entry.paper:
                base.setdefault('paper_name', entry.paper)
            base.update({k: _to_cfg_value(v) for k, v in entry.tags.get(tag, {}).items()})
            if tag:
                base.setdefault('hf_hub_id', hub_id(f'{name}.{tag}'))
            m = manifest(strict=False).get(f'{name}.{tag}') if tag else None  # broken: said when it is used
            if m and m.get('file'):
                try:
                    f = weights_dir() / m['file']
                except FileNotFoundError:
                    f = None
                if f is not None and f.exists():
                    base['file'] = str(f)
            out[f'{name}.{tag}' if tag else name] = base
    return out
