"""`tp-engine bench soak`, and the slow test's soak: many requests with random parameters from
client threads that come and go, some abandoned mid-stream, many sharing a prefix, then a
check that the engine gave back what it took (threads, descriptors, memory, cache blocks) and
accounted for every request."""

from __future__ import annotations

import argparse
import gc
import os
import random
import threading
import time
from dataclasses import dataclass, field

from tp_engine.engine.sampling_params import SamplingParams


@dataclass
class SoakReport:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        rows = [f"{self.requests} requests in {self.seconds:.1f} s: {self.completed} completed, "
                f"{self.aborted} aborted, {len(self.errors)} errors"]
        rows += [f"  {key:<16} {self.before[key]:>12} -> {self.after[key]:>12}"
                 for key in self.before]
        return rows


def resources(engine) -> dict[str, int]:
    """What a leak would grow: this process's threads and fds, and every process's RSS. Cyclic
    garbage is collected first: what this process made before (a test's event loop, a client's
    socket) must not close its descriptors during the soak and look like the opposite of a
    leak."""
    import psutil

    gc.collect()

    procs = [psutil.Process()] + [psutil.Process(pid) for pid in engine.worker_pids]
    return dict(threads=threading.active_count(), fds=len(os.listdir("/proc/self/fd")),
                rss_bytes=sum(p.memory_info().rss for p in procs))


# shared system prompts and few-shot preambles: the prefix cache is shared, and given back
_PREFIXES = [[random.Random(n).randrange(4, 500) for _ in range(n)] for n in (16, 33, 48)]


def random_request(rng: random.Random) -> tuple[object, SamplingParams]:
    if rng.random() < 0.4:
        prompt: object = " ".join(rng.choice(["alpha", "beta", "gamma", "délta", "東京", "🙂"])
                                  for _ in range(rng.randint(1, 40)))
    else:
        shared = rng.choice(_PREFIXES) if rng.random() < 0.5 else []
        prompt = {"prompt_token_ids": shared + [rng.randrange(4, 500)
                                                for _ in range(rng.randint(1, 60))]}
    params = SamplingParams(
        max_tokens=rng.randint(1, 48), temperature=rng.choice([0.0, 0.7, 1.0, 1.3]),
        top_p=rng.choice([1.0, 0.9, 0.5]), top_k=rng.choice([0, 1, 20]),
        seed=rng.choice([None, rng.randrange(1000)]), ignore_eos=rng.random() < 0.5,
        stop=rng.choice([None, ["a"], ["gamma", "\n"]]))
    return prompt, params


def soak(engine, requests: int, threads: int = 8, per_thread: int = 25,
         seed: int = 0) -> SoakReport:
    """`requests` spread over waves of `threads` client threads, each living for about
    `per_thread` requests; a quarter of the requests are streams closed early."""
    report = SoakReport(before=resources(engine))
    lock = threading.Lock()
    issued = iter(range(requests))
    start = time.perf_counter()

    def client(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        for _ in range(per_thread):
            with lock:
                if next(issued, None) is None:
                    return
            prompt, params = random_request(rng)
            try:
                outcome = _one(engine, rng, prompt, params)
            except Exception as e:  # counted and reported, never silent
                with lock:
                    report.errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                report.requests += 1
                if outcome == "aborted":
                    report.aborted += 1
                else:
                    report.completed += 1

    wave = 0
    while report.requests + len(report.errors) < requests:
        clients = [threading.Thread(target=client, args=(wave * threads + i,))
                   for i in range(threads)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wave += 1
    report.seconds = time.perf_counter() - start
    report.after = resources(engine)
    return report


def _one(engine, rng: random.Random, prompt: object, params: SamplingParams) -> str:
    if rng.random() < 0.25:  # a stream, abandoned after a few chunks
        text = prompt if isinstance(prompt, str) else "tokens"
        stream = engine.completions.create(prompt=text, max_tokens=params.max_tokens + 8,
                                           temperature=params.temperature, stream=True,
                                           ignore_eos=True)
        for i, _ in enumerate(stream):
            if i >= rng.randint(0, 3):
                break
        stream.close()
        return "aborted"
    out = engine.generate(prompt, params)[0]
    if out.finish_reason not in ("stop", "length"):
        raise AssertionError(f"finish_reason {out.finish_reason!r}")
    return "completed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--threads", type=int, default=8, help="client threads alive at once")


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tp_engine import Engine

    engine_kwargs.setdefault("tensor_parallel_size", 2)
    with Engine(**engine_kwargs) as engine:
        soak(engine, 64, threads=4, per_thread=8, seed=args.workload_seed)  # warm-up
        report = soak(engine, args.requests, threads=args.threads, seed=args.workload_seed + 1)
    print("\n".join(report.lines()))
    flat = report.after["threads"] == report.before["threads"] and \
        report.after["fds"] == report.before["fds"]
    return 0 if flat and not report.errors else 1
