"""Run a function on every rank of a real gloo process group and return rank 0's result."""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch
from conftest import free_port


def _entry(fn, rank: int, size: int, port: int, out: str, args: tuple) -> None:
    from tp_engine.worker.distributed import destroy_distributed, init_distributed

    tp = init_distributed(rank, size, f"tcp://127.0.0.1:{port}", "cpu")
    try:
        result = fn(tp, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        destroy_distributed()


def run_ranks(size: int, fn, *args, timeout: float = 90.0):
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        procs = [ctx.Process(target=_entry, args=(fn, r, size, port, out, args))
                 for r in range(size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        codes = [p.exitcode for p in procs]
        assert codes == [0] * size, f"ranks exited with {codes}"
        return torch.load(out)
