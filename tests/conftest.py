"""Shared test setup (the one conftest).

* One torch thread: CI and the developers' machines have 2 shared cores, where more threads only contend; it also
  keeps float reductions in one order, so numbers repeat run to run. A test that needs another count sets it
  itself (and restores it).
* ``tests/`` is on ``sys.path`` (pytest's rootdir-relative import), so the helpers beside the tests
  (``hub_standin``, ``timm_upstream``, ``timm_departures``) import by name.
"""
import torch

torch.set_num_threads(1)
