"""A worker's process group: NCCL on CUDA, gloo on CPU, and a destroy that is safe twice."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tp_engine.model.parallel import TensorParallel


def init_distributed(rank: int, world_size: int, init_method: str, device: str,
                     timeout_s: float = 60.0) -> TensorParallel:
    """Join the group of `world_size` ranks. `init_method` is a `tcp://host:port` of rank 0's
    store, or `env://` under torchrun."""
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
    else:
        # Oversubscribed intra-op threads make CPU ranks several times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1 and not dist.is_initialized():  # under torchrun it may be up already
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return TensorParallel(rank=rank, size=world_size)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" \
        else torch.device("cpu")


def share_string(value: str | None, device: str, size: int = 512) -> str:
    """Rank 0's `value`, on every rank, through a collective: how ranks started by torchrun
    learn where the controller listens (no pickling, no private store API)."""
    where = current_device(device)
    buf = torch.zeros(size, dtype=torch.uint8, device=where)
    if value is not None:
        data = value.encode()
        if len(data) > size:
            raise ValueError(f"{value!r} is longer than {size} bytes")
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()
