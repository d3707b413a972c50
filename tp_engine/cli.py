"""`tp-engine` (also `python -m tp_engine`): one subcommand per entry point. Every subcommand
that runs an engine takes `--config FILE.yaml` and the Engine keywords as flags, one per
`EngineConfig` field. Errors are one line on stderr and exit 1 (`--debug`: the traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tp_engine.config import EngineConfig
from tp_engine.errors import ConfigError, EngineError
from tp_engine.flags import add_engine_flags, engine_kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from tp_engine import Engine

    with Engine(**engine_kwargs(args)) as engine:
        create = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.sample_seed, stream=True)
        try:
            if args.chat:
                stream = engine.chat.completions.create(
                    messages=[{"role": "user", "content": args.prompt}], **create)
                pieces = (c.choices[0].delta.content for c in stream if c.choices)
            else:
                stream = engine.completions.create(prompt=args.prompt, **create)
                pieces = (c.choices[0].text for c in stream if c.choices)
            for piece in pieces:
                print(piece or "", end="", flush=True)
        except EngineError:
            print(flush=True)  # the partial output ends its line; main() says what failed
            raise
        print()
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from tp_engine.checkpoints.tiny import make_tiny_model

    path = make_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(path)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from tp_engine import AsyncEngine
    from tp_engine.batch import EXIT_PREEMPTED, run_batch
    from tp_engine.batch_parts import mark_complete, merge, wait_for_parts

    index, replicas = getattr(args, "share", (0, 1))  # a replica's share, under torchrun
    output = Path(args.output)

    async def main() -> int:
        engine = AsyncEngine(**engine_kwargs(args))
        try:
            summary = await run_batch(engine, Path(args.input), output, args.max_in_flight,
                                      progress=not args.no_progress, share=(index, replicas))
        except OSError as e:  # the output cannot be written: say which file, and why
            print(f"error: cannot write {args.output}: {e}; what is there is kept, "
                  "rerun to finish", file=sys.stderr)
            return 1
        finally:
            engine.terminate()
        print(summary.line() if replicas == 1 else f"replica {index}: {summary.line()}",
              file=sys.stderr)
        if summary.preempted:
            return EXIT_PREEMPTED
        if replicas > 1:
            mark_complete(output, index, replicas)
            if index == 0:  # the first replica merges, once every part is complete
                if not await wait_for_parts(output, replicas):
                    return EXIT_PREEMPTED
                count = merge(Path(args.input), output, replicas)
                print(f"merged {replicas} parts: {count} records in {output}",
                      file=sys.stderr)
        return 0

    return asyncio.run(main())


def cmd_bench(args: argparse.Namespace) -> int:
    from tp_engine.bench import main as bench_main

    return bench_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from tp_engine.serve.server import ServeOptions, run

    kwargs = engine_kwargs(args)
    options = ServeOptions(
        served_name=args.served_model_name or args.model or kwargs["model"], host=args.host,
        port=args.port, drain_timeout=args.drain_timeout, max_waiting=args.max_waiting,
        log_level=args.log_level, access_log=not args.no_access_log)
    return run(options, kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="print a completion, streamed")
    add_engine_flags(gen)
    gen.add_argument("--prompt", required=True, metavar="TEXT")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, metavar="N",
                     help="most tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="X",
                     help="0 is greedy (default: 0.0)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="X", help="(default: 1.0)")
    gen.add_argument("--sample-seed", type=int, default=None, metavar="N",
                     help="seed of this request's sampling (default: the engine's sampler)")
    gen.set_defaults(run=cmd_generate)

    batch = sub.add_parser("batch", help="run an OpenAI Batch API JSONL file, resumable")
    add_engine_flags(batch)
    batch.add_argument("-i", "--input", required=True)
    batch.add_argument("-o", "--output", required=True)
    batch.add_argument("--max-in-flight", type=int, default=64)
    batch.add_argument("--no-progress", action="store_true")
    batch.set_defaults(run=cmd_batch)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                       help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish")
    serve.add_argument("--max-waiting", type=int, default=None, metavar="N",
                       help="refuse (429) new requests while N are waiting to be scheduled")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: MODEL as given)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--no-access-log", action="store_true")
    serve.set_defaults(run=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, lifecycle, "
                           "overhead, memory (markdown tables)")
    from tp_engine.bench import add_mode_parsers

    add_mode_parsers(bench)
    bench.set_defaults(run=cmd_bench)

    tiny = sub.add_parser("make-tiny-model", help="write a small random checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["llama", "qwen2", "mistral"], default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_make_tiny_model)
    add_debug_flag(parser)
    return parser


def add_debug_flag(parser: argparse.ArgumentParser, default: object = False) -> None:
    """`--debug` before or after the subcommand (and a bench mode): the subparsers' flag has
    no default, so it never overwrites the `--debug` given before the subcommand."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error show the traceback, and log at debug level")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                add_debug_flag(subparser, argparse.SUPPRESS)


def run_under_torchrun(args: argparse.Namespace, rank: int, world_size: int) -> int:
    """torchrun started this process as one rank. The world is `--dp` replicas of
    world/dp consecutive ranks; the first rank of each runs the subcommand with its replica's
    controller, every other rank runs the worker loop only."""
    from tp_engine.engine.torchrun_group import controller_host, run_rank
    from tp_engine.worker.distributed import init_distributed, split_replicas

    kwargs = dict(engine_kwargs(args))
    replicas = kwargs.pop("data_parallel_size", 1)
    if world_size % replicas:
        raise ConfigError(f"--dp {replicas} does not divide torchrun's {world_size} ranks")
    if replicas > 1 and args.run is not cmd_batch:
        raise ConfigError("under torchrun, --dp splits a batch job (tp-engine batch) only")
    size = world_size // replicas
    index, tp_rank = divmod(rank, size)
    kwargs.update(tensor_parallel_size=size, start_method="torchrun")
    kwargs.setdefault("host", controller_host(rank - tp_rank))
    args.engine_overrides = kwargs
    args.share = (index, replicas)
    try:
        config = EngineConfig(**kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    init_distributed(rank, world_size, "env://", config.device, config.startup_timeout)
    if replicas > 1:
        split_replicas(size)
    if tp_rank == 0:
        return args.run(args)
    return run_rank(config, tp_rank, size)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. An engine error (a missing model, a bad value, a worker that died)
    is one line, `error: ...`, and exit 1; Ctrl-C is exit 130; `--debug` shows tracebacks."""
    args = build_parser().parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        from tp_engine.engine.torchrun_group import torchrun_env

        ranks = torchrun_env()
        if ranks is not None and hasattr(args, "model"):  # the subcommands that run an engine
            return run_under_torchrun(args, *ranks)
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(file=sys.stderr)
        return 130
    except EngineError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
