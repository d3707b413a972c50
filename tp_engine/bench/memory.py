"""`tp-engine bench memory`: what each rank holds at several tensor-parallel sizes: its share
of the parameters (as the worker reports it), its KV cache, and its peak resident set size
(the kernel's VmHWM) after serving a few requests; and the controller's own RSS."""

from __future__ import annotations

import argparse
import os

from tp_engine.bench import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1,2,4", help="tensor-parallel sizes, comma separated")
    p.add_argument("--requests", type=int, default=8)


def status_kib(pid: int, key: str) -> int:
    """A kB figure of /proc/PID/status (VmRSS, VmHWM), 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def kv_cache_bytes(core, tp: int) -> int:
    """One rank's KV cache: blocks x block size x (keys and values) x its KV heads x dim."""
    model = core.model_config
    kv_heads = max(1, model.num_kv_heads // tp)
    itemsize = 4 if core.config.worker_dtype() == "float32" else 2
    per_block = core.config.block_size * 2 * kv_heads * model.head_dim * itemsize
    return core.replicas[0].blocks.num_blocks * per_block * model.num_layers


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tp_engine import Engine, SamplingParams

    rows = []
    for tp in [int(x) for x in args.sizes.split(",")]:
        with Engine(**{**engine_kwargs, "tensor_parallel_size": tp}) as engine:
            core = engine.core
            requests = common.workload(args.requests, (16, 64), (16, 32),
                                       core.model_config.vocab_size, args.workload_seed)
            engine.generate([{"prompt_token_ids": r.prompt_ids} for r in requests],
                            [SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                            ignore_eos=True) for r in requests])
            kv = kv_cache_bytes(core, tp)
            for group in core.groups:
                for rank, proc in enumerate(group.procs):
                    pid, params = proc.pid, group.ready[rank].param_bytes
                    name = rank if len(core.groups) == 1 else f"{group.replica}.{rank}"
                    rows.append([tp, name, f"{params / 2**20:.2f}", f"{kv / 2**20:.1f}",
                                 f"{status_kib(pid, 'VmHWM') / 1024:.0f}",
                                 f"{status_kib(pid, 'VmRSS') / 1024:.0f}"])
            rows.append([tp, "controller", "0", "0",
                         f"{status_kib(os.getpid(), 'VmHWM') / 1024:.0f}",
                         f"{status_kib(os.getpid(), 'VmRSS') / 1024:.0f}"])
    common.print_machine(common.machine({"model": engine_kwargs["model"],
                                         "device": engine_kwargs.get("device", "auto")}))
    common.print_table(
        f"memory per rank after {args.requests} requests (MiB; KV cache from the memory "
        "settings: kv_cache_memory_gb on CPU, gpu_memory_utilization on GPU)",
        ["TP", "rank", "parameters MiB", "KV cache MiB", "peak RSS MiB", "RSS MiB"], rows)
    return 0
