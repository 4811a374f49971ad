"""timm-facing recipes, one module per family. Builders are generated from the catalog by gequiv_timm.registry."""
