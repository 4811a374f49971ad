"""Shared test setup (the one conftest). The tests mirror the package: ``tests/layers``, ``tests/models``,
``tests/data``, ``tests/training``, and the edge modules (weights, registry, hub, compare, measure, metrics,
symmetry, cli, architecture) at the top.

* One torch thread: CI and the developers' machines have 2 shared cores, where more threads only contend; it also
  keeps float reductions in one order, so numbers repeat run to run. A test that needs another count sets it
  itself (and restores it).
* Helpers that are not tests sit beside their users and are imported by name (pytest puts a test file's folder on
  ``sys.path``): ``hub_standin`` (the local Hub stand-in), ``models/timm_upstream`` and ``models/timm_departures``.
"""
import torch

torch.set_num_threads(1)


# ----- device (issue 18): `pytest --device cuda` runs the device-aware tests on a GPU ---------------------------
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption('--device', default='cpu',
                     help="device of the tests that take the `device` fixture: 'cpu' (default) or 'cuda[:N]'")


@pytest.fixture
def device(request) -> torch.device:
    """The ``--device`` of this run (CPU by default); the test is skipped when CUDA is asked for and absent."""
    dev = torch.device(request.config.getoption('--device'))
    if dev.type == 'cuda' and not torch.cuda.is_available():
        pytest.skip('--device cuda: no CUDA device here')
    return dev


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device, whatever ``--device`` says; the test is skipped where there is none."""
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    return torch.device('cuda')
