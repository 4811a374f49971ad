"""`gequiv-timm train` under torchrun: 2 CPU processes (gloo, DistributedDataParallel) with batch B reach the same
weights as 1 process with batch 2B; only rank 0 logs and writes weights; every rank saves its RNG state."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gequiv_timm.cli import main
from gequiv_timm.training import verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name('torchrun')
STEPS = 4
# frozen batch norm: torch's SyncBatchNorm is CUDA-only, and per-process batch statistics would (rightly) differ
COMMON = ['gequiv_p4cnn', '--epochs', '1', '--max-steps', str(STEPS), '--limit-train', '64', '--limit-eval', '50',
          '--threads', '1', '--freeze-bn', '--no-progress', '--model-kwargs', 'widths=[4,4,4]', '--log-every', '1',
          '--seed', '1', '--checkpoint-every', '2']


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which('torchrun') is None, reason='torchrun not installed')
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which('torchrun')
    ddp_out, log, ck = tmp_path / 'ddp.safetensors', tmp_path / 'ddp.jsonl', tmp_path / 'ck'
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    cmd = [torchrun, '--standalone', '--nproc_per_node=2', '-m', 'gequiv_timm.cli', 'train', *COMMON,
           '--batch-size', '4', '--out', str(ddp_out), '--metrics-log', str(log), '--checkpoint-dir', str(ck)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # rank 0 alone reports, logs and writes
    reports = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{')]
    assert len(reports) == 1 and reports[0]['processes'] == 2 and reports[0]['steps'] == STEPS
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r['step'] for r in rows if r['kind'] == 'step'] == list(range(1, STEPS + 1))
    last = ck / f'step_{STEPS:08d}'
    assert sorted(p.name for p in last.iterdir()) == ['manifest.json', 'model.safetensors', 'rng-rank0.safetensors',
                                                      'rng-rank1.safetensors', 'state.safetensors']
    verify_checkpoint(last)  # the manifest written by rank 0 lists rank 1's RNG file too
    assert 'rng-rank1.safetensors' in json.loads((last / 'manifest.json').read_text())['files']

    one_out, small_out = tmp_path / 'one.safetensors', tmp_path / 'small.safetensors'
    assert main(['train', *COMMON, '--batch-size', '8', '--out', str(one_out)]) == 0
    assert main(['train', *COMMON, '--batch-size', '4', '--out', str(small_out)]) == 0
    ddp, one, small = load_file(str(ddp_out)), load_file(str(one_out)), load_file(str(small_out))
    init_moved = _max_diff(one, small)
    assert init_moved > 1e-3, 'the comparison is vacuous: batch 4 and batch 8 should train differently'
    assert _max_diff(ddp, one) < 1e-5
