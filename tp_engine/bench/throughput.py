"""`tp-engine bench throughput`: offline throughput of `Engine.generate` against transformers'
`generate` at several batch sizes, the same requests on both sides, in the same run.

Runs alternate (engine, then each baseline batch size, then the engine again...) so that a
burst of load from elsewhere on the machine lands on both sides alike. Each run has prompts of
its own (same lengths, other tokens): the engine's prefix cache cannot carry a run over to the
next. `--shared-prefix N` starts every prompt of a run with the same N tokens (a system prompt,
a few-shot preamble), which the prefix cache computes once a run."""

from __future__ import annotations

import argparse

from tp_engine.bench import common
from tp_engine.bench import flops as flops_of
from tp_engine.bench.common import Request

TARGET_RATIO = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--prompt-len", default="8,160", help="min,max prompt tokens")
    p.add_argument("--output-len", default="8,160", help="min,max output tokens")
    p.add_argument("--runs", type=int, default=4, help="timed runs per configuration")
    p.add_argument("--hf-batch-sizes", default="32,64,96",
                   help="transformers batch sizes, comma separated; empty: no baseline")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="tokens every prompt of a run starts with")
    p.add_argument("--splits", default="", metavar="DPxTP,...",
                   help="engines to run side by side, as data-parallel x tensor-parallel "
                        "sizes (2x1,1x2: the same workers split two ways); default: the "
                        "engine the flags give")


def pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_engine(engine, requests: list[Request]) -> tuple[float, int]:
    from tp_engine import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_ids} for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
              for r in requests]
    outputs = []
    seconds = common.timed(lambda: outputs.extend(engine.generate(prompts, params)))
    produced = sum(len(o.token_ids) for o in outputs)
    requested = sum(r.max_tokens for r in requests)
    if produced != requested:  # ignore_eos: every request must run to its max_tokens
        raise RuntimeError(f"engine produced {produced} tokens, {requested} were requested")
    return seconds, requested


def splits(text: str, engine_kwargs: dict) -> list[tuple[int, int]]:
    """(data-parallel, tensor-parallel) sizes of each engine to run."""
    if not text.strip():
        return [(engine_kwargs.get("data_parallel_size", 1),
                 engine_kwargs.get("tensor_parallel_size", 1))]
    try:
        return [(int(dp), int(tp)) for dp, tp in (s.lower().split("x") for s in text.split(","))]
    except ValueError:
        raise SystemExit(f"--splits: expected DPxTP,... (like 2x1,1x2), got {text!r}") from None


def engine_name(dp: int, tp: int) -> str:
    return f"tp-engine DP={dp} TP={tp}" if dp > 1 else f"tp-engine TP={tp}"


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tp_engine import Engine

    batch_sizes = ints(args.hf_batch_sizes)
    engines = {}
    try:
        for dp, tp in splits(args.splits, engine_kwargs):
            engines[engine_name(dp, tp)] = Engine(**{**engine_kwargs, "data_parallel_size": dp,
                                                     "tensor_parallel_size": tp})
        first = next(iter(engines.values()))
        vocab, path = first.core.model_config.vocab_size, first.config.model

        def requests(variant: int) -> list[Request]:
            return common.workload(args.requests, pair(args.prompt_len), pair(args.output_len),
                                   vocab, args.workload_seed, variant,
                                   common.shared_prefix(args.shared_prefix, vocab, variant))

        hf = None
        if batch_sizes:
            from tp_engine.bench import hf_baseline

            hf = hf_baseline.load(path)
            hf_baseline.generate(hf, requests(-1)[:2], 2)  # warm-up
        for engine in engines.values():
            run_engine(engine, requests(-1)[:4])  # warm-up: first-call allocations and kernels
        before = {name: engine.core.stats() for name, engine in engines.items()}
        times: dict[str, list[float]] = {}
        tokens = sum(r.max_tokens for r in requests(0))
        flops = flops_of.workload_flops(first.core.model_config, requests(0))
        for index in range(args.runs):
            work = requests(index)
            for name, engine in engines.items():
                times.setdefault(name, []).append(run_engine(engine, work)[0])
            for size in batch_sizes:
                seconds = hf_baseline.generate(hf, work, size)[0]
                times.setdefault(f"transformers generate, batch {size}", []).append(seconds)
        hit_rates = {name: common.hit_rate(before[name], engine.core.stats())
                     for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.terminate()
    report(args, times, tokens, engine_kwargs, hit_rates, engines, flops)
    return 0


def report(args: argparse.Namespace, times: dict[str, list[float]], tokens: int,
           engine_kwargs: dict, hit_rates: dict[str, float], engines: dict,
           flops: float) -> None:
    first = next(iter(engines.values()))
    on_cpu = first.config.device == "cpu"
    dtype = first.config.worker_dtype()
    peak, reckoned = flops_of.cpu_peak(dtype) if on_cpu else (0.0, "")
    rows, rates = [], {}
    for name, runs in times.items():
        rates[name] = tokens / common.median(runs)
        achieved = flops / common.median(runs)
        rows.append([name, f"{rates[name]:.0f}", f"{common.median(runs):.2f}",
                     f"{tokens / max(runs):.0f}-{tokens / min(runs):.0f}", len(runs),
                     f"{hit_rates[name]:.0%}" if name in hit_rates else "-",
                     f"{achieved / 1e9:.0f}",
                     f"{achieved / peak:.0%}" if peak and not name.startswith("transformers")
                     else "-"])
    threads = ", ".join(f"{common.worker_threads(e.config.num_workers)} ({name})"
                        for name, e in engines.items())
    common.print_machine(common.machine({
        "engine worker threads": threads, "dtype": dtype,
        "peak (nominal)": f"{peak / 1e9:.0f} GFLOP/s: {reckoned}" if peak else "unknown",
        "model": engine_kwargs["model"], "device": engine_kwargs.get("device", "auto")}))
    common.print_table(
        f"throughput: {args.requests} requests, prompts {args.prompt_len} tokens"
        + (f" after a shared prefix of {args.shared_prefix}" if args.shared_prefix else "")
        + f", outputs {args.output_len} tokens, greedy, {tokens} requested tokens",
        ["system", "tokens/s (median)", "seconds (median)", "tokens/s range", "runs",
         "prefix cache hits", "GFLOP/s", "of peak"], rows)
    baseline = {k: v for k, v in rates.items() if k.startswith("transformers")}
    if not baseline:
        return
    best_name = max(baseline, key=baseline.get)
    summary = []
    for name, rate in rates.items():
        if name.startswith("tp-engine"):
            ratio = rate / baseline[best_name]
            summary.append([name, f"{ratio:.2f}x", f">= {TARGET_RATIO:.0f}x",
                            common.verdict(ratio, TARGET_RATIO, lower_is_better=False)])
    common.print_table(f"against the best baseline ({best_name})",
                       ["system", "speed-up", "target", "verdict"], summary)
