"""`tp-engine` (also `python -m tp_engine`): one subcommand per entry point. Every subcommand
takes `--config FILE.yaml` and the Engine keywords as flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

ENGINE_FLAGS = {  # flag -> (Engine keyword, type)
    "--tensor-parallel-size": ("tensor_parallel_size", int),
    "--device": ("device", str),
    "--dtype": ("dtype", str),
    "--max-model-len": ("max_model_len", int),
    "--max-num-seqs": ("max_num_seqs", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--num-kv-blocks": ("num_kv_blocks", int),
    "--kv-cache-memory-gb": ("kv_cache_memory_gb", float),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float),
    "--seed": ("seed", int),
    "--start-method": ("start_method", str),
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint directory or tiny-llama, "
                        "tiny-qwen2, tiny-mistral (built on first use)")
    parser.add_argument("--config", help="YAML file of Engine keywords")
    for flag, (dest, kind) in ENGINE_FLAGS.items():
        names = [flag, "--tp"] if dest == "tensor_parallel_size" else [flag]
        parser.add_argument(*names, dest=dest, type=kind, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keywords: the YAML file's, overridden by the flags given."""
    kwargs = {dest: getattr(args, dest) for dest, _ in ENGINE_FLAGS.values()
              if getattr(args, dest) is not None}
    if args.model:
        kwargs["model"] = args.model
    if args.config:
        from tp_engine.config import EngineConfig

        return vars(EngineConfig.from_yaml(args.config, **kwargs))
    if "model" not in kwargs:
        raise SystemExit("error: give a MODEL or a --config that names one")
    return kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from tp_engine import Engine
    from tp_engine.errors import EngineError

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
            print()
        except EngineError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from tp_engine.model.tiny import make_tiny_model

    path = make_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="print a completion, streamed")
    add_engine_flags(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.set_defaults(run=cmd_generate)

    tiny = sub.add_parser("make-tiny-model", help="write a small random checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["llama", "qwen2", "mistral"], default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_make_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
