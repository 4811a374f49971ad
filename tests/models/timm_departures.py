"""Where gequiv models depart from timm's own ``tests/test_models.py``: the one list.

``tests/models/test_timm_models_upstream.py`` runs timm's file over every ``gequiv_*`` model and marks each (test, model)
listed here as a strict expected failure with the reason below, so a fix that makes one pass fails the run until
its entry goes. README's "timm's model contract" table is rendered from this list (:func:`render_readme_table`;
``tests/models/test_timm_contract.py`` fails when they differ). Regenerate README's table with::

    .venv/bin/python tests/models/timm_departures.py

Every entry is a deliberate, documented departure; where a departing assertion hides later checks of the same timm
test, ``tests/models/test_timm_contract.py`` runs those checks (named in ``covered_by``).
"""
from __future__ import annotations

import fnmatch
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    'DEPARTURES',
    'README',
    'TABLE_END',
    'TABLE_START',
    'Departure',
    'departure_for',
    'departure_reason',
    'render_readme_table',
]

KEYPOINT = ('gequiv_rcn_*', 'gequiv_sumnet_*', 'gequiv_kp*')
SEGMENTATION = ('gequiv_*_seg*',)
SCRIPTING = ('test_model_forward_torchscript', 'test_model_forward_fx_torchscript')


@dataclass(frozen=True)
class Departure:
    tests: tuple[str, ...]        # timm's test functions
    models: tuple[str, ...]       # fnmatch patterns over model names (a tagged name matches through its arch)
    family: str                   # how README names the models
    reason: str                   # why, said once, for people
    covered_by: str | None = None  # our test that runs the rest of timm's checks for these models

    def matches(self, test: str, model: str) -> bool:
        arch = model.split('.', 1)[0]
        return test in self.tests and any(fnmatch.fnmatch(arch, p) for p in self.models)


DEPARTURES: tuple[Departure, ...] = (
    Departure(
        ('test_model_backward', 'test_model_backward_fx'), KEYPOINT, 'keypoint models',
        "outputs are keypoint heatmaps [B, K, H, W] (regression head: coordinates [B, K, 2]); num_classes, an alias "
        "of num_keypoints K, is their axis 1, not the last axis that timm's classifier check reads",
        covered_by='test_timm_contract.py::test_keypoint_backward'),
    Departure(
        ('test_model_backward', 'test_model_backward_fx'), SEGMENTATION, 'segmentation models',
        "outputs are per-pixel class logits [B, num_classes, H, W] at input resolution; num_classes is their axis 1, "
        "not the last axis that timm's classifier check reads",
        covered_by='test_timm_contract.py::test_keypoint_backward (dense outputs: keypoint and segmentation models)'),
    Departure(
        ('test_model_default_cfgs',), ('gequiv_escnn_*',), 'escnn baselines',
        "escnn's InnerBatchNorm reads index buffers with .item(), so the models build on the meta device but cannot "
        "run there; and the cfg has no first_conv: R2Conv holds steerable-basis coefficients (`weights`), no "
        "`.weight` that timm could adapt to another in_chans",
        covered_by='test_timm_contract.py::test_escnn_default_cfgs_on_cpu (timm\'s own test on the CPU, then its '
                   'checks after first_conv)'),
    Departure(
        ('test_model_forward_features',),
        ('gequiv_p4cnn', 'gequiv_p4mcnn', 'gequiv_z2cnn', 'gequiv_c8cnn', 'gequiv_d8cnn', 'gequiv_c16cnn',
         'gequiv_escnn_c4cnn', 'gequiv_escnn_c8cnn', 'gequiv_escnn_d4cnn'),
        'P4CNN layout',
        "unpadded 3x3 convolutions, as in the paper: at the 28-pixel input the deeper maps shrink below input / "
        "(2 x reduction), while feature_info gives the true strides; timm exempts its own unpadded models "
        "(inception_v3 / v4, inception_resnet_v2) from this check by name",
        covered_by='test_timm_contract.py::test_unpadded_features_only'),
    Departure(
        SCRIPTING, ('gequiv_escnn_*',), 'escnn baselines',
        "escnn is not scriptable (nn.ModuleList annotations, GeometricTensor, tuple-keyed dicts); FX works"),
    Departure(
        SCRIPTING, ('gequiv_pde_*',), 'PDE-G-CNN, PDE stem',
        "the M2 layers are not scriptable (input checks that format shapes, lru_cache'd kernel tables, a custom "
        "autograd.Function for the morphological convolution); FX works"),
    Departure(
        SCRIPTING, ('gequiv_stn*',), 'ST-CNN, STN front ends',
        "the spatial transformers are not scriptable (transform families are plain Python objects with Optional[Tuple] "
        "/ int annotations, input checks that format shapes); FX works"),
    Departure(
        SCRIPTING, KEYPOINT, 'keypoint models',
        "not scriptable: the RCN walks its levels coarsest-first (TorchScript indexes nn.ModuleList only in order), "
        "heads take Sequence[Tensor], input checks format shapes; FX works"),
    Departure(
        ('test_model_default_cfgs',), ('gequiv_canon_*_vit_*',), 'canonicalized ViTs',
        "the backbone is a ViT: forward_features returns tokens [B, N, D] and the cfg (timm's own for "
        "vit_small_patch16_224) has no pool_size; timm routes its vit_* models to test_model_default_cfgs_non_std by "
        "name, which a gequiv_ name does not match",
        covered_by="test_canon.py::test_vit_wrappers_pass_timms_non_std_cfg_test (timm's non-standard cfg test)"),
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / 'README.md'
TABLE_START = '<!-- timm-departures: generated by tests/models/timm_departures.py from its DEPARTURES; do not edit -->'
TABLE_END = '<!-- /timm-departures -->'


def departure_for(test: str, model: str) -> Departure | None:
    found = [d for d in DEPARTURES if d.matches(test, model)]
    if len(found) > 1:
        raise ValueError(f'{test}[{model}] matches {len(found)} departures; make the patterns disjoint')
    return found[0] if found else None


def departure_reason(test: str, model: str) -> str | None:
    d = departure_for(test, model)
    return None if d is None else d.reason


def _short(test: str) -> str:
    return '`' + test.replace('test_model_', '') + '`'


def render_readme_table(selected: dict) -> str:
    """README's table: one row per departure (the models it hits, timm's tests, the reason), then the counts of the
    upstream run. ``selected``: timm test name -> the model names it runs on here."""
    total = sum(len(v) for v in selected.values())
    xfail = sum(1 for t, ms in selected.items() for m in ms if departure_for(t, m))
    lines = [TABLE_START,
             '| models | timm tests | why they depart |',
             '|---|---|---|']
    for d in DEPARTURES:
        lines.append(f"| {d.family} (`{'`, `'.join(d.models)}`) | {', '.join(_short(t) for t in d.tests)} | "
                     f"{d.reason} |")
    tests = ', '.join(_short(t) for t in selected)
    n_models = len({m.split('.', 1)[0] for ms in selected.values() for m in ms})
    lines += ['', (f"{total} tests ({len(selected)} of timm's tests: {tests}; on {n_models} models): "
                   f"{total - xfail} pass, {xfail} are the strict expected failures above."),
              TABLE_END]
    return '\n'.join(lines)


def readme_table_block(text: str) -> str:
    m = re.search(re.escape(TABLE_START) + r'.*?' + re.escape(TABLE_END), text, flags=re.DOTALL)
    if m is None:
        raise ValueError(f'{README}: no generated departures table ({TABLE_START!r} ... {TABLE_END!r})')
    return m.group(0)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    import timm_upstream  # imports timm's test module (needs the cached sdist)
    text = README.read_text()
    new = render_readme_table(timm_upstream.selected(timm_upstream.load()))
    README.write_text(text.replace(readme_table_block(text), new))
    print(f'{README}: departures table rewritten ({len(DEPARTURES)} entries)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
