"""Where a process sits in a ``torchrun`` job, joining the process group, and all-reducing numbers."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

__all__ = ['DistInfo', 'init_distributed', 'all_sum']


@dataclass
class DistInfo:
    """Where this process sits in a ``torchrun`` job (``world_size == 1`` outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    backend: str = ''

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def _device(device: Optional[str], world: int, local: int) -> torch.device:
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if not device.startswith('cuda'):
        return torch.device(device)
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    dev = torch.device('cuda', local if world > 1 else (torch.device(device).index or 0))
    torch.cuda.set_device(dev)
    return dev


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a plain process gets ``world_size == 1``.

    The backend is ``nccl`` when training on CUDA and ``gloo`` on the CPU. ``device`` is ``'cpu'``, ``'cuda'`` or
    ``None`` (CUDA when available); under torchrun each process takes GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    info = DistInfo(rank, world, local, _device(device, world, local), '')
    if world > 1:
        info.backend = 'nccl' if info.device.type == 'cuda' else 'gloo'
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=info.backend)
    return info


def all_sum(values: List[float], dist: DistInfo) -> List[float]:
    """Element-wise sum of ``values`` over every process (the values themselves outside torchrun)."""
    if not dist.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()
