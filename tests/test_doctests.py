"""The examples in the package's docstrings run, and give what they show (``>>>`` lines, doctest)."""
import doctest
import importlib
import pkgutil

import pytest
import torch

import gequiv_timm


def _modules():
    names = ['gequiv_timm']
    for info in pkgutil.walk_packages(gequiv_timm.__path__, 'gequiv_timm.'):
        if info.name.endswith('__main__'):
            continue
        names.append(info.name)
    return sorted(names)


def _with_examples():
    out = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in _modules():
        mod = importlib.import_module(name)
        tests = [t for t in finder.find(mod, name) if t.examples]
        if tests:
            out.append(name)
    return out


MODULES = _with_examples()


def test_there_are_docstring_examples():
    assert len(MODULES) >= 3, MODULES


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
    torch.manual_seed(0)
    mod = importlib.import_module(name)
    globs = {'torch': torch, 'nn': torch.nn}
    res = doctest.testmod(mod, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                          verbose=False, report=False)
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} docstring examples failed (run " \
                            f"python -m doctest -v on the module to see them)"
