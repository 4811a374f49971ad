"""Nothing in gequiv_timm ever unpickles: every loading path runs with ``torch.load`` and ``pickle`` made to fail,
and every path that would need a pickle (a ``.pth`` / ``.bin`` file, a ``url`` source, a repo with only
``pytorch_model.bin``) is refused by name, with the conversion to safetensors as the fix.

Also the dtype probe of issue 15 through every path that reads weights: an int32, a bool and a float16 copy of a
checkpoint (int32 gave logits near 1e34 before, and ``push --dry-run`` said "exported and verified").
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gequiv_timm  # noqa: F401
import timm
from gequiv_timm import hub, weights
from gequiv_timm.cli import main as cli_main
from gequiv_timm.models.stems import inject_equivariant_stem, load_backbone_checkpoint
from gequiv_timm.weights import WeightsError

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn  # noqa: E402

NAME, TAG = 'gequiv_p4cnn', 'rotmnist'


class _NoUnpickler:
    def __init__(self, *a, **k):
        raise AssertionError('something tried to unpickle (pickle.Unpickler)')


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError('something tried to unpickle')
    for mod, attr in ((torch, 'load'), (torch.serialization, 'load'), (pickle, 'load'), (pickle, 'loads')):
        monkeypatch.setattr(mod, attr, refuse)
    monkeypatch.setattr(pickle, 'Unpickler', _NoUnpickler)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('np')
    torch.manual_seed(0)
    model = timm.create_model(NAME).eval()
    hub.save_weights(model, d / 'p4.safetensors', NAME, TAG, 'rotmnist/untrained/seed0')
    torch.manual_seed(1)
    r18 = {k: v.contiguous() for k, v in timm.create_model('resnet18').state_dict().items()}
    save_file(r18, str(d / 'resnet18.safetensors'))
    return model, d / 'p4.safetensors', d / 'resnet18.safetensors'


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_loading_path_runs_without_unpickling(ckpt, tmp_path, monkeypatch, no_pickle):
    model, path, r18 = ckpt
    paths = []
    # the shipped weights of a tag, and a file given by the user
    timm.create_model(f'{NAME}.{TAG}', pretrained=True)
    paths.append('shipped tag')
    assert _same(timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), model)
    paths.append('file overlay')
    # load_weights, export + reload through local-dir (push --dry-run's verification), check_entry
    target = timm.create_model(NAME)
    weights.load_weights(target, path)
    assert _same(target, model)
    rc = cli_main(['push', f'{NAME}.{TAG}', '--repo', 'o/n', '--dry-run', '--checkpoint', str(path),
                   '--export-dir', str(tmp_path / 'e')])
    assert rc == 0
    assert _same(timm.create_model(f'local-dir:{tmp_path / "e"}', pretrained=True), model)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    hub.check_entry(f'{NAME}.{TAG}', {'file': path.name, 'sha256': sha, 'size': path.stat().st_size}, path.parent)
    paths += ['load_weights', 'push --dry-run', 'local-dir', 'check_entry']
    # a stem model on a plain backbone checkpoint, and on an instance
    stem = timm.create_model('gequiv_p4_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(r18)))
    load_backbone_checkpoint(inject_equivariant_stem('resnet18', 'p4'), r18)
    paths += ['stem pretrained', 'load_backbone_checkpoint']
    assert stem.pretrained_load_report['loaded']
    # the Hub: a repo that also holds a pickle (never requested)
    import huggingface_hub.constants as C
    with HubStandIn(token='t', max_lifetime=120) as server:
        monkeypatch.setattr(C, 'ENDPOINT', server.url)
        monkeypatch.setattr(C, 'HUGGINGFACE_CO_URL_TEMPLATE', server.url + '/{repo_id}/resolve/{revision}/{filename}')
        server.seed('org/np', {'config.json': json.dumps(hub.build_config(model, NAME, TAG)).encode(),
                               'model.safetensors': path.read_bytes(), 'pytorch_model.bin': b'\x80\x04never'})
        assert _same(timm.create_model('hf-hub:org/np', pretrained=True, cache_dir=tmp_path / 'c'), model)
        assert not any('pytorch_model.bin' in p for _, p, *_ in server.log)
    paths.append('hf-hub')
    # training: initial weights, then a resume from its checkpoint folder
    common = ['train', NAME, '--data', 'rotmnist', '--limit-train', '16', '--limit-eval', '16', '--batch-size', '8',
              '--epochs', '1', '--threads', '1', '--no-progress', '--initial-checkpoint', str(path),
              '--checkpoint-dir', str(tmp_path / 'ck'), '--checkpoint-every', '1']
    assert cli_main(common + ['--max-steps', '1']) == 0
    assert cli_main(common + ['--max-steps', '2', '--resume']) == 0
    paths += ['train --initial-checkpoint', 'train --resume']
    assert paths == ['shipped tag', 'file overlay', 'load_weights', 'push --dry-run', 'local-dir', 'check_entry',
                     'stem pretrained', 'load_backbone_checkpoint', 'hf-hub', 'train --initial-checkpoint',
                     'train --resume']


@pytest.mark.parametrize('how', ['pth-file', 'bin-in-local-dir', 'url-overlay', 'url-only-cfg', 'backbone-pth'])
def test_pickle_sources_are_refused_by_name(ckpt, tmp_path, no_pickle, how):
    model, path, _ = ckpt
    pth = tmp_path / 'model.pth'
    pth.write_bytes(b'\x80\x04never read')
    if how == 'pth-file':
        call, match = (lambda: timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(pth))),
                       r'model.pth: not a .safetensors file.*safetensors.torch.save_file')
    elif how == 'bin-in-local-dir':
        (tmp_path / 'config.json').write_text(json.dumps(hub.build_config(model, NAME, TAG)))
        (tmp_path / 'pytorch_model.bin').write_bytes(b'\x80\x04never read')
        call, match = (lambda: timm.create_model(f'local-dir:{tmp_path}', pretrained=True),
                       r'no model.safetensors there; gequiv_timm loads safetensors only')
    elif how == 'url-overlay':
        call, match = (lambda: timm.create_model(NAME, pretrained=True,
                                                 pretrained_cfg_overlay=dict(url='https://x/y.pth')),
                       r"url='https://x/y.pth' is not supported.*never unpickles.*safetensors.torch.save_file")
    elif how == 'url-only-cfg':
        call, match = (lambda: timm.create_model(NAME, pretrained=True, pretrained_cfg=dict(
            architecture=NAME, url='https://x/y.pth', num_classes=10, input_size=(1, 28, 28))),
                       r"its only weights are at url 'https://x/y.pth', a pickled .pth checkpoint")
    else:
        call, match = (lambda: load_backbone_checkpoint(inject_equivariant_stem('resnet18', 'p4'), pth),
                       r"model.pth: not a .safetensors file.*save_file\(state_dict, 'model.safetensors'\)")
    with pytest.raises(WeightsError, match=match):
        call()


# ----- the dtype probe through every path that reads weights ---------------------------------------------------
@pytest.fixture(scope='module')
def probes(ckpt, tmp_path_factory):
    model, _, _ = ckpt
    d = tmp_path_factory.mktemp('probe')
    out = {}
    for dt in (torch.int32, torch.bool, torch.float16):
        f = d / f'{str(dt).split(".")[1]}.safetensors'
        save_file({k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
                  str(f), metadata={'architecture': NAME})
        out[dt] = f
    return out


def _via_create(f, tmp_path):
    return timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)))


def _via_load_weights(f, tmp_path):
    return weights.load_weights(timm.create_model(NAME), f)


def _via_local_dir(f, tmp_path):
    d = tmp_path / 'ld'
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(hub.build_config(timm.create_model(NAME), NAME, TAG)))
    (d / 'model.safetensors').write_bytes(Path(f).read_bytes())
    return timm.create_model(f'local-dir:{d}', pretrained=True)


def _via_push_dry_run(f, tmp_path):
    return cli_main(['push', f'{NAME}.{TAG}', '--repo', 'o/n', '--dry-run', '--checkpoint', str(f)])


def _via_export(f, tmp_path):
    return cli_main(['export', f'{NAME}.{TAG}', str(tmp_path / 'x'), '--checkpoint', str(f)])


def _via_train(f, tmp_path):
    return cli_main(['train', NAME, '--data', 'rotmnist', '--limit-train', '16', '--limit-eval', '16', '--epochs', '1',
                     '--max-steps', '1', '--batch-size', '8', '--threads', '1', '--no-progress',
                     '--initial-checkpoint', str(f), '--out', str(tmp_path / 'o.safetensors')])


_PATHS = [_via_create, _via_load_weights, _via_local_dir, _via_push_dry_run, _via_export, _via_train]


@pytest.mark.parametrize('via', _PATHS, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize('dtype', [torch.int32, torch.bool, torch.float16], ids=str)
def test_dtype_probe_through_every_path(probes, tmp_path, capsys, via, dtype):
    f = probes[dtype]
    if dtype == torch.float16:  # a precision of the same kind: loads, cast (the documented policy)
        res = via(f, tmp_path)
        assert res in (0, ([], [])) or isinstance(res, torch.nn.Module)
        return
    cli = via in (_via_push_dry_run, _via_export, _via_train)
    if cli:
        assert via(f, tmp_path) != 0
        io_ = capsys.readouterr()
        assert 'wrong dtypes' in io_.err and f'file {dtype}' in io_.err
        assert 'verified' not in io_.out and 'exported' not in io_.out and 'Traceback' not in io_.err
        assert not (tmp_path / 'x' / 'model.safetensors').exists() and not (tmp_path / 'o.safetensors').exists()
    else:
        with pytest.raises(WeightsError, match=rf'wrong dtypes \(\d+\): .*file {dtype} vs model torch.float32'):
            via(f, tmp_path)

