"""The import rule of the package, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` of gequiv_timm, at module level or inside functions, relative or absolute,
is an edge of the import graph. Ranks, bottom to top (a module imports its own rank or lower, never higher)::

    0  gequiv_timm._version, gequiv_timm._resources, gequiv_timm.outputs, gequiv_timm.layers.*
                                                                            (layers import only layers)
    1  gequiv_timm.weights
    2  gequiv_timm.registry
    3  gequiv_timm.models.*
    4  gequiv_timm.data.*, gequiv_timm.metrics, gequiv_timm.measure
    5  gequiv_timm.training.*, gequiv_timm.train, gequiv_timm.hub, gequiv_timm.compare, gequiv_timm.symmetry,
       gequiv_timm.viz, gequiv_timm.timm_train
    6  gequiv_timm.cli.*                                                    (argparse lives only here)

``gequiv_timm/__init__.py`` (the package entry) imports ranks 0-3 to register the models, so it counts as rank 3:
a module below rank 3 that imports it (e.g. ``from gequiv_timm import __version__``) breaks the rule. No cycles at
all.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

PKG = 'gequiv_timm'
ROOT = Path(__file__).resolve().parents[1] / PKG

# prefix -> rank; the longest matching prefix wins ('gequiv_timm.layers' covers gequiv_timm.layers.*)
RANKS = {
    'gequiv_timm._version': 0, 'gequiv_timm._resources': 0, 'gequiv_timm.outputs': 0, 'gequiv_timm.layers': 0,
    'gequiv_timm.weights': 1,
    'gequiv_timm.registry': 2,
    'gequiv_timm.models': 3,
    'gequiv_timm.data': 4, 'gequiv_timm.metrics': 4, 'gequiv_timm.measure': 4,
    'gequiv_timm.training': 5, 'gequiv_timm.train': 5, 'gequiv_timm.hub': 5, 'gequiv_timm.compare': 5,
    'gequiv_timm.symmetry': 5, 'gequiv_timm.viz': 5, 'gequiv_timm.timm_train': 5,
    'gequiv_timm.cli': 6,
}
ENTRY = PKG            # the package __init__: it registers the models (imports ranks <= 3), so it is rank 3
ENTRY_RANK = 3
ONLY_IN_CLI = ('argparse',)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # file:line

    def __str__(self):
        return f"{self.src} -> {self.dst}  ({self.where})"


def module_names(root: Path = ROOT, pkg: str = PKG) -> Dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (``pkg.sub`` for ``sub/__init__.py``)."""
    out = {}
    for f in sorted(root.rglob('*.py')):
        rel = f.relative_to(root).with_suffix('')
        parts = [pkg, *rel.parts]
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = f
    return out


def _resolve(base: str, name: Optional[str], modules: Dict[str, Path]) -> List[str]:
    """Targets of ``from base import name``: the submodule ``base.name`` when it is one, else ``base``."""
    if name and f'{base}.{name}' in modules:
        return [f'{base}.{name}']
    return [base]


def imports_of(mod: str, path: Path, modules: Dict[str, Path], root: Path = ROOT, pkg: str = PKG
               ) -> Tuple[List[Edge], List[Edge]]:
    """``(edges to modules of the package, edges to other top-level modules)`` of one file, every import anywhere
    in it (module level, functions, classes, ``if TYPE_CHECKING`` blocks)."""
    tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
    is_pkg = path.name == '__init__.py'
    own, other = [], []
    rel = path.relative_to(root.parent)
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.split('.') if is_pkg else mod.split('.')[:-1]
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = '.'.join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ''
            if base == pkg or base.startswith(pkg + '.'):
                for a in node.names:
                    targets += _resolve(base, a.name, modules)
            else:
                targets = [base]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == 'import_module' and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]  # importlib.import_module('gequiv_timm.x')
        for t in targets:
            if t == pkg or t.startswith(pkg + '.'):
                while t not in modules and '.' in t:  # `import gequiv_timm.x.name` of a non-module: its module
                    t = t.rsplit('.', 1)[0]
                if t != mod:
                    own.append(Edge(mod, t, where))
            else:
                other.append(Edge(mod, t.split('.')[0], where))
    return own, other


def rank(mod: str, ranks: Dict[str, int] = RANKS) -> Optional[int]:
    if mod == ENTRY:
        return ENTRY_RANK
    best = None
    for prefix, r in ranks.items():
        if (mod == prefix or mod.startswith(prefix + '.')) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, r)
    return None if best is None else best[1]


def graph(root: Path = ROOT, pkg: str = PKG):
    modules = module_names(root, pkg)
    own, other = [], []
    for m, f in modules.items():
        a, b = imports_of(m, f, modules, root, pkg)
        own += a
        other += b
    return modules, own, other


def cycles(edges: List[Edge]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    adj: Dict[str, Set[str]] = {}
    for e in edges:
        adj.setdefault(e.src, set()).add(e.dst)
        adj.setdefault(e.dst, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


def rank_violations(edges: List[Edge], ranks: Dict[str, int] = RANKS) -> List[str]:
    bad = []
    for e in edges:
        rs, rd = rank(e.src, ranks), rank(e.dst, ranks)
        if rs is None or rd is None:
            continue  # reported by test_every_module_has_a_rank
        if rd > rs:
            what = ' (the package entry: it imports the models)' if e.dst == ENTRY else ''
            bad.append(f"{e}: rank {rs} imports rank {rd}{what}")
        elif e.src.startswith(f'{PKG}.layers') and not e.dst.startswith(f'{PKG}.layers'):
            bad.append(f"{e}: layers import only layers (pure torch)")
    return sorted(bad)


def argparse_violations(other: List[Edge]) -> List[str]:
    return sorted(f"{e}: argparse outside {PKG}.cli" for e in other
                  if e.dst in ONLY_IN_CLI and not (e.src == f'{PKG}.cli' or e.src.startswith(f'{PKG}.cli.')))


MODULES, EDGES, OTHER = graph()


# ----- the rule ---------------------------------------------------------------------------------------------------
def test_the_graph_is_read():
    # the reader itself: these edges exist (if it found none, every other test here would pass vacuously)
    found = {(e.src, e.dst) for e in EDGES}
    assert (f'{PKG}.hub', f'{PKG}.weights') in found
    assert (f'{PKG}.models._helpers', f'{PKG}.weights') in found
    assert any(e.src.startswith(f'{PKG}.cli') and e.dst == 'argparse' for e in OTHER)
    assert len(MODULES) > 40


def test_every_module_has_a_rank():
    missing = sorted(m for m in MODULES if rank(m) is None)
    assert not missing, f"modules with no rank in the import rule (add them to RANKS and DESIGN.md): {missing}"


def test_no_import_cycles():
    found = cycles(EDGES)
    detail = []
    for comp in found:
        members = set(comp)
        detail += [f"  {e}" for e in EDGES if e.src in members and e.dst in members]
    assert not found, "import cycles:\n" + '\n'.join(f"  {c}" for c in found) + "\nedges:\n" + '\n'.join(detail)


def test_imports_respect_ranks():
    bad = rank_violations(EDGES)
    assert not bad, "imports against the rule (a module imports its own rank or lower):\n" + '\n'.join(bad)


def test_argparse_only_in_cli():
    bad = argparse_violations(OTHER)
    assert not bad, '\n'.join(bad)


# ----- the checker can fail ---------------------------------------------------------------------------------------
def test_checker_finds_cycles_upward_imports_and_argparse(tmp_path):
    pkg = tmp_path / PKG
    for rel, text in {
        '__init__.py': 'from . import models\n',
        'weights.py': 'def f():\n    from .hub import x\n',                     # rank 1 -> 5, inside a function
        'hub.py': 'import argparse\nfrom gequiv_timm.weights import f\n',       # argparse outside cli; cycle
        'layers/__init__.py': '',
        'layers/a.py': 'from .._resources import x\nfrom . import b\n',         # layers -> non-layers
        'layers/b.py': 'from gequiv_timm.layers import a\n',                    # cycle a <-> b
        '_resources.py': 'import gequiv_timm\n',                                # imports the entry
        'models/__init__.py': 'from ..registry import x\n',
        'registry.py': 'import importlib\nimportlib.import_module("gequiv_timm.models")\n',  # 2 -> 3
        'cli/__init__.py': 'import argparse\nfrom .. import hub\n',             # allowed
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    modules, edges, other = graph(pkg)
    comps = cycles(edges)
    assert [f'{PKG}.hub', f'{PKG}.weights'] in comps
    assert [f'{PKG}.layers.a', f'{PKG}.layers.b'] in comps
    bad = '\n'.join(rank_violations(edges))
    assert f'{PKG}.weights -> {PKG}.hub  ({PKG}/weights.py:2): rank 1 imports rank 5' in bad
    assert f'{PKG}.layers.a -> {PKG}._resources' in bad and 'layers import only layers' in bad
    assert f'{PKG}._resources -> {PKG}  ({PKG}/_resources.py:1): rank 0 imports rank 3 (the package entry' in bad
    assert f'{PKG}.registry -> {PKG}.models' in bad
    assert f'{PKG}.cli' not in bad
    assert argparse_violations(other) == [f'{PKG}.hub -> argparse  ({PKG}/hub.py:1): argparse outside {PKG}.cli']
