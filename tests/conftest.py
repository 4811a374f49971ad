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
