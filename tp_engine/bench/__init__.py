"""`tp-engine bench MODE`: the benchmarks, one module per mode, each printing markdown tables.

| mode | measures |
|---|---|
| throughput | offline tokens/s of `Engine.generate` against transformers' `generate` |
| latency | time to first token and per output token at fixed concurrencies |
| lifecycle | engine start (cold and warm), terminate (idle and busy), death detection |
| overhead | control-plane cost of a decode step: engine step time minus the bare forward |
| memory | parameter bytes, KV cache and peak RSS of every rank at several TP sizes |
| soak | thousands of random requests and aborts; threads, fds and RSS before and after |

Importing this package is cheap (no torch): the CLI builds its parser from it."""

from __future__ import annotations

import argparse
import importlib

MODES = {
    "throughput": "offline tokens/s against transformers' generate",
    "latency": "time to first token and per output token at fixed concurrencies",
    "lifecycle": "engine start, terminate and death detection times",
    "overhead": "control-plane cost per decode step",
    "memory": "parameter bytes and peak RSS per rank at several TP sizes",
    "soak": "random requests, aborts and client threads; resources before and after",
}


def module(mode: str):
    return importlib.import_module(f"tp_engine.bench.{mode}")


def add_mode_parsers(parser: argparse.ArgumentParser) -> None:
    """One sub-command per mode, each with the Engine flags and its own options."""
    from tp_engine.flags import add_engine_flags

    modes = parser.add_subparsers(dest="mode", required=True)
    for mode, help_text in MODES.items():
        p = modes.add_parser(mode, help=help_text, description=help_text)
        add_engine_flags(p)
        p.add_argument("--workload-seed", type=int, default=0,
                       help="seed of the random prompts and lengths")
        module(mode).add_arguments(p)


def main(args: argparse.Namespace) -> int:
    from tp_engine.flags import engine_kwargs

    if not args.model and not args.config:
        args.model = "tiny-llama"
    return module(args.mode).run(args, engine_kwargs(args))  # torchrun's overrides included
