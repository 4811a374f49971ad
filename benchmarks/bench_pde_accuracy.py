"""One training run of a PDE-G-CNN variant (or any registered classifier) on rotated MNIST: the sweep behind the
recipe of ``gequiv_pde_cnn_rotmnist`` (see the notes in ``benchmarks/results/pde.md``).

The same protocol as ``bench_pde.py``'s accuracy section (``gequiv_timm.train.fit``: AdamW + cosine, batch 64; the
4,000 / 1,000 split and rotations of ``rotated_mnist(seed)``; the model initialised after ``torch.manual_seed(seed)``),
for one model with overridden arguments. Prints one JSON line per epoch (train loss / error, test error) and a final
``RESULT {...}`` line.

Run (one thread, niced; ~4 minutes for 3 epochs of the PDE model on an idle core):
    nice -n 10 .venv/bin/python benchmarks/bench_pde_accuracy.py --epochs 3 --lr 1e-2 --seed 0 \\
        --kwargs '{"kernel_size": [3, 3, 3], "coef_lr_mult": 1.0}' [--metric-init 1.5,2.5] [--model NAME]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='gequiv_pde_cnn_rotmnist')
    ap.add_argument('--kwargs', default='{}', help='JSON: arguments for timm.create_model (override the catalog)')
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--metric-init', default=None,
                    help='LO,HI: re-draw every metric_params uniformly in [LO, HI] (seeded) before training')
    ap.add_argument('--threads', type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import timm

    import gequiv_timm  # noqa: F401
    from gequiv_timm.data import rotated_mnist
    from gequiv_timm.train import evaluate, fit

    kwargs = json.loads(args.kwargs)
    data = rotated_mnist(args.seed, protocol='rotated')
    train_ds, test_ds = data.train.dataset(), data.test.dataset()
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, **kwargs)
    if args.metric_init:
        lo, hi = (float(v) for v in args.metric_init.split(','))
        torch.manual_seed(args.seed + 100)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith('metric_params'):
                    p.uniform_(lo, hi)
    params = sum(p.numel() for p in model.parameters())
    history = []

    def log(rec):
        rec['test_error'] = evaluate(model, test_ds)['error']
        history.append(rec)
        print(json.dumps(rec), flush=True)

    t0 = time.perf_counter()
    fit(model, train_ds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=log)
    print('RESULT', json.dumps(dict(model=args.model, kwargs=kwargs, metric_init=args.metric_init, lr=args.lr,
                                    coef_lr_mult=getattr(model, 'coef_lr_mult', None), epochs=args.epochs,
                                    seed=args.seed, params=params, test_error=history[-1]['test_error'],
                                    seconds=time.perf_counter() - t0)), flush=True)


if __name__ == '__main__':
    main()
