"""Constructor values out of their allowed range are refused before anything is built (issue 15, item 15).

One table per family: bad keyword arguments -> a fragment of the one-line ValueError, which names the argument and
its allowed range. Every case goes through ``timm.create_model`` and asserts that no parameter was created before
the error (nothing was built). Only ``None`` means "the default": a 0 is checked like any other value, and where 0
is in range it is used as given (the last tests).
"""
from __future__ import annotations

import pytest
import timm
import torch

import gequiv_timm  # noqa: F401  (registers the models)
from gequiv_timm.models.escnn_baselines import escnn_available
from gequiv_timm.models.stems import get_stem, inject_equivariant_stem

NAN = float('nan')

TABLES = {
    'gcnn': ('gequiv_p4cnn', [
        (dict(pool_after=[99]), 'pool_after must be a sequence of ints in [0, 6]'),
        (dict(pool_after=[-1]), 'pool_after must be a sequence of ints in [0, 6]'),
        (dict(widths=[]), 'widths must be a sequence of at least 1 ints >= 1'),
        (dict(widths=[4, 0, 4]), 'widths must be a sequence of at least 1 ints >= 1'),
        (dict(widths=[4, True]), 'widths must be'),
        (dict(kernel_size=4), 'kernel_size must be an odd int >= 1'),
        (dict(kernel_size=-1), 'kernel_size must be an odd int >= 1'),
        (dict(padding=-1), 'padding must be an int >= 0'),
        (dict(group_pool='sum'), "group_pool must be one of ('max', 'mean')"),
        (dict(drop_rate=1.0), 'drop_rate must be a finite number in [0.0, 1.0)'),
        (dict(drop_rate=NAN), 'drop_rate must be a finite number'),
    ]),
    'gresnet': ('gequiv_p4m_resnet44', [
        (dict(layers=[7, -1, 7]), 'layers must be a sequence of at least 1 ints >= 1'),
        (dict(layers=[7, 0, 7]), 'layers must be a sequence of at least 1 ints >= 1'),
        (dict(layers=7), 'layers must be a sequence'),
        (dict(widths=[11, 23]), 'widths must be a sequence of 3 ints >= 1'),
        (dict(stem_width=0), 'stem_width must be an int >= 1 or None'),
        (dict(stem_type='tiny'), "stem_type must be one of ('cifar', 'imagenet')"),
        (dict(group_pool='sum'), 'group_pool must be one of'),
    ]),
    'allcnn': ('gequiv_p4_allcnnc', [
        (dict(widths=(48,)), 'widths must be a sequence of 2 ints >= 1'),
        (dict(widths=(48, 0)), 'widths must be a sequence of 2 ints >= 1'),
    ]),
    'pde': ('gequiv_pde_cnn_rotmnist', [
        (dict(pool_after=[99]), 'pool_after must be a sequence of ints in [0, 5]'),
        (dict(widths=[24, -1]), 'widths must be a sequence of at least 1 ints >= 1'),
        (dict(orientations=0), 'orientations must be an int >= 1'),
        (dict(lift_kernel_size=4), 'lift_kernel_size must be an odd int >= 1'),
        (dict(lift_padding=-1), 'lift_padding must be an int >= 0'),
        (dict(kernel_size=(3, 4, 5)), 'kernel_size must be an odd int >= 1 or a triple'),
        (dict(alpha=0.5), 'alpha must be a finite number in (0.5, 1.0]'),
        (dict(alpha=1.5), 'alpha must be a finite number in (0.5, 1.0]'),
        (dict(iterations=0), 'iterations must be an int >= 1'),
        (dict(coef_lr_mult=-1.0), 'coef_lr_mult must be a finite number in [0.0, inf)'),
        (dict(coef_lr_mult=NAN), 'coef_lr_mult must be a finite number'),
    ]),
    'pde_stem': ('gequiv_pde_resnet18', [
        (dict(stem_depth=-1), 'stem_depth must be an int >= 0'),
        (dict(stem_width=0), 'stem_width must be an int >= 1'),
        (dict(stem_orientations=0), 'stem_orientations must be an int >= 1'),
        (dict(stem_kernel_size=0), 'stem_kernel_size must be an odd int >= 1'),
        (dict(stem_pde_kernel_size=2), 'stem_pde_kernel_size must be an odd int >= 1 or a triple'),
        (dict(stem_alpha=2.0), 'stem_alpha must be a finite number in (0.5, 1.0]'),
    ]),
    'stems': ('gequiv_p4_resnet18', [
        (dict(stem_stride=0), 'stem_stride must be one of (1, 2, 4)'),
        (dict(stem_stride=3), 'stem_stride must be one of (1, 2, 4)'),
        (dict(stem_width=0), 'stem_width must be an int >= 1 or None'),
        (dict(stem_depth=-1), 'stem_depth must be an int >= 0'),
        (dict(stem_kernel_size=0), 'stem_kernel_size must be an odd int >= 1 or None'),
        (dict(stem_kernel_size=4), 'stem_kernel_size must be an odd int >= 1 or None'),
        (dict(stem_group_pool='sum'), "stem_group_pool must be one of ('max', 'mean')"),
        (dict(mode='folded'), "mode must be one of ('invariant', 'equivariant')"),
    ]),
    'stn': ('gequiv_stn_cnn_mnist', [
        (dict(num_transforms=0), 'num_transforms must be an int >= 1'),
        (dict(num_transforms=True), 'num_transforms must be an int >= 1'),
        (dict(loc_input_size=0), 'loc_input_size must be None, an int >= 1 or a pair'),
        (dict(loc_input_size=(32, 0)), 'loc_input_size must be None, an int >= 1 or a pair'),
        (dict(out_size=-1), 'out_size must be None, an int >= 1 or a pair'),
        (dict(out_size=0.0), 'out_size must be a finite number in (0.0, 16.0]'),
        (dict(loc_lr_mult=float('inf')), 'loc_lr_mult must be a finite number in [0.0, inf)'),
        (dict(reg_weight=-1.0), 'reg_weight must be a finite number in [0.0, inf)'),
        (dict(boundary_weight=NAN), 'boundary_weight must be a finite number'),
        (dict(loc_kwargs=dict(channels=(20, 0))), "loc_kwargs['channels'] must be a sequence of ints >= 1"),
        (dict(loc_kwargs=dict(kernel_size=0)), "loc_kwargs['kernel_size'] must be an odd int >= 1"),
        (dict(loc_kwargs=dict(hidden=0)), "loc_kwargs['hidden'] must be an int >= 1"),
        (dict(backbone_kwargs=dict(drop_rate=2)), "backbone_kwargs['drop_rate'] must be a finite number in [0.0, 1.0)"),
    ]),
    'rcn': ('gequiv_rcn_paper', [
        (dict(convs_per_branch=-1), 'convs_per_branch must be an int >= 0'),
        (dict(branch_channels=0), 'branch_channels must be an int >= 1'),
        (dict(branch_channels=(16, 32, 0, 64, 64)), 'branch_channels must be a sequence of at least 1 ints >= 1'),
        (dict(output_stride=0), 'output_stride must be an int >= 1'),
        (dict(trunk_channels=(16, 0, 48, 64, 64)), 'trunk_channels must be a sequence of at least 1 ints >= 1'),
        (dict(trunk_channels=()), 'trunk_channels must be a sequence of at least 1 ints >= 1'),
        (dict(num_keypoints=-1), 'num_keypoints must be an int >= 0'),
    ]),
    'stn_timm': ('gequiv_stn_resnet18', [
        (dict(backbone_kwargs=dict(drop_path_rate=2)),
         "backbone_kwargs['drop_path_rate'] must be a finite number in [0.0, 1.0)"),
        (dict(loc_backbone='resnet18', loc_kwargs=dict(in_chans=0)), "loc_kwargs['in_chans'] must be an int >= 1"),
    ]),
    'rcn_timm': ('gequiv_rcn_resnet18', [
        (dict(out_indices=(-1,)), 'out_indices must be a sequence of at least 1 ints >= 0'),
        (dict(out_indices=()), 'out_indices must be a sequence of at least 1 ints >= 0'),
    ]),
    'escnn': ('gequiv_escnn_c4cnn', [
        (dict(pool_after=[99]), 'pool_after must be a sequence of ints in [0, 6]'),
        (dict(widths=[0]), 'widths must be a sequence of at least 1 ints >= 1'),
        (dict(kernel_size=4), 'kernel_size must be an odd int >= 1'),
        (dict(padding=-1), 'padding must be an int >= 0'),
    ]),
    'escnn_wrn': ('gequiv_escnn_c8_wrn', [
        (dict(kernel_size=-1), 'kernel_size must be an odd int >= 1'),
        (dict(depth=0), 'depth must be an int >= 1'),
        (dict(depth=-2), 'depth must be an int >= 1'),
        (dict(stem_width=0), 'stem_width must be an int >= 1'),
        (dict(widths=5), 'widths must be a sequence'),
    ]),
}

# The arguments every timm model takes, one row per family per key, every family alike (they are checked once, where
# every registered model's build starts: models/_args.check_timm_kwargs from create_gequiv_model). Issue 15 found
# them unchecked behind a stem: gequiv_p4_resnet18 with in_chans=0 ended in a torch traceback, drop_rate=2 built.
COMMON = [
    (dict(in_chans=0), 'in_chans must be an int >= 1'),
    (dict(num_classes=-1), 'num_classes must be an int >= 0'),
    (dict(drop_rate=2), 'drop_rate must be a finite number in [0.0, 1.0)'),
    (dict(drop_rate=-1), 'drop_rate must be a finite number in [0.0, 1.0)'),
]
# ... and the rates of the timm backbone a family passes its arguments on to (stem models, the PDE stem)
BACKBONE_RATES = [
    (dict(drop_path_rate=2), 'drop_path_rate must be a finite number in [0.0, 1.0)'),
    (dict(drop_path_rate=-1), 'drop_path_rate must be a finite number in [0.0, 1.0)'),
    (dict(drop_block_rate=1.0), 'drop_block_rate must be a finite number in [0.0, 1.0)'),
]
BACKBONE_FAMILIES = ('stems', 'pde_stem')
for _family, (_model, _table) in TABLES.items():
    _table.extend(COMMON + (BACKBONE_RATES if _family in BACKBONE_FAMILIES else []))

CASES = [pytest.param(model, kwargs, fragment, id=f'{family}-{"-".join(f"{k}={v}" for k, v in kwargs.items())}')
         for family, (model, table) in TABLES.items() for kwargs, fragment in table]


@pytest.fixture
def parameters_created(monkeypatch):
    """Counts the ``nn.Parameter`` objects created while the test runs (nothing built: 0)."""
    count = [0]
    new = torch.nn.Parameter.__new__

    def counting_new(cls, data=None, requires_grad=True):
        count[0] += 1
        return new(cls, data, requires_grad)
    monkeypatch.setattr(torch.nn.Parameter, '__new__', counting_new)
    return count


@pytest.mark.parametrize('model, kwargs, fragment', CASES)
def test_out_of_range_constructor_values_are_refused_before_building(parameters_created, model, kwargs, fragment):
    if model.startswith('gequiv_escnn') and not escnn_available():
        pytest.skip('escnn is not installed')
    with pytest.raises(ValueError) as err:
        timm.create_model(model, **kwargs)
    msg = str(err.value)
    assert fragment in msg and '\n' not in msg, msg
    assert ', got ' in msg, msg  # says what was given
    assert parameters_created[0] == 0, f'{parameters_created[0]} parameters were built before the error'


@pytest.mark.parametrize('model', timm.list_models('gequiv_*'))
def test_every_registered_model_checks_the_timm_arguments(parameters_created, model):
    """Every registered model, the ones added later too: the arguments every timm model takes are refused out of
    range with the one line naming the registered model, before anything is built."""
    for kwargs, fragment in COMMON:
        with pytest.raises(ValueError) as err:
            timm.create_model(model, **kwargs)
        msg = str(err.value)
        assert msg.startswith(f'{model}: {fragment}') and '\n' not in msg and ', got ' in msg, msg
    assert parameters_created[0] == 0, f'{parameters_created[0]} parameters were built before an error'


@pytest.mark.parametrize('model', ['gequiv_p4_resnet18', 'gequiv_p4m_resnet50', 'gequiv_p4_convnext_tiny',
                                   'gequiv_p4m_efficientnet_b0', 'gequiv_p4_regnety_016', 'gequiv_pde_resnet18'])
def test_stem_models_check_the_backbone_rates_and_pass_good_ones_on(parameters_created, model):
    """A timm backbone behind a new stem: its stochastic-depth rate is checked like drop_rate (each backbone let
    drop_path_rate=2 through; efficientnet_b0 and resnet took drop_rate=2 too), and values in range reach it."""
    for kwargs, fragment in [(dict(drop_path_rate=2), 'drop_path_rate must be'), (dict(drop_rate=1), 'drop_rate')]:
        with pytest.raises(ValueError, match=f'^{model}: {fragment}'):
            timm.create_model(model, **kwargs)
    assert parameters_created[0] == 0
    m = timm.create_model(model, drop_rate=0.25, drop_path_rate=0.1, num_classes=3, in_chans=2, device='meta')
    stem = get_stem(m)
    assert m.drop_rate == 0.25 and m.num_classes == 3
    assert getattr(stem, 'in_chs', getattr(stem, 'in_chans', None)) == 2
    rates = [mod.drop_prob for mod in m.modules() if type(mod).__name__ == 'DropPath']  # a schedule up to the rate
    assert rates and 0 < max(rates) <= 0.1 + 1e-6, rates


def test_parameter_counter_counts():
    """The fixture above can fail: building anything creates parameters."""
    count = [0]
    new = torch.nn.Parameter.__new__

    def counting_new(cls, data=None, requires_grad=True):
        count[0] += 1
        return new(cls, data, requires_grad)
    torch.nn.Parameter.__new__ = counting_new
    try:
        torch.nn.Conv2d(1, 1, 3)
    finally:
        torch.nn.Parameter.__new__ = new
    assert count[0] == 2


def test_out_indices_past_the_backbone_name_the_range():
    with pytest.raises(ValueError, match=r"out_indices must be in \[0, 4\] \('resnet18' has 5 feature levels\), "
                                         r"got \(9,\)"):
        timm.create_model('gequiv_rcn_resnet18', out_indices=(9,))


def test_inject_equivariant_stem_checks_its_arguments_before_building():
    for kwargs, fragment in ((dict(stride=0), 'stride must be one of (1, 2, 4)'),
                             (dict(width=0), 'width must be an int >= 1 or None'),
                             (dict(depth=-1), 'depth must be an int >= 0'),
                             (dict(kernel_size=0), 'kernel_size must be an odd int >= 1 or None')):
        with pytest.raises(ValueError) as err:
            inject_equivariant_stem('resnet18', **kwargs)
        assert str(err.value).startswith('inject_equivariant_stem: ' + fragment), err.value


def test_zero_is_a_value_not_the_default():
    """Where 0 is in range it is used as given: no pooling, no group convs after the lift, no classifier."""
    m = timm.create_model('gequiv_p4cnn', pool_after=[], widths=[4, 4, 4])
    assert all(isinstance(s.pool, torch.nn.Identity) for s in m.stages)
    assert m.feature_info[-1]['reduction'] == 1
    stem = get_stem(timm.create_model('gequiv_p4_resnet18', stem_depth=0))
    assert len(stem.convs) == 0
    assert timm.create_model('gequiv_p4cnn', num_classes=0, widths=[4, 4, 4])(torch.randn(1, 1, 28, 28)).shape == \
        (1, 4)
    m = timm.create_model('gequiv_p4m_resnet44', layers=(1, 1, 1), stem_width=None)
    assert m.stem.conv.out_channels == 11  # None: widths[0]
