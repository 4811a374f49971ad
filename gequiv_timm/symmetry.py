"""Measured symmetry of the registered models: what holds, not what the prose says.

:func:`measure_symmetry` builds a model, turns and mirrors a random input by every element of a point group
(:class:`~gequiv_timm.layers.groups.Group`: its own ``transform_plane``, so the action is the layers' action) and
compares outputs. The result is one of

* ``'invariant'``: the logits do not change, to float rounding (classifiers);
* ``'equivariant'``: a dense output (keypoint heatmaps ``[B, K, H, W]``, or keypoint coordinates ``[B, K, 2]``)
  turns and mirrors with the input, to float rounding;
* ``'equivariant stem'``: the output does not, but the model's injected stem (``model._gequiv_stem``, see
  :func:`gequiv_timm.models.stems.inject_stem`) is equivariant, to float rounding: its output map turns with the
  input (pooled stems, planar PDE stems) or turns and permutes its group axis (folded stems);
* ``'none'``: neither.

How (every choice is recorded in the report):

* **float64**, eval mode, seed 0; a batch of two ``N(0, 1)`` images.
* **Generic weights.** Every parameter gets Gaussian noise of 10% of its RMS (0.1 for an all-zero tensor) on top
  of its initialisation. timm zero-initialises some layers (the last norm of every residual block, some
  classifiers, an STN's regression layer), which would hide what they do to the symmetry; a symmetry of the
  architecture holds for every weight value, so it must hold at a random one.
* **A size at which the group acts exactly on the sampling grids**: the catalog's input size when it is at most
  64 (28, 32, 42, 64), otherwise the smallest multiple of the network's total reduction that is at least 64 (or its
  ``min_input_size``). A model that knows its exact sizes (``exact_input_sizes(h, w)``) gets the first such size
  from there on.
* **The figure** is the relative error ``max_g ||f(g x) - g f(x)|| / ||f(x) - f(x')||``: how far a turn or mirror
  moves the output, measured against how far it moves between the two different images ``x, x'`` of the batch
  (Frobenius norms; ``g f(x) = f(x)`` for logits). Dividing by that spread rather than by ``||f(x)||`` keeps a
  constant part of the output (a classifier bias, the image centre for coordinates) from hiding a change. The
  identity element is included, so a non-deterministic model cannot pass.
* **The threshold** is :data:`THRESHOLD` ``= 1e-4``: exact to float rounding, float32 included. Our layers
  compute in the input's dtype and measure 1e-15..1e-13 in float64. escnn samples its kernel bases in float32
  (``torch.tensor(points, dtype=torch.float32)`` in its basis expansion), so its models, though built exactly
  equivariant, measure 4e-7..1.4e-6 even in float64: float32 rounding, 70x below the threshold. Every model that
  is not exactly symmetric measures 0.4 or more (4000x above it).

**Approximate symmetry (C_N / D_N classifiers).** A C8 model is exactly invariant to quarter turns only: its
claim is ``'invariant'`` on ``p4`` (D8: ``p4m``), measured as above. Its catalog entry adds ``approx = "c8"``, and
the rotations of that group that do not map the pixel grid to itself (45 degrees, 135...) are measured on top and
stored as a figure, never as a class: pixels cannot be rotated by 45 degrees exactly, so the input is a smooth
random field (:class:`~gequiv_timm.layers.fields.RandomField`, wavelengths >= :data:`APPROX_WAVELENGTH` pixels,
sampled exactly at the rotated coordinates) inside a disc (a radial taper to zero at the border, which commutes
with every rotation), and the figure is the same relative change of the logits, ``max_g ||f(g x) - f(x)|| /
||f(x) - f(x')||`` over those rotations (``approx_error``; ``approx_per_element`` has every element of the larger
group, the exact ones included). For scale, a p4 model measured the same way (``approx='c8'``) is given by
``tests/test_symmetry.py``.

The claim each catalog entry makes (``symmetry = {group = "p4", claim = "invariant"}`` in ``registry/*.toml``) is
data; this module is the measurement. ``registry/symmetry.json`` stores the measured table that
``gequiv-timm list`` shows (``gequiv-timm list --measure --write`` regenerates it); ``tests/test_symmetry.py``
re-measures every model and fails when the table, a claim or a description disagrees with the measurement.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._resources import registry_dir
from .layers.fields import RandomField
from .layers.gconv import fold_group, unfold_group
from .layers.groups import Group, get_group
from .models.stems import stem_output
from .registry import SYMMETRY_CLAIMS

__all__ = ['CLASSES', 'THRESHOLD', 'TABLE_FILE', 'APPROX_WAVELENGTH', 'SymmetryReport', 'measure_symmetry',
           'measurement_size', 'claim_of', 'approx_of', 'load_table', 'write_table', 'table_problems',
           'summary_problems', 'format_report']

CLASSES = SYMMETRY_CLAIMS  # 'invariant', 'equivariant', 'equivariant stem', 'none'
THRESHOLD = 1e-4
NOISE = 0.1
TABLE_FILE = 'symmetry.json'
DEFAULT_GROUP = 'p4m'  # what a model that claims nothing is measured against: every symmetry of the pixel grid
APPROX_WAVELENGTH = 8.0  # shortest wavelength (pixels) of the smooth inputs of the approximate measurement
APPROX_TAPER = 4.0  # width (pixels) of the disc's cosine edge


@dataclass
class SymmetryReport:
    """One measurement. ``error`` is the output's relative error (max over the group), ``stem_error`` the
    injected stem's (``None`` when the model has no injected stem); ``per_element`` the output error per group
    element (index ``h`` = the group's element ``h``). ``approx_group`` / ``approx_error`` /
    ``approx_per_element``: the approximate measurement on the larger C_N / D_N group (``None`` when not asked;
    module docstring)."""

    name: str
    group: str
    cls: str
    output: str
    error: float
    stem_error: Optional[float]
    per_element: List[float]
    input_size: List[int]
    claim: Optional[str] = None
    dtype: str = 'float64'
    seed: int = 0
    seconds: float = 0.0
    approx_group: Optional[str] = None
    approx_error: Optional[float] = None
    approx_per_element: Optional[List[float]] = None

    _STORED = ('cls', 'group', 'error', 'stem_error', 'output', 'input_size', 'dtype', 'seed', 'per_element')
    _APPROX = ('approx_group', 'approx_error', 'approx_per_element')

    def to_dict(self) -> Dict[str, Any]:
        """What the stored table keeps (the claim lives in the catalog, the timing is not a property); the approximate
        figures only where they were measured."""
        d = {('class' if k == 'cls' else k): getattr(self, k) for k in self._STORED}
        if self.approx_group is not None:
            d.update({k: getattr(self, k) for k in self._APPROX})
        return d

    @classmethod
    def from_dict(cls, name: str, d: Dict[str, Any]) -> 'SymmetryReport':
        d = dict(d)
        d['cls'] = d.pop('class')
        return cls(name=name, **d)


# ----------------------------------------------------------------------------------------------------------------
# the group's action on outputs
# ----------------------------------------------------------------------------------------------------------------
def _point_map(group: Group, g: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` with ``g . (x, y) = A (x, y) + b`` for pixel coordinates (pixel centres at integers, column x,
    row y) of a ``size x size`` image, read off ``group.transform_plane`` applied to an image of pixel indices."""
    idx = torch.arange(size * size, dtype=torch.float64).view(size, size)
    moved = group.transform_plane(idx, g)

    def where(r: int, c: int) -> torch.Tensor:  # (x, y) where source pixel (row r, col c) lands
        rr, cc = (moved == r * size + c).nonzero()[0].tolist()
        return torch.tensor([cc, rr], dtype=torch.float64)

    o = where(0, 0)
    ax, ay = where(0, 1) - o, where(1, 0) - o
    return torch.stack([ax, ay], 1), o


def _act_output(y: torch.Tensor, group: Group, g: int, kind: str, size: int) -> torch.Tensor:
    if kind == 'logits':
        return y
    if kind == 'heatmaps':
        return group.transform_plane(y, g)
    a, b = _point_map(group, g, size)  # coordinates [B, K, 2] in input pixels
    return y @ a.to(y).T + b.to(y)


def _output_kind(y: Any) -> str:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"measure_symmetry: the model returned {type(y).__name__}; expected a tensor (logits "
                        f"[B, N], dense maps [B, K, H, W] or keypoint coordinates [B, K, 2])")
    if y.dim() == 2:
        return 'logits'
    if y.dim() == 4 and y.shape[-1] == y.shape[-2]:
        return 'heatmaps'
    if y.dim() == 3 and y.shape[-1] == 2:
        return 'coordinates'
    raise ValueError(f"measure_symmetry: cannot tell how an output of shape {tuple(y.shape)} should move under "
                     f"the group; expected logits [B, N], square maps [B, K, H, H] or coordinates [B, K, 2]")


# ----------------------------------------------------------------------------------------------------------------
# the stem
# ----------------------------------------------------------------------------------------------------------------
def _find_stem(model: nn.Module) -> Optional[nn.Module]:
    for m in model.modules():
        rec = getattr(m, '_gequiv_stem', None)
        if rec:
            return m.get_submodule(rec['path'])
    return None


def _stem_action(stem: nn.Module, group: Group) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """How the stem's output moves under element ``g`` of ``group``: the stem's own ``transform_output`` when it
    has one (and the same group), else by its ``layout``: planar / pooled maps turn, folded maps also permute
    every block of ``|G|`` channels (the group's regular representation)."""
    own = getattr(stem, 'group', None)
    if hasattr(stem, 'transform_output'):
        if isinstance(own, Group) and own.name != group.name:
            raise ValueError(f"measure_symmetry: the stem is {own.name}-equivariant but the model is measured on "
                             f"{group.name}; measure it on {own.name}")
        return stem.transform_output
    layout = getattr(stem, 'layout', 'planar')
    if layout in ('planar', 'invariant'):
        return group.transform_plane
    if layout == 'folded':
        return lambda y, g: fold_group(group.transform_group_map(unfold_group(y, group.order), g))
    raise ValueError(f"measure_symmetry: unknown stem layout {layout!r} of {type(stem).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------
def claim_of(name: str) -> Tuple[str, str]:
    """``(group, claim)`` of a catalog entry (its ``symmetry`` field; no field: ``('p4m', 'none')``)."""
    from .registry import get_entry
    sym = get_entry(name).symmetry or {}
    return sym.get('group', DEFAULT_GROUP), sym.get('claim', 'none')


def approx_of(name: str) -> Optional[str]:
    """The larger C_N / D_N group whose other rotations a catalog entry's figure is measured on (``symmetry.approx``),
    or ``None``."""
    from .registry import get_entry
    return (get_entry(name).symmetry or {}).get('approx')


def _reduction(model: nn.Module) -> int:
    info = getattr(model, 'feature_info', None)
    try:
        reds = [int(f['reduction']) for f in (info.get_dicts() if hasattr(info, 'get_dicts') else info or [])]
    except (KeyError, TypeError):
        reds = []
    return max(reds) if reds else 32


def measurement_size(model: nn.Module, max_side: int = 64) -> int:
    """The square input side used to measure ``model`` (see the module docstring)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    side = int((cfg.get('input_size') or (3, 224, 224))[-1])
    if side > max_side:
        r = _reduction(model)
        low = max(max_side, int((cfg.get('min_input_size') or (0, 0, 0))[-1]))
        side = r * math.ceil(low / r)
    exact = getattr(model, 'exact_input_sizes', None)
    if callable(exact) and not exact(side, side):
        for s in range(side + 1, 2 * side + 1):
            if exact(s, s):
                return s
        raise ValueError(f"measure_symmetry: no input side in [{side}, {2 * side}] at which "
                         f"{type(model).__name__} is exact; pass size=")
    return side


def _generic_weights(model: nn.Module, gen: torch.Generator, scale: float = NOISE) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            rms = p.detach().pow(2).mean().sqrt().item()
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
            p.add_(noise * (scale * rms if rms > 0 else scale))


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.norm()
    if scale == 0:
        raise ValueError("measure_symmetry: the output is the same for two different random images, so no change "
                         "can be measured against it; check the model (a zero head, a constant output)")
    return ((a - b).norm() / scale).item()


@torch.no_grad()
def measure_symmetry(name_or_model: Union[str, nn.Module], group: Union[str, Group, None] = None, *,
                     size: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float64,
                     batch: int = 2, threshold: float = THRESHOLD, generic_weights: bool = True,
                     in_chans: Optional[int] = None, approx: Union[str, Group, None] = None) -> SymmetryReport:
    """Measure how a registered model (by name) or a model instance behaves under a point group.

    Args:
        name_or_model: a ``gequiv_*`` name (built with ``timm.create_model`` after seeding) or an ``nn.Module``
            (measured on a deep copy, so the caller's model is untouched).
        group: ``'p4'`` / ``'p4m'`` (or a :class:`Group`); default: the catalog's claimed group for a name,
            ``'p4m'`` otherwise (every symmetry of the pixel grid).
        size: square input side; default :func:`measurement_size`.
        seed: seeds the model's initialisation, the weight noise and the input.
        dtype: float64 by default.
        threshold: relative error below which a property counts as exact.
        generic_weights: add 10% noise to every parameter first (see the module docstring).
        in_chans: input channels (default: the model's ``pretrained_cfg`` / ``in_chans``).
        approx: a larger ``'cN'`` / ``'dN'`` group (its quarter turns and mirrors must be ``group``) whose other
            rotations are measured on smooth inputs (module docstring); default: the catalog's ``symmetry.approx``
            for a name, none otherwise. Classifiers only.

    Returns a :class:`SymmetryReport`. Example::

        >>> r = measure_symmetry('gequiv_p4cnn')
        >>> r.cls, r.error < THRESHOLD
        ('invariant', True)
    """
    t0 = time.perf_counter()
    if batch < 2:
        raise ValueError(f"measure_symmetry: batch must be at least 2 (the figure compares the change under the "
                         f"group with the change between two images), got {batch}")
    if not isinstance(name_or_model, (str, nn.Module)):
        raise TypeError(f"measure_symmetry: expected a model name or an nn.Module, got {type(name_or_model).__name__}")
    claim = None
    if isinstance(name_or_model, str):
        name = name_or_model.split('.', 1)[0]
        g_claim, claim = claim_of(name)
        group = group or g_claim
        approx = approx or approx_of(name)
    grp = get_group(group or DEFAULT_GROUP)
    if grp.order == 1:
        raise ValueError("measure_symmetry: group 'z2' has no rotations or mirrors to measure; use 'p4' or 'p4m'")
    big = _approx_group(approx, grp)
    if isinstance(name_or_model, str):
        import timm
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
    else:
        import copy
        model = copy.deepcopy(name_or_model)
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    model = model.to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    if generic_weights:
        _generic_weights(model, gen)
    side = int(size or measurement_size(model))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    c = in_chans or getattr(model, 'in_chans', None) or int((cfg.get('input_size') or (3,))[0])
    x = torch.randn(batch, c, side, side, generator=gen, dtype=torch.float64).to(dtype)

    fx = model(x)
    kind = _output_kind(fx)
    ref = fx - fx.roll(1, 0)  # how much the output moves between two different images (eval: per-sample)
    per = [_rel(model(grp.transform_plane(x, g)), _act_output(fx, grp, g, kind, side), ref) for g in grp.elements()]
    err = max(per)

    stem = _find_stem(model)
    stem_err = None
    if stem is not None:
        act = _stem_action(stem, grp)
        sx = stem_output(model, x, stem)
        sref = sx - sx.roll(1, 0)
        stem_err = max(_rel(stem_output(model, grp.transform_plane(x, g), stem), act(sx, g), sref)
                       for g in grp.elements())
    if err <= threshold:
        cls = 'invariant' if kind == 'logits' else 'equivariant'
    elif stem_err is not None and stem_err <= threshold:
        cls = 'equivariant stem'
    else:
        cls = 'none'
    approx_err = approx_per = None
    if big is not None:
        if kind != 'logits':
            raise ValueError(f"measure_symmetry: approx={big.name!r} measures how much the logits change; {name} "
                             f"returns {kind}")
        approx_per = _approx_figures(model, big, batch, c, side, seed, dtype)
        approx_err = max(e for g, e in enumerate(approx_per) if not big.is_grid_element(g))
    return SymmetryReport(name=name, group=grp.name, cls=cls, output=kind, error=err, stem_error=stem_err,
                          per_element=per, input_size=[c, side, side], claim=claim,
                          dtype=str(dtype).replace('torch.', ''), seed=seed,
                          seconds=round(time.perf_counter() - t0, 2),
                          approx_group=None if big is None else big.name, approx_error=approx_err,
                          approx_per_element=approx_per)


def _approx_group(approx: Union[str, Group, None], grp: Group) -> Optional[Group]:
    """The larger group of an approximate measurement, checked against the exact one: its grid elements (quarter
    turns and mirrors) must be ``grp``, and it must have other rotations to measure."""
    if approx is None:
        return None
    big = get_group(approx)
    grid = big.grid_elements()
    mirrors = any(big.decompose(g)[0] for g in grid)
    if big.exact or len(grid) != grp.order or mirrors != grp.mirror:
        raise ValueError(f"measure_symmetry: approx={big.name!r} must be a 'cN' / 'dN' group with N a multiple of 4 "
                         f"above 4 whose quarter turns{' and mirrors' if grp.mirror else ''} are {grp.name!r} (e.g. "
                         f"{'d8' if grp.mirror else 'c8'})")
    return big


def _smooth_disc(field: RandomField, group: Group, g: int, side: int) -> torch.Tensor:
    """The smooth field turned by ``g`` (sampled exactly), times a radial taper: 1 inside, a cosine edge of
    :data:`APPROX_TAPER` pixels down to 0 at the inscribed circle (a radial window commutes with every rotation)."""
    r = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    rad = (r.view(-1, 1) ** 2 + r.view(1, -1) ** 2).sqrt()
    edge = (side - 1) / 2
    t = ((edge - rad) / APPROX_TAPER).clamp(0, 1)
    window = torch.sin(t * math.pi / 2) ** 2
    return field.sample(group, g, group_axis=False) * window.to(field.dtype)


def _approx_figures(model: nn.Module, big: Group, batch: int, c: int, side: int, seed: int,
                    dtype: torch.dtype) -> List[float]:
    """``||f(g x) - f(x)|| / ||f(x) - f(x')||`` for every element ``g`` of ``big`` on smooth disc inputs."""
    field = RandomField((batch, c), (side, side), APPROX_WAVELENGTH, seed=seed, dtype=dtype)
    x = _smooth_disc(field, big, 0, side)
    fx = model(x)
    ref = fx - fx.roll(1, 0)
    return [_rel(model(_smooth_disc(field, big, g, side)), fx, ref) for g in big.elements()]


# ----------------------------------------------------------------------------------------------------------------
# the stored table
# ----------------------------------------------------------------------------------------------------------------
def _table_path(path: Optional[Path] = None) -> Path:
    return Path(path) if path is not None else registry_dir() / TABLE_FILE


def load_table(path: Optional[Path] = None) -> Dict[str, SymmetryReport]:
    """The stored measurements (``registry/symmetry.json``): ``{name: SymmetryReport}``; ``{}`` if absent."""
    p = _table_path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding='utf-8'))
        return {n: SymmetryReport.from_dict(n, d) for n, d in data['models'].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{p}: not a symmetry table ({type(e).__name__}: {e}); regenerate it with "
                         f"'gequiv-timm list --measure --write'") from None


def write_table(reports: Dict[str, SymmetryReport], path: Optional[Path] = None, merge: bool = True) -> Path:
    """Write (atomically) the measured table; with ``merge`` the entries not measured now are kept, except those
    no longer in the catalog."""
    import timm

    from .registry import catalog
    p = _table_path(path)
    table = load_table(p) if merge else {}
    table.update(reports)
    known = set(catalog())
    table = {n: table[n] for n in sorted(table) if n in known}
    head = {
        'about': ("Measured symmetry of every registered model (gequiv_timm.symmetry). Regenerate with "
                  "'gequiv-timm list --measure --write'; tests/test_symmetry.py re-measures and compares."),
        'threshold': THRESHOLD, 'noise': NOISE, 'torch': torch.__version__.split('+')[0], 'timm': timm.__version__,
    }
    rows = [f' {json.dumps(n)}: {json.dumps(_rounded(r.to_dict()))}' for n, r in table.items()]
    text = '{\n' + ''.join(f' {json.dumps(k)}: {json.dumps(v)},\n' for k, v in head.items())
    text += ' "models": {\n' + ',\n'.join(' ' + r for r in rows) + '\n }\n}\n'
    tmp = p.with_suffix('.json.tmp')
    tmp.write_text(text, encoding='utf-8')
    tmp.replace(p)
    return p


def _rounded(d: Dict[str, Any]) -> Dict[str, Any]:
    def r(v):
        return float(f'{v:.4g}') if isinstance(v, float) else v
    d = {k: ([r(v) for v in val] if isinstance(val, list) else r(val)) for k, val in d.items()}
    return d


# ----------------------------------------------------------------------------------------------------------------
# holding descriptions against the measurement
# ----------------------------------------------------------------------------------------------------------------
_STEM_PHRASE = r'\b{g}-equivariant stem\b'


def summary_problems(summary: str, cls: str, group: str) -> List[str]:
    """What a description says that the measured class does not support (``[]`` when it is consistent).

    * "invariant" / "invariance" only for class ``'invariant'``;
    * "equivariant stem" only for ``'equivariant stem'``, which must say "<group>-equivariant stem";
    * any other "equivariant" / "equivariance" only for ``'invariant'`` or ``'equivariant'``.
    """
    s = summary.lower()
    out = []
    if re.search(r'\binvarian(t|ce)\b', s) and cls != 'invariant':
        out.append(f"says 'invariant' but the measured class is {cls!r}")
    stem_words = re.findall(r'\bequivariant stem\b', s)
    other = len(re.findall(r'\bequivarian(t|ce)\b', s)) - len(stem_words)
    if cls == 'equivariant stem':
        if not re.search(_STEM_PHRASE.format(g=re.escape(group)), s):
            out.append(f"must say '{group}-equivariant stem' (only the stem is equivariant)")
    elif stem_words:
        out.append(f"says 'equivariant stem' but the measured class is {cls!r}")
    if other > 0 and cls not in ('invariant', 'equivariant'):
        out.append(f"says 'equivariant' beyond the stem but the measured class is {cls!r}")
    return out


def table_problems(table: Dict[str, SymmetryReport], entries: Dict[str, Any]) -> List[str]:
    """Every disagreement between the catalog (claims, descriptions) and a measured table."""
    out = []
    for n, e in sorted(entries.items()):
        r = table.get(n)
        if r is None:
            out.append(f"{n}: not in the symmetry table; run 'gequiv-timm list {n} --measure --write'")
            continue
        sym = e.symmetry or {}
        group, claim = sym.get('group', DEFAULT_GROUP), sym.get('claim', 'none')
        if r.group != group:
            out.append(f"{n}: measured on {r.group} but the catalog names {group}; re-measure")
        if r.approx_group != sym.get('approx'):
            out.append(f"{n}: the catalog's approx group is {sym.get('approx')!r} but the table's is "
                       f"{r.approx_group!r}; run 'gequiv-timm list {n} --measure --write'")
        if r.cls != claim:
            out.append(f"{n}: the catalog claims {claim!r} on {group}, measured {r.cls!r} "
                       f"(error {r.error:.2g}{'' if r.stem_error is None else f', stem {r.stem_error:.2g}'}); "
                       f"fix the claim in registry/{e.source}")
        out += [f"{n}: summary {p} (registry/{e.source})" for p in summary_problems(e.summary, r.cls, r.group)]
    for n in sorted(set(table) - set(entries)):
        out.append(f"{n}: in the symmetry table but not in the catalog; regenerate the table")
    return out


def format_report(r: SymmetryReport) -> str:
    """One line for ``gequiv-timm list``."""
    what = {'logits': 'logits', 'heatmaps': 'heatmaps', 'coordinates': 'keypoints'}[r.output]
    stem = '' if r.stem_error is None else f", stem {r.stem_error:.1e}"
    size = f"{r.input_size[-1]}x{r.input_size[-1]}"
    label = f"{r.group}-{r.cls}" if r.cls != 'none' else f"none ({r.group})"
    approx = ''
    if r.approx_group is not None:
        step = 360 / get_group(r.approx_group).rotations
        approx = (f"; {r.approx_group} turns off the pixel grid ({step:g} degrees...): approximate, {what} change "
                  f"{r.approx_error:.1e} on smooth inputs")
    return f"{label}: {what} change {r.error:.1e} (relative){stem}{approx}; measured {r.dtype}, {size}"
