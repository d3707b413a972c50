"""What a workload costs in floating-point operations, and what the machine could do at most:
the throughput benchmark prints both, so that a figure says how far from the hardware it is.

A token fed through the model costs two FLOPs per weight of the linear layers (q, k, v, o,
gate, up, down), and its attention four per head dimension per key it reads (scores and the
weighted values); each sampled token the LM head's two per weight. The embedding lookup, norms
and activations are left out (under 1% on the models here)."""

from __future__ import annotations

import os

from tp_engine import cpuinfo
from tp_engine.bench.common import Request
from tp_engine.model.config import ModelConfig


def workload_flops(config: ModelConfig, requests: list[Request]) -> float:
    h, dim = config.hidden_size, config.head_dim
    per_layer = (h * (config.num_heads + 2 * config.num_kv_heads) * dim      # q, k, v
                 + config.num_heads * dim * h                                 # o
                 + 3 * h * config.intermediate_size)                          # gate, up, down
    total = 0.0
    for r in requests:
        fed = len(r.prompt_ids) + r.max_tokens - 1  # the last token is sampled, never fed
        total += 2.0 * config.num_layers * per_layer * fed
        # the token at position p reads p + 1 keys
        total += 4.0 * config.num_layers * config.num_heads * dim * fed * (fed + 1) / 2
        total += 2.0 * config.vocab_size * h * r.max_tokens
    return total


def cpu_peak(dtype: str) -> tuple[float, str]:
    """The cores' nominal peak FLOP/s for `dtype` (0 where unknown) and how it was reckoned:
    cores x clock x FLOPs a cycle, the last from the widest unit the CPU reports (AMX tiles:
    1,024 bfloat16 FLOPs a cycle; AVX-512 and AVX2 with two FMA ports: 64 and 32 float32).
    AMD's Zen 4 (family 25) runs each 512-bit instruction as two 256-bit halves on its two FMA
    ports, so its AVX-512 peak is half that: 32 float32 and 64 bfloat16 FLOPs a cycle."""
    flags, mhz = cpuinfo.flags(), cpuinfo.mhz()
    cores = len(os.sched_getaffinity(0))
    info = cpuinfo.cpuinfo()
    halves = 2 if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25" else 1
    width = " in 256-bit halves" if halves > 1 else " FMA x2"
    if dtype == "bfloat16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif dtype == "bfloat16" and "avx512_bf16" in flags:
        per_cycle, unit = 128 // halves, "AVX512-BF16" + width
    elif "avx512f" in flags:
        per_cycle, unit = 64 // halves, "AVX-512" + width
    elif "fma" in flags:
        per_cycle, unit = 32, "AVX2 FMA x2"
    else:
        return 0.0, "unknown CPU"
    peak = cores * mhz * 1e6 * per_cycle
    return peak, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOPs a cycle ({unit})"
