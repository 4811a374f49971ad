"""``model.export()`` of the G-CNN families: a frozen copy with plain convs, the same logits, the model untouched.

``compare`` measures batch-1 latency after ``export()`` where a model has one; the escnn baselines had one and our
G-CNNs did not, so latency was measured unlike on the two sides. These tests hold the G-CNNs' export to the same
contract as escnn's.
"""
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401
from gequiv_timm.layers import ExportedGroupConv2d, GroupConv2d

CASES = [('gequiv_p4cnn', {}, 28), ('gequiv_c8cnn', dict(widths=(3,) * 7), 28),
         ('gequiv_d8cnn', dict(widths=(2,) * 7), 28), ('gequiv_p4_allcnnc', {}, 32)]


@pytest.mark.parametrize('name,kwargs,size', CASES, ids=[c[0] for c in CASES])
def test_export_is_a_frozen_plain_conv_copy_with_the_same_logits(name, kwargs, size):
    torch.manual_seed(0)
    in_chans = 1 if size == 28 else 3
    model = timm.create_model(name, in_chans=in_chans, **kwargs).double().train()
    # move the batch-norm statistics off their init, so the comparison is not between two identities
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, in_chans, size, size, dtype=torch.float64))
    exported = model.export()
    assert not exported.training and model.training, 'export() returns an eval copy and leaves the model alone'
    assert not any(isinstance(m, GroupConv2d) for m in exported.modules())
    assert any(isinstance(m, ExportedGroupConv2d) for m in exported.modules())
    assert any(isinstance(m, GroupConv2d) for m in model.modules())
    x = torch.rand(3, in_chans, size, size, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        ref, got = model(x), exported(x)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # a frozen copy: a later write to the model does not reach it
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, GroupConv2d)).weight.mul_(2)
        assert not torch.allclose(model(x), got)
        torch.testing.assert_close(exported(x), got, rtol=0, atol=0)
