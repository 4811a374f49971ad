"""The shipped p4m checkpoint was converted from the old element order by relabelling, not retrained: the converted
weights in GrouPy's order give the same logits as the old weights in the old order.

The old order is written out here from its definition (element ``(m, r) = divmod(i, 4)`` meaning ``R^r M'^m`` with
``M'`` the left-right mirror, applied to a filter on the group as ``(g.f)(x, h) = f(g^-1 x, g^-1 h)``), so the test
does not depend on the code it checks.
"""
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401  (registers the models)
from gequiv_timm.data import rotated_mnist
from gequiv_timm.layers import GroupConv2d, P4MConvP4M, P4MConvZ2
from gequiv_timm.layers.groups import p4m_legacy_permutation
from gequiv_timm.models.legacy import convert_legacy_p4m_state_dict
from gequiv_timm.registry import manifest_entry


def _legacy_plane(x, g):
    m, r = divmod(g, 4)
    if m:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, r, dims=(-2, -1))


def _legacy_table():
    """Cayley table of the old labelling, by composing the tensor actions on a probe image."""
    probe = torch.arange(25.).view(5, 5)
    images = [_legacy_plane(probe, g) for g in range(8)]
    find = lambda t: next(i for i, im in enumerate(images) if torch.equal(im, t))  # noqa: E731
    return [[find(_legacy_plane(_legacy_plane(probe, b), a)) for b in range(8)] for a in range(8)]


def _legacy_indices(lifting: bool, k: int) -> torch.Tensor:
    table = _legacy_table()
    inv = [row.index(0) for row in table]
    gi = 1 if lifting else 8
    base = torch.arange(gi * k * k).view(gi, k, k)
    rows = []
    for h in range(8):
        t = _legacy_plane(base, h)
        if not lifting:
            t = t[[table[inv[h]][j] for j in range(8)]]
        rows.append(t.reshape(-1))
    return torch.stack(rows)


def _to_legacy_layers(model):
    """Make every p4m layer of ``model`` compute in the old labelling."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, GroupConv2d) and mod.out_group.name == 'p4m':
            mod.filter_idx = _legacy_indices(mod.in_planar, mod.kernel_size)
            n += 1
    assert n > 0
    return model


def test_permutation_is_the_relabelling():
    assert p4m_legacy_permutation() == [0, 1, 2, 3, 6, 5, 4, 7]


def test_relabelled_random_network_is_the_same_function():
    torch.manual_seed(0)
    old = torch.nn.Sequential(P4MConvZ2(2, 4, 3, padding=1), torch.nn.ReLU(), P4MConvP4M(4, 3, 5, padding=2),
                              torch.nn.ReLU(), P4MConvP4M(3, 2, 3)).double()
    _to_legacy_layers(old)
    new = torch.nn.Sequential(P4MConvZ2(2, 4, 3, padding=1), torch.nn.ReLU(), P4MConvP4M(4, 3, 5, padding=2),
                              torch.nn.ReLU(), P4MConvP4M(3, 2, 3)).double()
    new.load_state_dict(convert_legacy_p4m_state_dict(new, old.state_dict()))
    x = torch.randn(2, 2, 11, 11, dtype=torch.float64)
    perm = p4m_legacy_permutation()
    y_old, y_new = old(x), new(x)
    relabelled = torch.empty_like(y_old)
    relabelled[:, :, perm] = y_old
    torch.testing.assert_close(y_new, relabelled, rtol=1e-12, atol=1e-12)
    # the check can fail: without the conversion the outputs differ
    new.load_state_dict(old.state_dict())
    assert (new(x) - relabelled).abs().max() > 1e-3


def test_shipped_p4mcnn_has_identical_predictions_to_its_legacy_form():
    entry = manifest_entry('gequiv_p4mcnn.rotmnist')
    assert entry['sha256'] != entry['converted_from_sha256']
    model = timm.create_model('gequiv_p4mcnn.rotmnist', pretrained=True).eval()
    legacy = timm.create_model('gequiv_p4mcnn').eval()
    legacy.load_state_dict(convert_legacy_p4m_state_dict(legacy, model.state_dict()))  # back to the old labels
    _to_legacy_layers(legacy)
    x, _ = rotated_mnist(seed=0).test.dataset()[:200]
    with torch.no_grad():
        a, b = model(x), legacy(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_equivariant_stem_refuses_blind_relabelling():
    from gequiv_timm import inject_equivariant_stem
    m = inject_equivariant_stem('resnet18', group='p4m', mode='equivariant', pretrained=False)
    with pytest.raises(ValueError, match='folded p4m'):
        convert_legacy_p4m_state_dict(m, m.state_dict())
