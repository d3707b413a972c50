"""CPU workers' threads: each worker computes on a share of the cores of its own, one
intra-op thread a core, each pinned there; with --no-cpu-bind-threads they are left free."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from tp_engine import Engine
from tp_engine.worker.affinity import cores_of

pytestmark = pytest.mark.timeout(120)
CORES = sorted(os.sched_getaffinity(0))


def pinned_cores(pid: int) -> list[set[int]]:
    """The affinity of each thread of `pid` that is pinned to one core."""
    masks = [os.sched_getaffinity(t.id) for t in psutil.Process(pid).threads()]
    return [m for m in masks if len(m) == 1]


def test_cores_are_shared_out_in_contiguous_runs():
    assert cores_of(0, 1) == CORES
    if len(CORES) >= 2:
        assert cores_of(0, 2) + cores_of(1, 2) == CORES[:len(CORES) // 2 * 2]
    assert cores_of(0, len(CORES) + 1) == []  # more workers than cores: they share


def test_bind_pins_the_main_thread_and_every_openmp_thread():
    code = ("import os, threading, torch\n"
            "from tp_engine.worker.affinity import use_cores\n"
            "assert use_cores(0, 1)\n"
            "torch.randn(512, 512) @ torch.randn(512, 512)\n"
            "print(torch.get_num_threads(), sorted(os.sched_getaffinity(0)),"
            " sorted(tuple(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split(" ", 2)
    assert int(out[0]) == len(CORES)
    assert out[1].strip() == str([CORES[0]])
    masks = eval(out[2])
    for core in CORES:  # one thread on every core, the main one on the first
        assert (core,) in masks


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
@pytest.mark.parametrize("bind", [True, False])
def test_two_workers_each_take_their_own_core(tiny_model, bind):
    with Engine(tiny_model, device="cpu", dtype="float32", data_parallel_size=2,
                cpu_bind_threads=bind) as engine:
        engine.generate([{"prompt_token_ids": [5, 6, 7]}] * 2)
        per_worker = [pinned_cores(pid) for pid in engine.worker_pids]
    if not bind:
        assert per_worker == [[], []]
        return
    share = len(CORES) // 2
    for k, masks in enumerate(per_worker):
        assert sorted(next(iter(m)) for m in masks) == CORES[k * share:(k + 1) * share]
