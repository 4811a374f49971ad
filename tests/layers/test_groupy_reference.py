"""Our P4 / P4M layers against a reference written here from GrouPy's own definitions, not from our code.

GrouPy (Cohen & Welling's reference implementation, ``groupy/garray`` + ``groupy/gfunc`` +
``groupy/gconv/make_gconv_indices.py`` and the PyTorch port's ``trans_filter``) defines:

* an element of p4m by integers ``(m, r, u, v)`` with homogeneous matrix ``T(u, v) M(m) R(r)``, where
  ``M(m) = diag((-1)^m, 1)`` and ``R(r)`` the rotation by ``r * 90`` degrees ``[[c, -s], [s, c]]``; p4 is the
  ``m = 0`` part; ``(u, v)`` index the first (row) and second (column) filter axes, centred on the middle pixel;
* the stabiliser ``D4`` listed as ``[(0,0), (0,1), (0,2), (0,3), (1,0), (1,1), (1,2), (1,3)]`` (``C4``: ``r = 0..3``);
  a function on p4m is stored ``[8, k, k]`` with element ``(m, r)`` at index ``4 m + r``;
* the transformed filter for output element ``g``: the filter read at ``g^-1 * s`` for every sample point ``s``
  (``left_translation_indices``); the indices ``[|G_out|, |G_in|, k, k, 3]`` of (group, row, col);
* ``trans_filter``: ``w[:, :, i0, i1, i2]`` reshaped to ``[C_out, |G_out|, C_in, |G_in|, k, k]``, then one
  ``conv2d`` on the input folded to ``[B, C_in * |G_in|, H, W]``, output unfolded to ``[B, C_out, |G_out|, H', W']``
  and the bias added per output channel.

Everything below is integer matrix arithmetic in numpy, written from those definitions only.
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gequiv_timm.layers import P4ConvP4, P4ConvZ2, P4MConvP4M, P4MConvZ2


def _hmat(m, r, u, v):
    c, s = [1, 0, -1, 0][r % 4], [0, 1, 0, -1][r % 4]
    sign = -1 if m else 1
    return np.array([[sign * c, -sign * s, u], [s, c, v], [0, 0, 1]], dtype=np.int64)


def _to_int(h):
    """(m, r, u, v) of a homogeneous matrix, as GrouPy's hmat2int: the determinant sign gives m, row 1 gives r."""
    m = 0 if round(np.linalg.det(h[:2, :2])) == 1 else 1
    s, c = h[1, 0], h[1, 1]
    r = {(0, 1): 0, (1, 0): 1, (0, -1): 2, (-1, 0): 3}[(int(s), int(c))]
    return m, r, int(h[0, 2]), int(h[1, 2])


def _stabiliser(order):
    return [(0, r) for r in range(4)] if order == 4 else [(m, r) for m in range(2) for r in range(4)]


def groupy_indices(in_order, out_order, k):
    """Index array ``[|G_out|, |G_in|, k, k, 3]`` as GrouPy's make_{c4,d4}_{z2,p4,p4m}_indices define it."""
    half = k // 2
    out = np.zeros((out_order, in_order, k, k, 3), dtype=np.int64)
    in_elems = [(0, 0)] if in_order == 1 else _stabiliser(in_order)
    for gi, (gm, gr) in enumerate(_stabiliser(out_order)):
        g_inv = np.linalg.inv(_hmat(gm, gr, 0, 0)).round().astype(np.int64)
        for hi, (hm, hr) in enumerate(in_elems):
            for a, b in itertools.product(range(k), range(k)):
                u, v = a - half, b - half
                if in_order == 1:  # a function on Z2: the sample point is the translation (u, v)
                    point = _hmat(0, 0, u, v)
                else:              # a function on the group: the sample point is T(u, v) M(m) R(r)
                    point = _hmat(hm, hr, u, v)
                m2, r2, u2, v2 = _to_int(g_inv @ point)
                group_index = 0 if in_order == 1 else (4 * m2 + r2 if in_order == 8 else r2)
                out[gi, hi, a, b] = (group_index, u2 + half, v2 + half)
    return out


def groupy_conv(x, weight, bias, in_order, out_order, stride, padding):
    """GrouPy's PyTorch port: transform the filter through the index array, then one conv2d."""
    co, ci, _, k, _ = weight.shape
    inds = groupy_indices(in_order, out_order, k).reshape(-1, 3)
    w = weight[:, :, inds[:, 0], inds[:, 1], inds[:, 2]]
    w = w.view(co, ci, out_order, in_order, k, k).permute(0, 2, 1, 3, 4, 5).reshape(co * out_order, ci * in_order,
                                                                                    k, k)
    xin = x.reshape(x.shape[0], ci * in_order, x.shape[-2], x.shape[-1])
    y = F.conv2d(xin, w, None, stride, padding)
    y = y.view(y.shape[0], co, out_order, y.shape[-2], y.shape[-1])
    return y if bias is None else y + bias.view(1, co, 1, 1, 1)


LAYERS = {  # ours, |G_in|, |G_out|
    'P4ConvZ2': (P4ConvZ2, 1, 4), 'P4ConvP4': (P4ConvP4, 4, 4),
    'P4MConvZ2': (P4MConvZ2, 1, 8), 'P4MConvP4M': (P4MConvP4M, 8, 8),
}


def test_reference_is_not_trivially_ours():
    """Sanity of the reference: D4 order differs from a naive "flip columns first" order, and the reference index
    arrays are permutations of the filter entries for every output element."""
    for (cls, gi, go) in LAYERS.values():
        for k in (1, 3, 5):
            ind = groupy_indices(gi, go, k)
            flat = ind[..., 0] * k * k + ind[..., 1] * k + ind[..., 2]
            for row in flat.reshape(go, -1):
                assert sorted(row.tolist()) == list(range(gi * k * k))
    # element (1, 1) of GrouPy's D4 maps the row offset u to... (u, v) = (1, 0) -> M R (1, 0) = M (0, 1) = (0, 1)
    assert (_hmat(1, 1, 0, 0)[:2, :2] @ np.array([1, 0])).tolist() == [0, 1]


@pytest.mark.parametrize('layer', list(LAYERS))
@pytest.mark.parametrize('k', [1, 3, 5])
@pytest.mark.parametrize('stride, padding', [(1, 0), (2, 1), (1, 2), (2, 0)])
@pytest.mark.parametrize('bias', [True, False])
def test_same_weights_give_groupy_outputs(layer, k, stride, padding, bias):
    cls, gi, go = LAYERS[layer]
    torch.manual_seed(k * 100 + stride * 10 + padding)
    ours = cls(3, 4, k, stride=stride, padding=padding, bias=bias).double()
    if bias:
        torch.nn.init.normal_(ours.bias)
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64) if gi == 1 else \
        torch.randn(2, 3, gi, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = groupy_conv(x, ours.weight, ours.bias, gi, go, stride, padding)
        got = ours(x)
    assert got.shape == ref.shape
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-10, f'{layer} k={k} stride={stride} padding={padding}: relative error {rel:.2e}'


def test_float32_matches_too():
    torch.manual_seed(0)
    ours = P4MConvP4M(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), groupy_conv(x, ours.weight, ours.bias, 8, 8, 1, 1), rtol=1e-5, atol=1e-5)


def test_tuple_stride_padding_match_groupy():
    """GrouPy passes stride / padding through _pair: pairs of equal ints give the same layer."""
    torch.manual_seed(1)
    ours = P4MConvZ2(2, 3, 3, stride=(2, 2), padding=(1, 1)).double()
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), groupy_conv(x, ours.weight, ours.bias, 1, 8, (2, 2), (1, 1)),
                                   rtol=1e-12, atol=1e-12)
