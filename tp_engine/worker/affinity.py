"""Binding a CPU worker's compute threads to cores of its own.

Unbound, the kernel migrates OpenMP threads between cores and lets a worker's threads share a
core while another idles; every parallel region then waits for its slowest thread. So each
worker takes a contiguous share of the cores this process may use, and its main thread and
each OpenMP thread are pinned to one core of that share."""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)


def use_cores(worker: int, workers: int, bind: bool = True) -> bool:
    """Set this worker's intra-op threads to its share of the cores (one per core; one in all
    where workers outnumber cores), pinned there with `bind`. Returns whether pinned."""
    cores = cores_of(worker, workers)
    if not bind or not cores:
        # oversubscribed intra-op threads make CPU ranks several times slower
        torch.set_num_threads(max(1, len(cores)))
        return False
    return bind_compute_threads(cores)


def cores_of(worker: int, workers: int) -> list[int]:
    """Worker `worker`'s share of the usable cores, or [] where there are fewer cores than
    workers (they then share every core)."""
    usable = sorted(os.sched_getaffinity(0))
    per = len(usable) // max(1, workers)
    return usable[worker * per:(worker + 1) * per] if per else []


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def bind_compute_threads(cores: list[int]) -> bool:
    """Use one intra-op thread per core of `cores`, each pinned to its core. Call before the
    first parallel region of the process: the OpenMP threads are found as the ones it starts.
    Returns whether every thread was pinned (else they all share `cores`)."""
    if not cores:
        return False
    torch.set_num_threads(len(cores))
    before = _threads()
    torch.empty(1 << 22).fill_(1.0)  # large enough to start every OpenMP thread
    started = sorted(_threads() - before)
    main = threading.get_native_id()
    if len(started) != len(cores) - 1:
        log.debug("found %d new threads for %d cores: not pinned one by one",
                  len(started), len(cores))
        for tid in [main, *started]:
            os.sched_setaffinity(tid, cores)
        return False
    for tid, core in zip([main, *started], cores):
        os.sched_setaffinity(tid, {core})
    return True
