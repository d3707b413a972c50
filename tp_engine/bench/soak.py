"""`tp-engine bench soak`: thousands of requests with random parameters, random aborts and
client threads coming and going; prints what was served and the resources before and after."""

from __future__ import annotations

import argparse

from tp_engine.soak import soak


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
