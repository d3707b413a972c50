"""A worker's process group: NCCL on CUDA, gloo on CPU, and a destroy that is safe twice."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tp_engine.model.parallel import TensorParallel
from tp_engine.worker.affinity import use_cores

_replica: TensorParallel | None = None  # this rank's replica, when torchrun's world has several


def init_distributed(rank: int, world_size: int, init_method: str, device: str,
                     timeout_s: float = 60.0, device_index: int | None = None,
                     ranks_here: int | None = None, bind_threads: bool = True) -> TensorParallel:
    """Join the group of `world_size` ranks. `init_method` is a `tcp://host:port` of rank 0's
    store, or `env://` under torchrun. `device_index`: the GPU (default: the local rank);
    `ranks_here`: the worker processes that share this machine's cores (default: the group);
    on a CPU each takes its share of them, its threads pinned there with `bind_threads`."""
    if device == "cuda":
        local = device_index if device_index is not None else int(
            os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
    if _replica is not None:  # torchrun's world, cut into replicas (split_replicas)
        tp = _replica
    else:
        if world_size > 1 and not dist.is_initialized():  # under torchrun it may be up already
            backend = "nccl" if device == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=rank,
                                    world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        tp = TensorParallel(rank=rank, size=world_size)
    if device != "cuda":
        # after the group: its I/O threads, started with it, stay free of the compute cores
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks_here or world_size))
        here = int(os.environ.get("LOCAL_RANK", rank if device_index is None else device_index))
        use_cores(here, ranks, bind_threads)
    return tp


def split_replicas(tensor_parallel_size: int) -> TensorParallel:
    """Cut torchrun's world into replicas of `tensor_parallel_size` consecutive ranks, each
    with a process group of its own (every rank makes every group, in the same order, as
    new_group requires); this rank's replica from now on."""
    global _replica
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world, tensor_parallel_size):
        ranks = list(range(first, first + tensor_parallel_size))
        group = dist.new_group(ranks) if tensor_parallel_size > 1 else None
        if rank in ranks:
            mine = TensorParallel(rank - first, tensor_parallel_size, group, first)
    _replica = mine
    return mine


def replica_parallel() -> TensorParallel:
    """This rank's tensor-parallel group under torchrun: its replica, else the world."""
    if _replica is not None:
        return _replica
    if not dist.is_initialized():
        return TensorParallel()
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def destroy_distributed() -> None:
    global _replica
    _replica = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" \
        else torch.device("cpu")


def share_string(value: str | None, device: str, size: int = 512) -> str:
    """The replica's first rank's `value`, on every rank of it, through a collective: how
    ranks started by torchrun learn where their controller listens (no pickling, no private
    store API)."""
    where = current_device(device)
    buf = torch.zeros(size, dtype=torch.uint8, device=where)
    if value is not None:
        data = value.encode()
        if len(data) > size:
            raise ValueError(f"{value!r} is longer than {size} bytes")
        buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    replica_parallel().broadcast_from_first(buf)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()
