"""timm's own ``tests/test_models.py``, run unchanged over every registered ``gequiv_*`` model.

The file is read from the source distribution of the installed timm (``make test`` downloads it once into
``.cache/timm-sdist/``; nothing of it is copied into this repository; see ``tests/models/timm_upstream.py``). Its module is
imported as it is, and each of its tests that is parametrised over ``timm.list_models(...)`` is collected here with
its ``model_name`` values restricted to the ``gequiv_*`` models -- the selection (timm's exclude filters,
``name_matches_cfg``, ``include_tags``), its input-size rule, batch sizes and tolerances stay timm's. Left out:

- the two tests that download ImageNet weights from the Hugging Face Hub (``timm_upstream.DESELECTED``);
- timm's tests written for named timm models (``resnet18``, ``convnext_atto``...): they test timm, not us.

Every failure is either fixed in the models or listed in ``tests/models/timm_departures.py`` (the one list, also the source
of README's contract table) and marked here as a strict expected failure with its reason: a fix that makes one pass
fails the run until its entry is removed.
"""
from __future__ import annotations

import fnmatch

import pytest
import timm
import timm_upstream
from timm_departures import DEPARTURES, README, departure_reason, readme_table_block, render_readme_table

MODELS = timm.list_models('gequiv_*')
upstream = timm_upstream.load()
SELECTED = timm_upstream.selected(upstream)

for _name, _models in SELECTED.items():
    _fn = getattr(upstream, _name)
    _mark = timm_upstream.model_param(_fn)
    _params = [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=departure_reason(_name, m)))
               if departure_reason(_name, m) else m for m in _models]
    _fn.pytestmark = [pytest.mark.parametrize('model_name', _params).mark if m is _mark else m
                      for m in _fn.pytestmark]
    globals()[_name] = _fn

cfg_device = upstream.cfg_device  # the fixture timm's cfg test asks for


# ---------------------------------------------------------------------------------------------------------------
# the runner itself: what is selected, what is left out, the departure list and README's table
# ---------------------------------------------------------------------------------------------------------------
def test_upstream_selection_covers_every_model():
    """Each selected timm test runs on every gequiv model once (timm's filters drop none of ours; its cfg test takes
    each model's default tag), and only the two ImageNet-download tests are left out of those parametrised over the
    registry."""
    assert SELECTED, 'no upstream test selected'
    for name, models in SELECTED.items():
        archs = sorted(m.split('.', 1)[0] for m in models)
        assert archs == sorted(MODELS), f'{name}: timm selects {len(models)} of the {len(MODELS)} gequiv models'
    for name in timm_upstream.DESELECTED:
        assert timm_upstream.model_param(getattr(upstream, name)) is not None, \
            f'timm no longer has {name}; update timm_upstream.DESELECTED'


def test_departures_match_collected_tests():
    """Every departure names upstream tests that run here, and each of its patterns hits a model there."""
    for d in DEPARTURES:
        for test in d.tests:
            assert test in SELECTED, f'departure for {test!r}, which is not run here'
            for pattern in d.models:
                assert any(fnmatch.fnmatch(m.split('.', 1)[0], pattern) for m in SELECTED[test]), \
                    f'{test}: departure pattern {pattern!r} matches no model'


def test_readme_table_is_the_departure_list():
    """README's contract table is the one rendered from tests/models/timm_departures.py (and its counts this run's)."""
    text = README.read_text()
    assert readme_table_block(text) == render_readme_table(SELECTED), (
        "README's timm contract table differs from tests/models/timm_departures.py; regenerate it with "
        "`.venv/bin/python tests/models/timm_departures.py`")
