"""timm-facing recipes, one module per family, each ending with its visible ``@register_model`` builders and its
``default_cfgs``. Importing this package registers every model with timm; the catalog (``registry/*.toml``) holds
what is data about them (summary, paper, extras, symmetry claim, tags), and the two must name the same models."""
from .. import registry as _registry
from . import canon, escnn_baselines, gcnn, gresnet, pde, pde_seg, rcn, stems, stn  # noqa: F401  (registers the builders)
from ._fx import register_fx_leaves
from ._timm_api import min_input_size  # noqa: F401  (every registered model's smallest input side)

FAMILIES = ('canon', 'escnn_baselines', 'gcnn', 'gresnet', 'pde', 'pde_seg', 'rcn', 'stems', 'stn')


def _check_catalog_matches_builders() -> None:
    """Every catalog entry has a builder in the module its ``family`` names, and every builder a catalog entry."""
    import sys
    builders = {}
    for fam in FAMILIES:
        mod = sys.modules[f'{__name__}.{fam}']
        builders.update({n: getattr(mod, n) for n in getattr(mod, '__all__', ()) if n.startswith(_registry.PREFIX)})
    for name, entry in _registry.catalog().items():
        fn = builders.get(name)
        if fn is None or fn.__module__ != entry.module:
            raise _registry.CatalogError(
                f"{entry.source}: entry [{name}] has no builder `def {name}(pretrained=False, **kwargs)` in "
                f"{entry.module}; write it there (family = {entry.family!r}) or remove the entry")
    extra = sorted(set(builders) - set(_registry.catalog()))
    if extra:
        raise _registry.CatalogError(f"builders {extra} have no catalog entry in registry/*.toml")

_check_catalog_matches_builders()
register_fx_leaves()
