"""torch.compile and channels_last on every registered model, and training-step speed side by side.

Part 1 (compatibility): for each ``gequiv_*`` model, one training step (forward + backward, train mode) and one
inference call (eval mode, after an eager call) under ``torch.compile(backend='aot_eager', fullgraph=True)``;
a failure is recorded with dynamo's reason (the first line). ``aot_eager`` traces exactly what inductor would
compile, without generating code, so it answers "does it compile as one graph" quickly.

Part 2 (speed, G-CNN models): the median time of one training step (batch 64, 28x28), eager vs channels_last vs
torch.compile (inductor), interleaved step by step in one run, reported as speed-ups over eager.

    nice -n 10 .venv/bin/python benchmarks/bench_train.py [--models PATTERN] [--skip-speed]

Writes benchmarks/results/train_compile.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def compat(name: str) -> dict:
    import timm
    torch._dynamo.reset()
    rec = {'model': name}
    try:
        model = timm.create_model(name)
    except Exception as e:  # noqa: BLE001 - recorded
        return dict(rec, create=_first_line(e))
    c, h, w = model.pretrained_cfg['input_size']
    x = torch.randn(2, c, h, w)
    torch.manual_seed(0)
    model.train()
    try:
        out = torch.compile(model, backend='aot_eager', fullgraph=True)(x)
        loss = (out if isinstance(out, torch.Tensor) else out[0]).float().sum()
        loss.backward()
        rec['train_fullgraph'] = 'ok'
    except Exception as e:  # noqa: BLE001
        rec['train_fullgraph'] = _first_line(e)
    torch._dynamo.reset()
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
            got = torch.compile(model, backend='aot_eager', fullgraph=True)(x)
        same = torch.allclose(got, ref, atol=1e-4) if isinstance(ref, torch.Tensor) else True
        rec['eval_fullgraph'] = 'ok' if same else 'compiled output differs from eager'
    except Exception as e:  # noqa: BLE001
        rec['eval_fullgraph'] = _first_line(e)
    try:
        model.to(memory_format=torch.channels_last)
        rec['module_to_channels_last'] = 'ok'
    except Exception as e:  # noqa: BLE001
        rec['module_to_channels_last'] = _first_line(e)
    return rec


def _stepper(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def speed(name: str, batch: int = 64, reps: int = 15) -> dict:
    """Median step time of eager / channels_last / inductor, the variants interleaved step by step (so that the
    load of a shared machine hits them alike: :func:`gequiv_timm.measure.time_round_robin`)."""
    import timm
    from torch._dynamo.utils import counters

    from gequiv_timm.measure import time_round_robin
    from gequiv_timm.train import to_channels_last
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    torch._dynamo.reset()
    counters.clear()
    variants = {}
    torch.manual_seed(0)
    variants['eager'] = _stepper(timm.create_model(name).train(), x, y)
    torch.manual_seed(0)
    variants['channels_last'] = _stepper(to_channels_last(timm.create_model(name).train()),
                                         x.contiguous(memory_format=torch.channels_last), y)
    torch.manual_seed(0)
    variants['inductor'] = _stepper(torch.compile(timm.create_model(name).train()), x, y)
    out = {'model': name, 'batch': batch, 'reps': reps}
    t = time.perf_counter()
    for _ in range(2):  # warm-up; compiles the inductor variant
        for f in variants.values():
            f()
    out['warmup_s'] = round(time.perf_counter() - t, 1)
    for k, v in time_round_robin(variants, reps=reps, warmup=0).items():
        out[f'{k}_s'] = v
    out['dynamo_graphs'] = int(counters['stats'].get('unique_graphs', 0))
    out['dynamo_graph_breaks'] = int(sum(counters['graph_break'].values()))
    return out


def main() -> None:
    import timm

    import gequiv_timm  # noqa: F401
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', default='gequiv_*')
    ap.add_argument('--skip-speed', action='store_true')
    ap.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'train_compile.json'))
    args = ap.parse_args()
    res = {'torch': torch.__version__, 'timm': timm.__version__, 'threads': 1, 'compat': [], 'speed': []}
    for name in timm.list_models(args.models):
        r = compat(name)
        res['compat'].append(r)
        print(f"{name:30s} train={r.get('train_fullgraph', r.get('create'))[:60]:60s} "
              f"eval={r.get('eval_fullgraph', '-')[:50]}", flush=True)
    if not args.skip_speed:
        for name in ('gequiv_z2cnn', 'gequiv_p4cnn', 'gequiv_p4mcnn'):
            s = speed(name)
            res['speed'].append(s)
            print(f"{name:16s} eager {s['eager_s'] * 1e3:7.1f} ms/step (median of {s['reps']})   speed-up: "
                  f"channels_last x{s['eager_s'] / s['channels_last_s']:.2f}   inductor "
                  f"x{s['eager_s'] / s['inductor_s']:.2f} ({s['dynamo_graphs']} graphs, "
                  f"{s['dynamo_graph_breaks']} breaks)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + '\n')
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
