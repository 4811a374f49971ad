"""Recombinator / SumNet heads, spatial softmax, losses, decoders and the denoising keypoint model."""
import math

import pytest
import torch
import torch.nn.functional as F

from gequiv_timm.layers.rcn import (
    CoordRegressionHead,
    DenoisingKeypointModel,
    JointKeypointModel,
    RCNPaperTrunk,
    RecombinatorHead,
    SingleScaleHead,
    SumNetHead,
    Upsample2d,
    argmax_keypoints,
    corrupt_keypoints,
    decode_heatmaps,
    heatmap_cross_entropy,
    joint_log_probs,
    keypoints_to_cells,
    keypoints_to_onehot,
    soft_argmax_keypoints,
    spatial_log_softmax,
    spatial_softmax,
)


def _pyramid(b=2, sizes=(32, 16, 8, 4), chans=(8, 16, 24, 32)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(chans, sizes)]


# ----- functional core ---------------------------------------------------------------------------------------
def test_spatial_softmax_normalises_each_map():
    z = torch.randn(3, 4, 7, 9)
    p = spatial_softmax(z)
    assert torch.allclose(p.sum((-2, -1)), torch.ones(3, 4), atol=1e-6)
    assert torch.allclose(spatial_log_softmax(z).exp(), p, atol=1e-6)
    # a softmax over locations, not over keypoints: shifting one map by a constant changes nothing
    z2 = z.clone()
    z2[:, 1] += 5.0
    assert torch.allclose(spatial_softmax(z2), p, atol=1e-6)


def test_keypoints_to_cells_hand_cases():
    kp = torch.tensor([[[3.4, 2.6], [3.6, -0.4], [-0.6, 1.0], [7.49, 7.49], [float('nan'), 1.0]]])
    idx, valid = keypoints_to_cells(kp, (8, 8), stride=1)
    # (3.4, 2.6) -> col 3, row 3 ; (3.6, -0.4) -> col 4, row 0 ; x=-0.6 is left of the image
    assert valid.tolist() == [[True, True, False, True, False]]
    assert idx[0, 0] == 3 * 8 + 3 and idx[0, 1] == 4 and idx[0, 3] == 63
    # stride 4 on a 2x2 map of an 8x8 image: cell = floor((x + 0.5) / 4)
    idx4, valid4 = keypoints_to_cells(torch.tensor([[[3.4, 3.6], [3.6, 0.0]]]), (2, 2), stride=4)
    assert valid4.all() and idx4.tolist() == [[1 * 2 + 0, 0 * 2 + 1]]
    _, v = keypoints_to_cells(kp[:, :2], (8, 8), visible=torch.tensor([[True, False]]))
    assert v.tolist() == [[True, False]]


def test_cross_entropy_matches_hand_computation_and_masks():
    torch.manual_seed(0)
    z = torch.zeros(1, 2, 4, 4, requires_grad=True)
    kp = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    # uniform maps: -log(1/16) per keypoint
    loss = heatmap_cross_entropy(z, kp)
    assert loss.item() == pytest.approx(math.log(16), rel=1e-6)
    z2 = torch.randn(1, 2, 4, 4)
    want = -(z2[0, 0].flatten().log_softmax(0)[2 * 4 + 1] + z2[0, 1].flatten().log_softmax(0)[0]) / 2
    assert heatmap_cross_entropy(z2, kp).item() == pytest.approx(want.item(), rel=1e-5)
    # masked keypoint: no contribution, no gradient into its map
    z3 = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = heatmap_cross_entropy(z3, kp, visible=torch.tensor([[True, False]]))
    loss.backward()
    assert z3.grad[0, 1].abs().max() == 0 and z3.grad[0, 0].abs().max() > 0
    want = -z3[0, 0].detach().flatten().log_softmax(0)[9]
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # a keypoint outside the image is masked too; all masked -> 0 with a live graph
    out = torch.tensor([[[9.0, 9.0], [-3.0, 0.0]]])
    loss = heatmap_cross_entropy(z, out)
    assert loss.item() == 0.0 and loss.requires_grad
    per = heatmap_cross_entropy(z2, kp, reduction='none')
    assert per.shape == (1, 2) and per.sum().item() == pytest.approx(heatmap_cross_entropy(z2, kp, reduction='sum').item())


@pytest.mark.parametrize('stride', [1, 2, 4])
def test_argmax_decodes_cell_centres(stride):
    h = w = 8
    kp = torch.tensor([[[5.0 * stride + (stride - 1) / 2, 2.0 * stride + (stride - 1) / 2],
                        [0.0 + (stride - 1) / 2, 7.0 * stride + (stride - 1) / 2]]])
    z = 20 * keypoints_to_onehot(kp, (h, w), stride)
    coords, conf = argmax_keypoints(z, stride)
    assert torch.allclose(coords, kp)
    assert (conf > 0.99).all()
    # the cell centre is a fixed point of discretise -> decode
    idx, valid = keypoints_to_cells(coords, (h, w), stride)
    assert valid.all() and torch.equal(idx, keypoints_to_cells(kp, (h, w), stride)[0])


def test_soft_argmax_is_subpixel():
    h, w = 16, 20
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing='ij')
    x0, y0 = 7.3, 9.65
    z = (-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * 0.8 ** 2))[None, None]
    c_arg, _ = argmax_keypoints(z)
    c_soft, _ = soft_argmax_keypoints(z, window=7)
    c_glob, _ = soft_argmax_keypoints(z, window=None)
    truth = torch.tensor([x0, y0], dtype=torch.float64)
    assert (c_arg[0, 0] - truth).abs().max() >= 0.3  # argmax is stuck on the grid
    assert (c_soft[0, 0] - truth).abs().max() < 0.02
    assert (c_glob[0, 0] - truth).abs().max() < 0.02
    # two equal adjacent peaks -> their midpoint; a far second mode pulls the global mean, not the window
    z = torch.full((1, 1, 9, 9), -30.0)
    z[0, 0, 2, 2] = z[0, 0, 2, 3] = 0.0
    assert torch.allclose(soft_argmax_keypoints(z, window=3)[0], torch.tensor([[[2.5, 2.0]]]), atol=1e-4)
    z[0, 0, 8, 8] = 0.0
    assert torch.allclose(soft_argmax_keypoints(z, window=3)[0], torch.tensor([[[2.5, 2.0]]]), atol=1e-4)
    assert soft_argmax_keypoints(z, window=None)[0][0, 0, 0] > 4
    # stride: cells map to input pixel centres
    z = torch.full((1, 1, 4, 4), -30.0)
    z[0, 0, 1, 2] = 0.0
    assert torch.allclose(decode_heatmaps(z, 'soft_argmax', stride=4)[0], torch.tensor([[[9.5, 5.5]]]), atol=1e-4)


def test_soft_argmax_window_at_the_border():
    z = torch.full((1, 1, 6, 6), -30.0)
    z[0, 0, 0, 0] = 0.0
    z[0, 0, 0, 1] = 0.0
    coords, _ = soft_argmax_keypoints(z, window=5)
    assert torch.allclose(coords, torch.tensor([[[0.5, 0.0]]]), atol=1e-4)


def test_decoder_input_errors():
    with pytest.raises(ValueError, match=r'\[B, K, H, W\]'):
        argmax_keypoints(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match='odd'):
        soft_argmax_keypoints(torch.randn(1, 1, 4, 4), window=4)
    with pytest.raises(ValueError, match='method'):
        decode_heatmaps(torch.randn(1, 1, 4, 4), 'mean')
    with pytest.raises(ValueError, match=r'\[B=1, K=2, 2\]'):
        heatmap_cross_entropy(torch.randn(1, 2, 4, 4), torch.zeros(1, 3, 2))


# ----- heads -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['nearest', 'bilinear', 'learned'])
@pytest.mark.parametrize('output_stride', [1, 2, 4])
def test_recombinator_head_shapes(mode, output_stride):
    feats = _pyramid()
    head = RecombinatorHead([8, 16, 24, 32], [4, 8, 16, 32], num_keypoints=5, branch_channels=8, upsample=mode,
                            output_stride=output_stride)
    out = head(feats)
    assert out.shape == (2, 5, 128 // output_stride, 128 // output_stride)


def test_recombinator_head_odd_sizes():
    # a 33x33 input through stride-2 convs gives 17, 9, 5: the head must match each finer level exactly
    feats = [torch.randn(1, 4, 17, 17), torch.randn(1, 8, 9, 9), torch.randn(1, 8, 5, 5)]
    for mode in ('nearest', 'bilinear', 'learned'):
        head = RecombinatorHead([4, 8, 8], [2, 4, 8], 3, branch_channels=4, upsample=mode)
        assert head(feats, out_size=(33, 33)).shape == (1, 3, 33, 33)


def test_learned_upsample_starts_as_nearest():
    x = torch.randn(2, 6, 5, 7)
    up_l, up_n = Upsample2d(6, 2, 'learned'), Upsample2d(6, 2, 'nearest')
    assert torch.allclose(up_l(x), up_n(x))
    assert up_l(x, (11, 13)).shape == (2, 6, 11, 13)


def test_recombinator_head_recombines_every_level():
    feats = [f.requires_grad_() for f in _pyramid()]
    head = RecombinatorHead([8, 16, 24, 32], [4, 8, 16, 32], 3, branch_channels=8)
    head(feats)[:, :, 60, 60].sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    # the coarse levels are reached through the finer branches: a change in the coarsest level changes the output
    head.eval()
    with torch.no_grad():
        a = head(feats)
        f2 = list(feats)
        f2[-1] = f2[-1] + 1.0
        assert (head(f2) - a).abs().max() > 1e-5  # float noise is ~1e-7


def test_sumnet_is_a_weighted_sum_of_level_predictions():
    feats = _pyramid()
    head = SumNetHead([8, 16, 24, 32], [4, 8, 16, 32], 3, branch_channels=8).eval()
    with torch.no_grad():
        full = head(feats)
        parts = []
        for lvl in range(4):
            w = torch.zeros_like(head.level_weight)
            w[lvl] = 1.0
            head.level_weight.copy_(w)
            parts.append(head(feats))
        weights = torch.randn(4, 3)
        head.level_weight.copy_(weights)
        mixed = head(feats)
    assert torch.allclose(full, sum(parts), atol=1e-5)
    assert torch.allclose(mixed, sum(weights[l][None, :, None, None] * parts[l] for l in range(4)), atol=1e-5)
    assert full.shape == (2, 3, 128, 128)


def test_single_scale_head_ignores_fine_levels():
    feats = _pyramid()
    head = SingleScaleHead([8, 16, 24, 32], [4, 8, 16, 32], 2, branch_channels=8).eval()
    with torch.no_grad():
        a = head(feats)
        b = head([torch.randn_like(f) for f in feats[:-1]] + [feats[-1]])
    assert a.shape == (2, 2, 128, 128) and torch.allclose(a, b)
    # the coarsest level's 1x1-conv logits, bilinearly upsampled by its stride (32)
    with torch.no_grad():
        z = head.classifier(head.branch(feats[-1]))
        assert torch.allclose(a, F.interpolate(z, size=(128, 128), mode='bilinear', align_corners=False))


def test_coord_regression_head_and_pixel_maps():
    head = CoordRegressionHead([8, 16], 4)
    out = head([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)])
    assert out.shape == (2, 4, 2) and (out == 0).all()  # starts at the image centre
    kp = torch.rand(2, 4, 2) * 63
    assert torch.allclose(CoordRegressionHead.to_pixels(CoordRegressionHead.to_normalised(kp, (64, 48)), (64, 48)),
                          kp, atol=1e-5)
    edges = CoordRegressionHead.to_pixels(torch.tensor([[[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]]), (64, 64))
    assert torch.allclose(edges, torch.tensor([[[-0.5, -0.5], [63.5, 63.5], [31.5, 31.5]]]))


def test_head_input_errors():
    head = RecombinatorHead([8, 16], [2, 4], 3)
    with pytest.raises(ValueError, match='level 1 should be'):
        head([torch.randn(1, 8, 8, 8), torch.randn(1, 15, 4, 4)])
    with pytest.raises(ValueError, match='list of 2 feature maps'):
        head([torch.randn(1, 8, 8, 8)])
    with pytest.raises(ValueError, match='power of two'):
        RecombinatorHead([8], [6], 3, output_stride=2)
    with pytest.raises(ValueError, match='coarser'):
        RecombinatorHead([8, 8], [4, 4], 3)
    with pytest.raises(ValueError, match='upsample'):
        RecombinatorHead([8], [2], 3, upsample='cubic')


def test_recombinator_head_learns_to_localise_a_dot():
    """A tiny head on an image pyramid learns to point at a bright dot (real optimisation, 16x16)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 256
    kp = torch.randint(1, 15, (n, 1, 2), generator=g).float()
    img = keypoints_to_onehot(kp, (16, 16))
    img = F.avg_pool2d(F.pad(img, (1, 1, 1, 1)), 3, 1)  # a 3x3 blob
    pyr = lambda x: [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
    head = RecombinatorHead([1, 1, 1], [1, 2, 4], 1, branch_channels=8, convs_per_branch=1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for step in range(60):
        i = torch.randint(0, n, (64,), generator=g)
        loss = heatmap_cross_entropy(head(pyr(img[i])), kp[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        coords, _ = argmax_keypoints(head(pyr(img)))
    assert (coords - kp).abs().max(-1).values.le(0.5).float().mean() > 0.9


# ----- denoiser and joint model ------------------------------------------------------------------------------
def test_onehot_maps():
    kp = torch.tensor([[[1.0, 2.0], [30.0, 3.0], [0.0, 0.0]]])
    oh = keypoints_to_onehot(kp, (8, 8), visible=torch.tensor([[True, True, False]]))
    assert oh.shape == (1, 3, 8, 8)
    assert oh[0, 0, 2, 1] == 1 and oh[0, 0].sum() == 1
    assert oh[0, 1].sum() == 0 and oh[0, 2].sum() == 0  # outside / invisible -> empty map


def test_corrupt_keypoints():
    kp = torch.rand(4000, 5, 2) * 60
    g = torch.Generator().manual_seed(0)
    out, moved = corrupt_keypoints(kp, (64, 64), 0.3, generator=g)
    assert abs(moved.float().mean().item() - 0.3) < 0.02
    assert torch.equal(out[~moved], kp[~moved])
    assert ((out[moved] >= 0) & (out[moved] <= 63)).all() and (out[moved] == out[moved].round()).all()
    out2, moved2 = corrupt_keypoints(kp, (64, 64), 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out2) and torch.equal(moved, moved2)
    vis = torch.zeros(4000, 5, dtype=torch.bool)
    assert not corrupt_keypoints(kp, (64, 64), 1.0, visible=vis)[1].any()
    assert corrupt_keypoints(kp, (64, 64), 1.0)[1].all()
    assert not corrupt_keypoints(kp, (64, 64), 0.0)[1].any()


def test_denoiser_shapes_and_receptive_field():
    den = DenoisingKeypointModel(3, width=8, depth=3).eval()
    x = keypoints_to_onehot(torch.tensor([[[3.0, 4.0], [20.0, 9.0], [30.0, 30.0]]]), (32, 32)).requires_grad_()
    out = den(x)
    assert out.shape == (1, 3, 32, 32)
    # every output pixel sees the far corner of the input (the model can relate distant keypoints)
    out[0, 0, 0, 0].backward()
    assert x.grad[0, :, 31, 31].abs().sum() > 0
    with pytest.raises(ValueError, match='divisible'):
        den(torch.zeros(1, 3, 20, 20))


def test_joint_log_probs_is_the_renormalised_product():
    a, b = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    j = joint_log_probs(a, b)
    prod = spatial_softmax(a) * spatial_softmax(b)
    assert torch.allclose(j.exp(), prod / prod.sum((-2, -1), keepdim=True), atol=1e-6)
    assert torch.allclose(joint_log_probs(a, torch.zeros_like(b)), spatial_log_softmax(a), atol=1e-6)
    # the paper's "sum of pre-softmax values" is the same distribution
    assert torch.allclose(j, spatial_log_softmax(a + b), atol=1e-5)
    with pytest.raises(ValueError, match='same shape'):
        joint_log_probs(a, b[..., :5])


def test_joint_model_runs_end_to_end():
    trunk = RCNPaperTrunk(1, (4, 8, 8))
    head = RecombinatorHead(trunk.channels, trunk.reductions, 2, branch_channels=4)
    net = torch.nn.Sequential()
    net.forward = lambda x: head(trunk(x))  # a minimal keypoint net
    net.add_module('trunk', trunk)
    net.add_module('head', head)
    joint = JointKeypointModel(net, DenoisingKeypointModel(2, width=4, depth=2)).eval()
    with torch.no_grad():
        lp = joint(torch.randn(2, 1, 16, 16))
    assert lp.shape == (2, 2, 16, 16)
    assert torch.allclose(lp.exp().sum((-2, -1)), torch.ones(2, 2), atol=1e-5)


def test_paper_trunk_levels():
    trunk = RCNPaperTrunk(1)
    feats = trunk(torch.randn(2, 1, 64, 64))
    assert [f.shape[1] for f in feats] == trunk.channels and trunk.reductions == [1, 2, 4, 8, 16]
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4]
    with pytest.raises(ValueError, match='divisible by 16'):
        trunk(torch.randn(1, 1, 40, 40))
    with pytest.raises(ValueError, match=r'\[B, 1, H, W\]'):
        trunk(torch.randn(1, 3, 64, 64))


# ----- the timm split of every head: forward = forward_head(forward_features) ---------------------------------------
def _heads(k):
    c, r = [8, 16, 24, 32], [4, 8, 16, 32]
    return {'rcn': RecombinatorHead(c, r, k, branch_channels=8), 'sumnet': SumNetHead(c, r, k, branch_channels=8),
            'sumnet_nearest': SumNetHead(c, r, k, branch_channels=[4, 8, 8, 8], upsample='nearest'),
            'single': SingleScaleHead(c, r, k, branch_channels=8), 'regression': CoordRegressionHead(c, k)}


@pytest.mark.parametrize('kind', ['rcn', 'sumnet', 'sumnet_nearest', 'single', 'regression'])
def test_heads_split_into_features_and_classifier(kind):
    feats = _pyramid()
    head = _heads(3)[kind].eval()
    if kind == 'regression':
        torch.nn.init.normal_(head.fc.weight)
    with torch.no_grad():
        out = head(feats)
        f = head(feats, pre_logits=True)
        assert torch.equal(f, head.forward_features(feats)) and f.shape[1] == head.out_channels
        # SumNet: 1x1 conv then upsample (forward) == upsample then 1x1 conv (the split): they commute
        assert torch.allclose(head.forward_head(f), out, atol=1e-5)
        head.reset_classifier(0)  # no classifier: the features come out
        assert head.num_keypoints == 0 and not [n for n, _ in head.named_parameters() if 'classif' in n or 'fc' in n]
        assert torch.equal(head(feats, pre_logits=True), f)
    with pytest.raises(ValueError, match='forward_head'):
        head.forward_head(torch.randn(1, head.out_channels + 1, 4, 4))


@pytest.mark.parametrize('kind', ['rcn', 'sumnet', 'single', 'regression'])
def test_reset_classifier_keeps_device_and_dtype(kind):
    head = _heads(3)[kind].double()
    head.reset_classifier(0)
    head.reset_classifier(2, device='cpu', dtype=torch.float64)
    ps = [p for n, p in head.named_parameters() if 'classif' in n or 'fc' in n or 'level_weight' in n]
    assert ps and all(p.dtype == torch.float64 for p in ps)
    out = head([f.double() for f in _pyramid()])
    assert out.shape[1] == 2 and out.dtype == torch.float64


def test_paper_trunk_stops_early_and_truncates():
    trunk = RCNPaperTrunk(1, (4, 8, 8, 8)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        full = trunk(x)
        part = trunk(x, max_level=1)
        assert len(part) == 2 and all(torch.equal(a, b) for a, b in zip(part, full))
        trunk.truncate(2)
        assert len(trunk.stages) == 2 and trunk.channels == [4, 8] and trunk.reductions == [1, 2]
        assert all(torch.equal(a, b) for a, b in zip(trunk(x), full[:2]))
    with pytest.raises(TypeError, match='floating point'):
        trunk(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match='levels must be'):
        trunk.truncate(3)


def test_notrace_functions_are_public_and_module_level():
    # torch.fx autowraps only public module-level functions; the models register exactly these
    import gequiv_timm.layers.rcn as rcn
    for fn in rcn.NOTRACE_FUNCTIONS:
        assert not fn.__name__.startswith('_') and getattr(rcn, fn.__name__) is fn
