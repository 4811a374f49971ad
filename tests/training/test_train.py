"""`gequiv-timm train` and gequiv_timm.train: the fit/evaluate API other modules use, the CLI the lead uses, image
folders through timm's data factories, layer decay through group_matcher, metrics logs, precision and memory format."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import gequiv_timm  # noqa: F401
import gequiv_timm.train as T
from gequiv_timm.cli import main
from gequiv_timm.hub import load_weights, read_metadata

SMALL = ['--model-kwargs', 'widths=[4,4,4]', '--threads', '1', '--no-progress']


def _digits(n=128, seed=0):
    from gequiv_timm.data import rotated_mnist
    d = rotated_mnist(0)
    idx = torch.randperm(len(d.train), generator=torch.Generator().manual_seed(seed))[:n]
    return d.train.dataset(), torch.utils.data.Subset(d.train.dataset(), idx.tolist())


def test_fit_keyword_api_is_deterministic_for_a_seed():
    _, sub = _digits(96)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4])
        res = T.fit(model, sub, epochs=1, batch_size=32, lr=3e-3, weight_decay=1e-4, seed=5, progress=False,
                    time_budget=None, augment=lambda x, g: x + 0.01 * torch.randn(x.shape, generator=g),
                    desc='t')
        ev = T.evaluate(model, sub)
        results.append((res, ev, [p.detach().clone() for p in model.parameters()]))
    (r1, e1, p1), (r2, e2, p2) = results
    assert r1.steps == r2.steps == 3 and r1.epochs == 1 and len(r1.history) == 1
    assert e1 == e2 and set(e1) == {'error', 'loss', 'n'} and e1['n'] == 96
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_lead_command_writes_weights_and_manifest(tmp_path, capsys):
    out, man = tmp_path / 'weights' / 'x.safetensors', tmp_path / 'weights' / 'manifest.json'
    rc = main(['train', 'gequiv_p4cnn', '--data', 'rotmnist', '--epochs', '1', '--seed', '0', '--out', str(out),
               '--tag', 'rotmnist', '--manifest', str(man), '--limit-train', '64', '--limit-eval', '100', *SMALL])
    assert rc == 0
    report = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith('{')][0])
    assert report['model'] == 'gequiv_p4cnn' and 0 <= report['test_error'] <= 1 and report['steps'] == 1
    entry = json.loads(man.read_text())['gequiv_p4cnn.rotmnist']
    assert entry['file'] == 'x.safetensors' and entry['metrics']['test_error'] == report['test_error']
    assert 'hf_hub_id' not in entry and entry['command'].startswith('gequiv-timm')  # the repo: registry.hub_id
    meta = read_metadata(out)
    assert meta['architecture'] == 'gequiv_p4cnn' and meta['tag'] == 'rotmnist'
    load_weights(timm.create_model('gequiv_p4cnn', widths=[4, 4, 4]), out, architecture='gequiv_p4cnn')


def _write_folder(root: Path, per_class=(8, 4)):
    from PIL import Image

    from gequiv_timm.data import load_mnist
    images, labels = load_mnist()
    for split, n in zip(('train', 'val'), per_class):
        for c in (0, 1, 7):
            idx = (labels == c).nonzero().flatten()
            idx = idx[:n] if split == 'train' else idx[-n:]
            d = root / split / f'digit{c}'
            d.mkdir(parents=True)
            for i in idx.tolist():
                Image.fromarray((images[i, 0] * 255).byte().numpy(), mode='L').save(d / f'{i}.png')


def test_image_folder_uses_timm_factories_and_the_model_data_config(tmp_path, capsys):
    _write_folder(tmp_path / 'pngs')
    model = timm.create_model('gequiv_p4cnn')
    cfg = timm.data.resolve_data_config(model=model)
    data = T.load_data(str(tmp_path / 'pngs'), seed=0, data_config=cfg, augment=False)
    assert data.num_classes == 3 and data.in_chans == 1 and len(data.train) == 24 and len(data.eval) == 12
    x, y = data.eval[0]
    assert x.shape == (1, 28, 28) and y == 0
    from PIL import Image
    png = sorted((tmp_path / 'pngs' / 'val' / 'digit0').iterdir())[0]
    raw = torch.from_numpy(np.array(Image.open(png))).float().view(1, 28, 28) / 255
    assert torch.allclose(x, (raw - cfg['mean'][0]) / cfg['std'][0], atol=1e-5)  # model's mean/std, no resize
    # augmentation is seeded per (seed, epoch, index): identical draws for the same sample, new ones next epoch
    aug = T.load_data(str(tmp_path / 'pngs'), seed=0, data_config=cfg, augment=True).train
    a0 = aug[3][0]
    assert torch.equal(a0, aug[3][0])
    aug.set_epoch(1)
    assert not torch.equal(a0, aug[3][0])
    rc = main(['train', 'gequiv_p4cnn', '--data', str(tmp_path / 'pngs'), '--epochs', '2', '--batch-size', '8',
               '--out', str(tmp_path / 'w.safetensors'), *SMALL])
    assert rc == 0
    report = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith('{')][0])
    assert report['steps'] == 6 and '12 held-out' in report['test_split']
    w = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4], num_classes=3)
    load_weights(w, tmp_path / 'w.safetensors')


def test_layer_decay_through_group_matcher_and_csv_log(tmp_path):
    ck, log = tmp_path / 'ck', tmp_path / 'm.csv'
    rc = main(['train', 'gequiv_p4cnn', '--epochs', '1', '--max-steps', '3', '--limit-train', '64',
               '--batch-size', '16',
               '--layer-decay', '0.5', '--checkpoint-dir', str(ck), '--metrics-log', str(log), '--log-every', '1',
               '--limit-eval', '20', *SMALL])
    assert rc == 0
    state = T.load_state(T.CheckpointManager(ck).latest() / 'state.safetensors')
    scales = sorted({round(g['lr_scale'], 6) for g in state['optimizer']['param_groups']})
    # stem (stage 0), stages 1-2 and the head: 0.5 ** 3 ... 1 (timm's param_groups_layer_decay)
    assert scales == [0.125, 0.25, 0.5, 1.0]
    rows = list(csv.DictReader(log.open()))
    assert [r['kind'] for r in rows] == ['step', 'step', 'step', 'final'] and tuple(rows[0]) == T.LOG_FIELDS
    lrs = [float(r['lr']) for r in rows[:3]]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # the cosine schedule steps per update


def test_precision_and_memory_format(tmp_path, capsys):
    _, sub = _digits(32)
    data = T.DataBundle(sub, None)
    runs = {}
    for name, kw in {'fp32': {}, 'cl': dict(channels_last=True), 'bf16': dict(amp='bf16')}.items():
        torch.manual_seed(0)
        model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4])
        cfg = T.TrainConfig(epochs=1, batch_size=16, progress=False, **kw)
        T.train(model, data, cfg)
        runs[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(runs['fp32'], runs['cl'], atol=1e-5)
    assert torch.isfinite(runs['bf16']).all() and not torch.equal(runs['bf16'], runs['fp32'])
    assert main(['train', 'gequiv_p4cnn', '--amp', 'fp16', '--device', 'cpu', '--max-steps', '1', *SMALL]) == 2
    assert 'fp16 needs a CUDA device' in capsys.readouterr().err


def test_unknown_data_lists_the_built_in_sets(capsys):
    assert main(['train', 'gequiv_p4cnn', '--data', 'imagenet-please', *SMALL]) == 2
    err = capsys.readouterr().err
    assert 'rotmnist' in err and 'neither a built-in set' in err


@pytest.mark.skipif(importlib.util.find_spec('gequiv_timm.data.distorted') is None, reason='no distorted MNIST')
def test_distorted_mnist_rts(capsys):
    assert main(['train', 'gequiv_p4cnn', '--data', 'distorted-rts', '--max-steps', '2', '--limit-train', '32',
                 '--limit-eval', '20', '--batch-size', '16', *SMALL]) == 0
    report = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith('{')][0])
    assert report['steps'] == 2 and 'test_error' in report


@pytest.mark.skipif(importlib.util.find_spec('gequiv_timm.data.landmarks') is None, reason='no MNIST landmarks')
def test_landmarks_keypoint_task_with_a_classifier_head_and_a_heatmap_model():
    data = T.load_data('landmarks', limit_train=32, limit_eval=16)
    assert data.task == 'keypoints' and data.num_keypoints == 5
    torch.manual_seed(0)
    model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4], num_classes=2 * data.num_keypoints)
    before = T.evaluate_task(model, data.eval, 'keypoints', num_keypoints=5)
    res = T.train(model, data, T.TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False))
    assert set(res.eval) == {'nme', 'loss', 'n'} and res.eval['n'] == 16
    assert res.eval['loss'] < before['loss']
    # a heatmap keypoint model through the CLI: one map per keypoint, spatial-softmax loss, NME reported
    assert main(['train', 'gequiv_rcn_paper', '--data', 'landmarks', '--max-steps', '1', '--limit-train', '8',
                 '--limit-eval', '8', '--batch-size', '8', '--threads', '1', '--no-progress']) == 0
    with pytest.raises(ValueError, match='num_classes=10'):
        T.train(timm.create_model('gequiv_p4cnn', widths=[4, 4, 4], num_classes=3), data,
                T.TrainConfig(epochs=1, batch_size=16, progress=False))


FAKE_TIMM_TRAIN = '''
import argparse, json, sys
import timm, torch
from timm.data import resolve_data_config
p = argparse.ArgumentParser()
p.add_argument('data_dir')
p.add_argument('--model', default='resnet50')
p.add_argument('--in-chans', type=int, default=None)
p.add_argument('--num-classes', type=int, default=None)
args = p.parse_args()
model = timm.create_model(args.model, in_chans=args.in_chans, num_classes=args.num_classes)
cfg = resolve_data_config(model=model)
out = model(torch.randn(2, *cfg['input_size']))
print(json.dumps({'name': __name__, 'argv0': sys.argv[0], 'data_dir': args.data_dir, 'out': list(out.shape),
                  'registered': 'gequiv_timm' in sys.modules}))
sys.exit(3 if args.data_dir == 'fail' else 0)
'''


def test_timm_train_wrapper_registers_models_and_forwards_arguments(tmp_path):
    import os
    import subprocess
    import sys
    script = tmp_path / 'train.py'
    script.write_text(FAKE_TIMM_TRAIN)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS='1')
    run = [sys.executable, '-m', 'gequiv_timm.timm_train']
    p = subprocess.run(run + [str(script), 'digits', '--model', 'gequiv_p4cnn', '--in-chans', '1', '--num-classes',
                              '3'], env=env, check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep == {'name': '__main__', 'argv0': str(script), 'data_dir': 'digits', 'out': [2, 3], 'registered': True}
    from gequiv_timm.timm_train import main as wrapper
    assert wrapper([str(script), 'fail', '--model', 'gequiv_z2cnn']) == 3  # the script's own exit status
    assert wrapper([]) == 2 and wrapper([str(tmp_path / 'missing.py')]) == 2


def test_fit_honours_model_param_groups_and_transform_loss():
    """An STN's transformer trains at its own rate (here 0: frozen) and its regulariser joins the loss."""
    import timm
    from gequiv_timm.train import fit
    torch.manual_seed(0)
    model = timm.create_model('gequiv_stn_cnn_mnist', loc_lr_mult=0.0)
    stn_before = [p.detach().clone() for p in model.stn_parameters()]
    rest_before = [p.detach().clone() for n, p in model.named_parameters() if not n.startswith('stn.')]
    x, y = torch.randn(32, 1, 42, 42), torch.randint(0, 10, (32,))
    fit(model, torch.utils.data.TensorDataset(x, y), epochs=1, batch_size=16, lr=1e-2, weight_decay=0.0)
    assert all(torch.equal(a, b.detach()) for a, b in zip(stn_before, model.stn_parameters()))
    rest_after = [p.detach() for n, p in model.named_parameters() if not n.startswith('stn.')]
    assert any(not torch.equal(a, b) for a, b in zip(rest_before, rest_after))


def _tiny_stepper(lr=1e-2, clip_grad=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    return model, T.Stepper(model, model, opt, scaler, torch.device('cpu'), clip_grad=clip_grad)


@pytest.mark.parametrize('where', ['loss nan', 'loss inf', 'gradient nan', 'gradient nan, clipped'])
def test_a_diverging_step_is_a_typed_one_line_error_and_leaves_the_weights_finite(where):
    model, stepper = _tiny_stepper(clip_grad=1.0 if 'clipped' in where else None)
    x, y = torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))
    stepper((x, y), 1)  # a good step first
    before = [p.detach().clone() for p in model.parameters()]
    if where.startswith('loss'):
        x[3] = float(where.split()[1])
    else:  # a finite loss with a NaN gradient (sqrt at 0: an infinite slope times a zero one)
        stepper.loss_fn = lambda out, t: torch.nn.functional.cross_entropy(out, t) + (out.sum() * 0).abs().sqrt()
    with pytest.raises(T.TrainingDiverged) as info:
        stepper((x, y), 2)
    e = info.value
    assert isinstance(e, RuntimeError) and e.step == 2 and '\n' not in str(e)
    assert ('loss is' in str(e)) == where.startswith('loss') and (e.grad_norm is None) == where.startswith('loss')
    for fix in ('step 2', '--lr', '--clip-grad', '--amp off'):
        assert fix in str(e)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the bad step changed nothing


def test_train_raises_training_diverged_from_the_engine():
    x, y = torch.full((16, 1, 28, 28), float('nan')), torch.zeros(16, dtype=torch.long)
    model = timm.create_model('gequiv_p4cnn', widths=[4, 4, 4])
    with pytest.raises(T.TrainingDiverged, match=r'the loss is nan at step 1\. Lower the learning rate'):
        T.train(model, T.DataBundle(torch.utils.data.TensorDataset(x, y), None),
                T.TrainConfig(epochs=1, batch_size=8, progress=False))
    assert all(torch.isfinite(p).all() for p in model.parameters())
