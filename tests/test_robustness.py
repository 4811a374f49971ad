"""Robustness: bad input is rejected with a clear error before anything is computed (property tests over the group
layers; the sweep over the registered models is tests/models/test_input_policy.py), a fuzz pass over the catalog
files and the CLI, and torch.compile / channels_last on the G-CNN models.

Known gaps in files this test's author does not own are ``xfail(strict=True)`` with the fix named: when a fix
lands, the test turns red so the mark gets removed.
"""
import math
import string

import pytest
import timm
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gequiv_timm  # noqa: F401
from gequiv_timm.layers.gconv import (
    GroupAvgPool2d,
    GroupBatchNorm,
    GroupConv2d,
    GroupMaxPool2d,
    GroupPool,
    finite_check,
    fold_group,
    set_finite_check,
    stride_is_exact,
    unfold_group,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
ORDER = {'p4': 4, 'p4m': 8}


# ----- group layers: shapes, exact equivariance, and errors ---------------------------------------------------
conv_cfg = st.fixed_dictionaries(dict(
    group=st.sampled_from(['p4', 'p4m']), lift=st.booleans(), cin=st.integers(1, 3), cout=st.integers(1, 3),
    k=st.sampled_from([1, 3, 5]), padding=st.integers(0, 2), stride=st.integers(1, 2), dilation=st.integers(1, 2),
    h=st.integers(1, 11), w=st.integers(1, 11), batch=st.integers(1, 2), bias=st.booleans()))


def _conv(c):
    return GroupConv2d(c['cin'], c['cout'], c['k'], 'z2' if c['lift'] else c['group'], c['group'], c['stride'],
                       c['padding'], c['dilation'], c['bias'])


def _input(c, **over):
    c = dict(c, **over)
    shape = (c['batch'], c['cin'], c['h'], c['w']) if c['lift'] else (c['batch'], c['cin'], ORDER[c['group']],
                                                                         c['h'], c['w'])
    return torch.randn(*shape, generator=torch.Generator().manual_seed(c['h'] * 31 + c['w']))


@FAST
@given(conv_cfg)
def test_group_conv_shape_equivariance_or_a_clear_size_error(c):
    conv = _conv(c)
    x = _input(c)
    span = [s + 2 * c['padding'] - c['dilation'] * (c['k'] - 1) - 1 for s in (c['h'], c['w'])]
    if min(span) < 0:
        with pytest.raises(ValueError, match='too small'):
            conv(x)
        return
    y = conv(x)
    assert y.shape == (c['batch'], c['cout'], ORDER[c['group']], span[0] // c['stride'] + 1,
                       span[1] // c['stride'] + 1)
    if all(stride_is_exact(s, c['k'], c['stride'], c['padding'], c['dilation']) for s in (c['h'], c['w'])):
        assert conv.check_equivariance(x) < 1e-4


@FAST
@given(conv_cfg, st.integers(1, 3), st.sampled_from(['channels', 'rank', 'dtype', 'group_axis', 'not_tensor']))
def test_group_conv_rejects_bad_input_naming_the_layer(c, delta, kind):
    conv = _conv(dict(c, h=5, w=5, k=3, padding=1))
    x = _input(c, h=5, w=5)
    if kind == 'channels':
        x = _input(c, h=5, w=5, cin=c['cin'] + delta)
        match = f"expected {c['cin']} input channels"
    elif kind == 'rank':
        x = x.flatten(0, 1)
        match = 'expected a (planar input|group feature map)'
    elif kind == 'dtype':
        x = (x * 10).to(torch.int64)
        match = 'floating point'
    elif kind == 'group_axis':
        assume(not c['lift'])
        x = torch.randn(c['batch'], c['cin'], ORDER[c['group']] + delta, 5, 5)
        match = 'group axis'
    else:
        x = x.tolist()
        match = 'torch.Tensor'
    with pytest.raises((ValueError, TypeError), match=match) as err:
        conv(x)
    assert str(err.value).startswith('GroupConv2d')


@FAST
@given(st.sampled_from(['p4', 'p4m']), st.integers(1, 3), st.integers(1, 3))
def test_folded_input_gets_a_hint(group, cin, batch):
    conv = GroupConv2d(cin, 2, 3, group, group, padding=1)
    x = torch.randn(batch, cin, ORDER[group], 5, 5)
    with pytest.raises(ValueError, match='unfold_group'):
        conv(fold_group(x))
    assert torch.equal(unfold_group(fold_group(x), ORDER[group]), x)


@pytest.mark.parametrize('kwargs, match', [
    (dict(kernel_size=4), 'odd'), (dict(in_channels=0), 'in_channels'), (dict(out_channels=True), 'out_channels'),
    (dict(stride=0), 'stride'), (dict(padding=-1), 'padding'), (dict(dilation=1.5), 'dilation'),
    (dict(in_group='p4', out_group='p4m'), 'cannot convolve'), (dict(out_group='so2'), 'so2'),
])
def test_group_conv_rejects_bad_configuration(kwargs, match):
    args = dict(in_channels=2, out_channels=2, kernel_size=3, in_group='z2', out_group='p4')
    args.update(kwargs)
    with pytest.raises((ValueError, KeyError), match=match):
        GroupConv2d(**args)


@FAST
@given(st.sampled_from(['p4', 'p4m']), st.sampled_from(['max', 'mean']), st.integers(1, 3), st.integers(1, 8),
       st.integers(1, 8), st.sampled_from(['max', 'avg']), st.integers(1, 3))
def test_group_pooling_layers(group, mode, c, h, w, spatial, k):
    g = ORDER[group]
    x = torch.randn(2, c, g, h, w, generator=torch.Generator().manual_seed(h * 9 + w))
    pool = GroupPool(group, mode)
    y = pool(x)
    assert y.shape == (2, c, h, w) and pool.check_equivariance(x) < 1e-5
    sp = (GroupMaxPool2d if spatial == 'max' else GroupAvgPool2d)(k, group=group)
    if min(h, w) < k:
        with pytest.raises(ValueError, match='smaller than the window'):
            sp(x)
    else:
        assert sp(x).shape == (2, c, g, (h - k) // k + 1, (w - k) // k + 1)
        if sp.is_exact(h, w):
            assert sp.check_equivariance(x) < 1e-5
    bn = GroupBatchNorm(c, group)
    assert bn(x).shape == x.shape
    for layer in (pool, sp, bn):
        with pytest.raises(ValueError, match=type(layer).__name__):
            layer(torch.randn(2, c, g + 1, h, w))
        with pytest.raises(TypeError, match='floating point'):
            layer(torch.ones(2, c, g, h, w, dtype=torch.int32))
    with pytest.raises(ValueError, match='GroupBatchNorm'):
        bn(torch.randn(2, c + 1, g, h, w))


@FAST
@given(st.integers(0, 4 * 7 * 7 - 1), st.sampled_from([float('nan'), float('inf'), -float('inf')]))
def test_non_finite_input_is_caught_only_when_asked(pos, bad):
    conv = GroupConv2d(1, 2, 3, 'p4', 'p4')
    x = torch.randn(1, 1, 4, 7, 7)
    x.view(-1)[pos] = bad
    assert not torch.isfinite(conv(x)).all()  # default: no check, the poison goes through
    with finite_check():
        with pytest.raises(ValueError, match='GroupConv2d: input holds'):
            conv(x)
        for layer in (GroupPool('p4'), GroupBatchNorm(1, 'p4'), GroupMaxPool2d(2, group='p4')):
            with pytest.raises(ValueError, match=f'{type(layer).__name__}: input holds'):
                layer(x)
    assert set_finite_check(False) is False


# ----- every registered model: the one input policy -----------------------------------------------------------
# tests/models/test_input_policy.py: every registered model x every kind of bad input (rank, channels, dtype, too
# small, NaN with GEQUIV_TIMM_CHECK_FINITE, an empty batch), plus that each stated minimum input size is tight.


# ----- catalog fuzz -----------------------------------------------------------------------------------------
def _toml_value(v):
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ('nan' if math.isnan(v) else ('inf' if v > 0 else '-inf'))
    if isinstance(v, str):
        return '"' + v.replace('\\', '\\\\').replace('"', '\\"') + '"'
    if isinstance(v, list):
        return '[' + ', '.join(_toml_value(x) for x in v) + ']'
    if isinstance(v, dict):
        return '{' + ', '.join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + '}'
    raise TypeError(v)


def _toml(entries):
    return '\n'.join(f'["{name}"]\n' + ''.join(f'"{k}" = {_toml_value(v)}\n' for k, v in e.items())
                     for name, e in entries.items())


VALID = dict(family='gcnn', summary='a model', paper='someone 2016', requires=[],
             tags={'rotmnist': {'hf_hub_id': 'a/b', 'input_size': [1, 28, 28], 'num_classes': 10}})
scalars = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, width=32), st.booleans(),
                    st.text(string.ascii_letters + ' _-', max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from(['a', 'b']), scalars,
                                                                          max_size=2))
def _txt(**k):
    return st.text(string.ascii_letters + ' _-.', **k)


WRONG_TYPE = {'family': st.one_of(st.integers(), st.lists(scalars, max_size=2), st.just(''), st.just('not a module')),
              'summary': st.one_of(st.integers(), st.just(''), st.lists(scalars, min_size=1, max_size=2)),
              'paper': st.one_of(st.integers(), st.booleans()),
              'requires': st.one_of(_txt(min_size=1, max_size=4), st.lists(st.integers(), min_size=1, max_size=2)),
              # model arguments and cfgs are the builder's (gequiv_timm/models/<family>.py), refused here
              'args': st.one_of(st.integers(), _txt(max_size=3), st.lists(scalars, max_size=2), st.just({})),
              'cfg': st.one_of(st.integers(), _txt(max_size=3), st.just({'input_size': [1, 28, 28]})),
              'tags': st.one_of(st.integers(), _txt(max_size=3))}


@st.composite
def mutated_entries(draw):
    entry = dict(VALID)
    name = 'gequiv_fuzz'
    kind = draw(st.sampled_from(['drop', 'wrong_type', 'unknown_field', 'name', 'cfg_key', 'tag_name', 'tag_type']))
    if kind == 'drop':
        field = draw(st.sampled_from(['family', 'summary']))
        del entry[field]
    elif kind == 'wrong_type':
        field = draw(st.sampled_from(sorted(WRONG_TYPE)))
        entry[field] = draw(WRONG_TYPE[field])
    elif kind == 'unknown_field':
        field = draw(st.sampled_from(['famliy', 'weights', 'Summary', 'default_cfg']))
        entry[field] = draw(values)
    elif kind == 'name':
        field = ''
        name = draw(st.sampled_from(['fuzz', 'timm_resnet', 'gequiv-x', 'gequiv_1 x', 'Gequiv_x']))
    elif kind == 'cfg_key':
        field = 'tags.rotmnist'
        entry['tags'] = {'rotmnist': dict(VALID['tags']['rotmnist'],
                                          **{draw(st.sampled_from(['widths', 'group', 'inputsize'])): 1})}
    elif kind == 'tag_name':
        field = 'tag'
        entry['tags'] = {draw(st.sampled_from(['a b', 'x.y', 'a/b', ''])): {}}
    else:
        field = 'tags.t'
        entry['tags'] = {'t': draw(st.one_of(st.integers(), _txt(max_size=3)))}
    return name, field, entry


@FAST
@given(mutated_entries())
def test_malformed_catalog_entry_names_the_entry_and_the_field(tmp_path_factory, case):
    from gequiv_timm.registry import CatalogError, load_catalog
    name, field, entry = case
    folder = tmp_path_factory.mktemp('cat')
    (folder / 'fuzz.toml').write_text(_toml({name: entry}))
    with pytest.raises(CatalogError) as err:
        load_catalog(folder)
    msg = str(err.value)
    assert 'fuzz.toml' in msg and f'[{name}]' in msg and field in msg, msg


@FAST
@given(st.lists(st.sampled_from(['rotmnist', 'upright', 'x-1', 'a_b']), unique=True, max_size=3),
       st.sampled_from(['', 'someone 2016']))
def test_valid_catalog_entries_load_as_written(tmp_path_factory, tags, paper):
    from gequiv_timm.registry import load_catalog
    folder = tmp_path_factory.mktemp('cat')
    entry = dict(VALID, paper=paper, tags={t: {'description': t} for t in tags})
    (folder / 'ok.toml').write_text(_toml({'gequiv_ok': entry}))
    e = load_catalog(folder)['gequiv_ok']
    assert e.family == 'gcnn' and e.paper == paper and e.source == 'ok.toml'
    assert e.tags == {t: {'description': t} for t in tags}
    assert e.missing_extras() == []


@FAST
@given(st.text(max_size=60))
def test_catalog_garbage_text_is_a_catalog_error(tmp_path_factory, text):
    from gequiv_timm.registry import CatalogError, load_catalog
    folder = tmp_path_factory.mktemp('cat')
    (folder / 'junk.toml').write_text(text, encoding='utf-8')
    try:
        load_catalog(folder)
    except CatalogError as e:
        assert 'junk.toml' in str(e)


def test_duplicate_entries_across_files_name_both(tmp_path):
    from gequiv_timm.registry import CatalogError, load_catalog
    (tmp_path / 'a.toml').write_text(_toml({'gequiv_dup': VALID}))
    (tmp_path / 'b.toml').write_text(_toml({'gequiv_dup': VALID}))
    with pytest.raises(CatalogError, match=r'b.toml: entry \[gequiv_dup\] is already defined in a.toml'):
        load_catalog(tmp_path)


@pytest.mark.parametrize('req', ['a..b', '.x', ''])
def test_unknown_extra_in_requires_is_a_catalog_error(tmp_path, req):
    from gequiv_timm.registry import CatalogError, load_catalog
    (tmp_path / 'r.toml').write_text(_toml({'gequiv_r': dict(VALID, requires=[req])}))
    with pytest.raises(CatalogError, match="requires"):
        load_catalog(tmp_path)


def test_bad_cfg_value_is_a_catalog_error(tmp_path):
    from gequiv_timm.registry import CatalogError, load_catalog
    (tmp_path / 'c.toml').write_text(_toml({'gequiv_c': dict(VALID, tags={'t': {'input_size': 'abc'}})}))
    with pytest.raises(CatalogError, match='input_size'):
        load_catalog(tmp_path)


# ----- CLI fuzz ---------------------------------------------------------------------------------------------
class _Reached(Exception):
    """The train command validated its arguments and was about to train."""


numbers = st.one_of(st.integers(-3, 3).map(str), st.sampled_from(['nan', 'inf', '-inf', '1e-3', '0.5', '1e9', 'x',
                                                                  '']))
TRAIN_FLAGS = ['--epochs', '--batch-size', '--lr', '--weight-decay', '--momentum', '--layer-decay', '--warmup-epochs',
               '--min-lr', '--smoothing', '--clip-grad', '--max-steps', '--seed', '--threads', '--workers',
               '--checkpoint-every', '--keep-checkpoints', '--log-every', '--limit-train', '--num-classes', '--hflip']
words = st.text(string.ascii_letters + string.digits + '-_./', max_size=10)


@st.composite
def train_argv(draw):
    argv = ['train', draw(st.sampled_from(['gequiv_p4cnn', 'gequiv_nope', 'resnet_typo', '', '--', '-x']))]
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(TRAIN_FLAGS + ['--data', '--amp', '--tag', '--out', '--opt', '--resume',
                                                   '--model-kwargs', '--device', '--bogus']))
        if flag == '--data':
            argv += [flag, draw(st.sampled_from(['rotmnist', 'rotmnist-upright', 'mnist', '/nonexistent', '']))]
        elif flag == '--amp':
            argv += [flag, draw(st.sampled_from(['auto', 'off', 'fp16', 'fp8']))]
        elif flag in ('--tag', '--out', '--opt', '--device'):
            argv += [flag, draw(words)]
        elif flag == '--resume':
            argv += [flag]
        elif flag == '--model-kwargs':
            argv += [flag, draw(st.sampled_from(['widths=[4,4]', 'x', '1=2', 'drop_rate=0.1']))]
        elif flag == '--bogus':
            argv += [flag]
        else:
            argv += [flag, draw(numbers)]
    return argv


def _valid(argv):
    """What a run that got past validation must satisfy (a cross-check of the validator)."""
    vals = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in TRAIN_FLAGS}
    for flag in ('--epochs', '--batch-size', '--max-steps', '--keep-checkpoints', '--num-classes', '--limit-train'):
        if flag in vals:
            assert int(vals[flag]) >= 1, (flag, argv)
    for flag in ('--lr', '--clip-grad'):
        if flag in vals:
            assert math.isfinite(float(vals[flag])) and float(vals[flag]) > 0, (flag, argv)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(train_argv(), st.lists(words, max_size=3),
                 st.tuples(st.just('list'), words).map(list)))
def test_cli_fuzz_never_crashes(monkeypatch, capsys, argv):
    import gequiv_timm.cli.train as C
    import gequiv_timm.training.recipe as R
    from gequiv_timm.cli import main
    from gequiv_timm.data.catalog import DATASETS, DataBundle
    from gequiv_timm.training import DistInfo

    def reached(*a, **k):
        raise _Reached()

    def tiny(*a, **k):
        return DataBundle(torch.utils.data.TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4).long()), None)

    monkeypatch.setattr(R, 'train', reached)
    monkeypatch.setattr(R, 'load_data', lambda name, **k: tiny() if name.lower() in DATASETS
                        else (_ for _ in ()).throw(ValueError(f'--data {name!r} is neither a built-in set')))
    monkeypatch.setattr(C, 'init_distributed', lambda device=None: DistInfo())
    threads = torch.get_num_threads()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        assert e.code in (0, 2), argv
        return
    except _Reached:
        _valid(argv)
        return
    finally:
        torch.set_num_threads(threads)
        capsys.readouterr()
    assert isinstance(rc, int) and rc in (0, 2), (argv, rc)
    if argv and argv[0] == 'train':
        assert rc == 2, argv  # train never finishes here: rc 0 would mean it skipped training


# ----- torch.compile and channels_last on the G-CNN models ------------------------------------------------
# C8 / D8: the expansion there is one matmul with the fixed harmonic map; it must compile as one graph too
GCNN = ['gequiv_p4cnn', 'gequiv_p4mcnn', 'gequiv_z2cnn', 'gequiv_c8cnn', 'gequiv_d8cnn']


@pytest.mark.parametrize('name', GCNN)
def test_torch_compile_train_step_matches_eager(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model(name, widths=[4, 4, 4]).train()
    x = torch.randn(4, 1, 28, 28)
    eager = model(x)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(g_eager, model.parameters()))


def test_torch_compile_inference_matches_eager():
    torch._dynamo.reset()
    model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4]).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, backend='aot_eager')(x), model(x), atol=1e-5)


def test_torch_compile_inference_fullgraph():
    torch._dynamo.reset()
    model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4]).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)  # eager inference first fills the filter cache (the usual order: evaluate, then compile)
        assert torch.allclose(torch.compile(model, backend='aot_eager', fullgraph=True)(x), ref, atol=1e-5)


@pytest.mark.parametrize('name', GCNN)
@pytest.mark.parametrize('train_mode', [False, True])
def test_channels_last_gives_the_same_results(name, train_mode):
    from gequiv_timm.train import to_channels_last
    torch.manual_seed(0)
    model = timm.create_model(name, widths=[4, 4, 4]).train(train_mode)
    x = torch.randn(3, 1, 28, 28)
    ref = model(x)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)
    to_channels_last(model)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)


def test_module_to_channels_last():
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4]).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)  # 5-D group-conv weights are converted through their 4-D view
        assert model.stages[1].conv.weight.shape == (4, 4, 4, 3, 3)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)


# ----- every public layer that builds with its defaults: bad input is a ValueError / TypeError -----------------
def _default_layers():
    import importlib
    import inspect
    out = []
    for modname in ('gequiv_timm.layers.gconv', 'gequiv_timm.layers.stn', 'gequiv_timm.layers.rcn',
                    'gequiv_timm.layers.pde'):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in getattr(mod, '__all__', []):
            cls = getattr(mod, name)
            if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)) or inspect.isabstract(cls):
                continue
            try:
                sig = inspect.signature(cls)
            except (TypeError, ValueError):
                continue
            if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in sig.parameters.values()):
                continue
            if 'forward' not in cls.__dict__ and all('forward' not in b.__dict__ for b in cls.__mro__[1:-2]):
                continue  # abstract families (no forward of their own)
            out.append((modname.rsplit('.', 1)[1], name, cls))
    return out


# gaps in layers this test's author does not own (reported): no input check before torch computes
LAYER_GAPS: set = set()


def _layer_cases():
    cases = []
    for mod, name, cls in _default_layers():
        for kind in ('rank', 'dtype', 'not_tensor'):
            marks = [pytest.mark.xfail(strict=True, reason='no input check (reported to the owner)')] \
                if (mod, name, kind) in LAYER_GAPS else []
            cases.append(pytest.param(cls, kind, marks=marks, id=f'{mod}.{name}-{kind}'))
    return cases


@pytest.mark.parametrize('cls, kind', _layer_cases())
def test_public_layers_reject_bad_input(cls, kind):
    layer = cls()
    x = {'rank': torch.randn(4, 4), 'dtype': torch.zeros(2, 1, 4, 8, 8, dtype=torch.long)
         if 'Group' in cls.__name__ else torch.zeros(2, 1, 8, 8, dtype=torch.long), 'not_tensor': [[1.0]]}[kind]
    with pytest.raises((ValueError, TypeError)):
        layer(x)
