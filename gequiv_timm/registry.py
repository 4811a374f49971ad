"""The model catalog (``registry/*.toml``) and its registration with timm.

Each TOML file in ``registry/`` holds one family. Every top-level table is one model::

    [gequiv_p4cnn]
    family = "gcnn"                  # recipe module: gequiv_timm.models.gcnn, which provides _create()
    summary = "P4CNN of Cohen & Welling (2016) for rotated MNIST"
    paper = "Cohen & Welling, Group Equivariant Convolutional Networks, ICML 2016"   # optional
    requires = []                    # optional: extras needed (e.g. ["escnn"])
    symmetry = {group = "p4", claim = "invariant"}   # optional: the claimed symmetry, checked against the
                                     # measurement (gequiv_timm.symmetry, tests/test_symmetry.py)

    [gequiv_p4cnn.args]              # default keyword arguments of the model (users may override)
    group = "p4"

    [gequiv_p4cnn.cfg]               # timm PretrainedCfg fields shared by every tag
    input_size = [1, 28, 28]

    [gequiv_p4cnn.tags.rotmnist]     # pretrained tags, the first one is the default; PretrainedCfg overrides
    hf_hub_id = "gequiv-timm/gequiv_p4cnn.rotmnist"

A tag's weights file, checksum and metrics live in ``weights/manifest.json`` under ``"name.tag"``. When the
file is present locally it is what ``pretrained=True`` loads (no network needed); otherwise the tag's
``hf_hub_id`` is used.

:func:`register_all` (called on ``import gequiv_timm``) generates one builder ``fn(pretrained=False, **kwargs)``
per entry, publishes the family's ``default_cfgs`` and registers the builder with ``timm.models.register_model``.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._resources import registry_dir, weights_dir
from .weights import read_manifest

__all__ = ['CatalogError', 'CatalogEntry', 'load_catalog', 'load_manifest', 'register_all', 'get_entry',
           'catalog', 'manifest_entry', 'EXTRAS']

PREFIX = 'gequiv_'
# extra name -> python module that must be importable
EXTRAS = {'escnn': 'escnn'}
_ENTRY_KEYS = {'family', 'summary', 'paper', 'requires', 'symmetry', 'args', 'cfg', 'tags'}
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
    args: Dict[str, Any] = field(default_factory=dict)
    cfg: Dict[str, Any] = field(default_factory=dict)
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
    ``claim = "none"``)."""
    if not isinstance(sym, dict):
        raise CatalogError(f"{where}: field 'symmetry' must be a table like {{group = \"p4\", claim = \"invariant\"}}")
    bad = set(sym) - {'group', 'claim'}
    if bad:
        raise CatalogError(f"{where}: field 'symmetry' has unknown key(s) {sorted(bad)}; allowed: ['claim', 'group']")
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
    return dict(sym)


def _parse_entry(name: str, raw: Any, source: str, cfg_fields: set) -> CatalogEntry:
    where = f"{source}: entry [{name}]"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a table, got {type(raw).__name__}")
    if not name.startswith(PREFIX):
        raise CatalogError(f"{where}: model names must start with {PREFIX!r}")
    if not name.isidentifier():
        raise CatalogError(f"{where}: the name must be a python identifier (letters, digits, underscores)")
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
    for key in ('args', 'cfg', 'tags'):
        if not isinstance(raw.get(key, {}), dict):
            raise CatalogError(f"{where}: field {key!r} must be a table")
    cfg = dict(raw.get('cfg', {}))
    bad = set(cfg) - cfg_fields
    if bad:
        raise CatalogError(f"{where}: field 'cfg' has key(s) {sorted(bad)} that timm's PretrainedCfg does not "
                           f"know; put model settings in 'args'")
    _check_cfg_values(cfg, f"{where}: field 'cfg'")
    tags = {}
    for tag, tcfg in raw.get('tags', {}).items():
        if not isinstance(tcfg, dict):
            raise CatalogError(f"{where}: field 'tags.{tag}' must be a table")
        if not tag or not all(c.isascii() and (c.isalnum() or c in '_-') for c in tag):
            raise CatalogError(f"{where}: tag {tag!r} must be ASCII letters, digits, '_' or '-'")
        bad = set(tcfg) - cfg_fields
        if bad:
            raise CatalogError(f"{where}: field 'tags.{tag}' has key(s) {sorted(bad)} unknown to PretrainedCfg")
        _check_cfg_values({**cfg, **tcfg}, f"{where}: field 'tags.{tag}'")
        tags[tag] = dict(tcfg)
    return CatalogEntry(name=name, family=raw['family'], summary=raw['summary'], source=source,
                        paper=raw.get('paper', ''), requires=list(requires), symmetry=symmetry,
                        args=dict(raw.get('args', {})),
                        cfg=cfg, tags=tags)


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


def catalog() -> Dict[str, CatalogEntry]:
    global _CATALOG
    if _CATALOG is None:
        _CATALOG = load_catalog()
    return _CATALOG


def manifest() -> Dict[str, Dict[str, Any]]:
    global _MANIFEST
    if _MANIFEST is None:
        _MANIFEST = load_manifest()
    return _MANIFEST


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry of ``name`` (with or without a ``.tag``)."""
    base = name.split('.', 1)[0]
    try:
        return catalog()[base]
    except KeyError:
        raise KeyError(f"{base!r} is not in the gequiv_timm catalog; known: {sorted(catalog())}") from None


def manifest_entry(name_tag: str) -> Optional[Dict[str, Any]]:
    return manifest().get(name_tag)


def _to_cfg_value(v):
    return tuple(v) if isinstance(v, list) else v


def pretrained_cfgs(entry: CatalogEntry) -> Dict[str, Dict[str, Any]]:
    """``{'name.tag': cfg_dict}`` for every tag (``'name'`` alone when the entry has no tags)."""
    base = {'license': 'apache-2.0'}
    base.update({k: _to_cfg_value(v) for k, v in entry.cfg.items()})
    if entry.paper and 'paper_name' not in base:
        base['paper_name'] = entry.paper
    if not entry.tags:
        return {entry.name: base}
    out = {}
    for tag, over in entry.tags.items():
        cfg = dict(base)
        cfg.update({k: _to_cfg_value(v) for k, v in over.items()})
        m = manifest_entry(f'{entry.name}.{tag}')
        if m and m.get('file'):
            try:
                f = weights_dir() / m['file']
            except FileNotFoundError:
                f = None
            if f is not None and f.exists():
                cfg['file'] = str(f)
            if m.get('hf_hub_id') and 'hf_hub_id' not in over:
                cfg['hf_hub_id'] = m['hf_hub_id']
        out[f'{entry.name}.{tag}'] = cfg
    return out


def _make_builder(entry: CatalogEntry, module_name: str):
    def builder(pretrained: bool = False, **kwargs):
        missing = entry.missing_extras()
        if missing:
            extras = ','.join(missing)
            raise ImportError(f"{entry.name} needs the optional extra(s) {missing}: "
                              f"pip install 'gequiv_timm[{extras}]'")
        mod = importlib.import_module(module_name)
        args = dict(entry.args)
        args.update(kwargs)
        return mod._create(entry.name, pretrained=pretrained, **args)

    builder.__name__ = builder.__qualname__ = entry.name
    builder.__module__ = module_name
    builder.__doc__ = f"{entry.summary}\n\nCatalog: registry/{entry.source}. " + (
        f"Paper: {entry.paper}." if entry.paper else '')
    return builder


_REGISTERED: List[str] = []


def register_all() -> List[str]:
    """Register every catalog entry with timm (idempotent). Returns the registered names."""
    if _REGISTERED:
        return list(_REGISTERED)
    from timm.models import generate_default_cfgs, register_model
    by_family: Dict[str, List[CatalogEntry]] = {}
    for e in catalog().values():
        by_family.setdefault(e.family, []).append(e)
    for family, entries in by_family.items():
        module_name = f'gequiv_timm.models.{family}'
        try:
            mod = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                raise CatalogError(f"{entries[0].source}: family {family!r} has no module {module_name}") from None
            raise
        if not hasattr(mod, '_create'):
            raise CatalogError(f"{entries[0].source}: module {module_name} has no _create(variant, pretrained, ...)")
        cfgs = {}
        for e in entries:
            cfgs.update(pretrained_cfgs(e))
        default_cfgs = getattr(mod, 'default_cfgs', None)
        if default_cfgs is None:
            default_cfgs = {}
            mod.default_cfgs = default_cfgs
        default_cfgs.update(generate_default_cfgs(cfgs))
        for e in entries:
            fn = _make_builder(e, module_name)
            setattr(mod, e.name, fn)
            register_model(fn)
            _REGISTERED.append(e.name)
    return list(_REGISTERED)
