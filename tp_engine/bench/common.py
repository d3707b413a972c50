"""What every benchmark shares: the machine's description, the workload, medians, tables.

Benchmarks print markdown tables so a run can be pasted into an issue as it is. Every figure is
a median of several runs, and the machine (cores, load, torch and its threads) is printed with
it, because on a small shared machine the same code can differ by 2x from one minute to the
next."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tp_engine import cpuinfo

VOCAB_FLOOR = 4  # the tiny tokenizers' special tokens are 0..3: keep prompts to plain tokens
LOAD_AT_START = os.getloadavg()[0]  # imported when the CLI parses: the load before we ran


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int


def workload(num: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
             vocab_size: int, seed: int = 0, variant: int = 0,
             prefix: list[int] = ()) -> list[Request]:
    """`num` requests with uniform random prompt and output lengths, the same for every side
    of a comparison (a fixed seed, and nothing else draws from these generators). `variant`
    draws other prompt tokens of the same lengths: each timed run gets prompts of its own,
    which no prefix cache holds from the run before. Every prompt starts with `prefix`."""
    lengths, tokens = random.Random(seed), random.Random(f"{seed}/{variant}")
    requests = []
    for _ in range(num):
        prompt_len = lengths.randint(*prompt_range)
        max_tokens = lengths.randint(*output_range)
        requests.append(Request(list(prefix) + random_tokens(tokens, prompt_len, vocab_size),
                                max_tokens))
    return requests


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(VOCAB_FLOOR, vocab_size) for _ in range(n)]


def shared_prefix(length: int, vocab_size: int, variant: int = 0) -> list[int]:
    """A system prompt or few-shot preamble every prompt of a run starts with."""
    return random_tokens(random.Random(f"shared prefix/{variant}"), length, vocab_size)


def hit_rate(before: dict, after: dict) -> float:
    """The share of the prompt tokens admitted between two EngineCore.stats() that the prefix
    cache held."""
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    return (after["prefix_cache_hits"] - before["prefix_cache_hits"]) / max(1, queries)


def worker_threads(tp: int) -> int:
    """What a CPU worker uses (tp_engine.worker.distributed): the cores shared by the ranks."""
    return max(1, (os.cpu_count() or 1) // tp)


def machine(extra: dict[str, str] | None = None) -> dict[str, str]:
    import torch

    info = {
        "cpu": cpuinfo.model_name(),
        "cores": str(os.cpu_count()),
        "load average (1 min), start / end": f"{LOAD_AT_START:.2f} / {os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads (this process)": str(torch.get_num_threads()),
    }
    info.update(extra or {})
    return info


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median_interval(values: list[float], level: float = 0.9,
                    seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of the median: where the median of `values` lies with probability
    `level`, judging from how it varies over resamples (2,000, seeded: the same values give the
    same interval)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(2000))
    cut = int((1 - level) / 2 * len(medians))
    return medians[cut], medians[-1 - cut]


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_table(title: str, header: list[str], rows: list[list[object]],
                out=None) -> None:
    out = out or sys.stdout
    print(f"\n### {title}\n", file=out)
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "|".join("---" for _ in header) + "|", file=out)
    for row in rows:
        print("| " + " | ".join(_cell(c) for c in row) + " |", file=out)
    out.flush()


def print_machine(info: dict[str, str], out=None) -> None:
    print_table("machine", ["what", "value"], [[k, v] for k, v in info.items()], out)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1e3


def verdict(value: float, target: float | None, lower_is_better: bool = True) -> str:
    if target is None:
        return ""
    ok = value < target if lower_is_better else value >= target
    return "met" if ok else "NOT met"
