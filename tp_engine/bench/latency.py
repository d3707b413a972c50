"""`tp-engine bench latency`: time to first token (TTFT) and time per output token (TPOT) at
fixed concurrencies: C client threads, each sending its requests one after another (a closed
loop), every token's arrival timed where the caller receives it."""

from __future__ import annotations

import argparse
import threading
import time

from tp_engine.bench import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default="1,4,16", help="client counts, comma separated")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip transformers' generate (the concurrency-1 baseline)")


def client(core, prompts: list[list[int]], max_tokens: int, out: list[tuple[float, float]],
           errors: list[BaseException]) -> None:
    """Send each prompt in turn; record (TTFT, TPOT) in seconds for each."""
    from tp_engine import SamplingParams
    from tp_engine.engine.request import SyncSink

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    try:
        for prompt in prompts:
            sent = time.perf_counter()
            state = core.submit(prompt, params, SyncSink(), stream=True)
            first = last = None
            count = 0
            while True:
                delta = state.get()
                if delta.error is not None:
                    raise delta.error
                if delta.token_ids:
                    last = time.perf_counter()
                    first = first or last
                    count += len(delta.token_ids)
                if delta.finish_reason is not None:
                    break
            out.append((first - sent, (last - first) / max(1, count - 1)))
    except BaseException as e:  # reported by the caller, never swallowed
        errors.append(e)


def measure(engine, concurrency: int, args: argparse.Namespace, vocab: int,
            seed: int) -> tuple[list[tuple[float, float]], float, int]:
    requests = common.workload(concurrency * args.requests_per_client,
                               (args.prompt_len, args.prompt_len),
                               (args.max_tokens, args.max_tokens), vocab, seed)
    results: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    per = args.requests_per_client
    threads = [threading.Thread(target=client, args=(
        engine.core, [r.prompt_ids for r in requests[c * per:(c + 1) * per]], args.max_tokens,
        results, errors)) for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - start, len(requests) * args.max_tokens


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    from tp_engine import Engine

    levels = [int(x) for x in args.concurrency.split(",")]
    rows = []
    with Engine(**engine_kwargs) as engine:
        vocab = engine.core.model_config.vocab_size
        measure(engine, 1, argparse.Namespace(**{**vars(args), "requests_per_client": 1}),
                vocab, seed=-1)  # warm-up
        for level in levels:
            results, seconds, tokens = measure(engine, level, args, vocab, args.workload_seed)
            ttft = sorted(r[0] for r in results)
            tpot = sorted(r[1] for r in results)
            rows.append([level, len(results), common.ms(common.median(ttft)),
                         common.ms(common.percentile(ttft, 90)), common.ms(common.median(tpot)),
                         common.ms(common.percentile(tpot, 90)), f"{tokens / seconds:.0f}"])
        path = engine.config.model
    if not args.no_baseline:
        rows.append(baseline(path, args, vocab))
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    common.print_machine(common.machine({"engine worker threads": str(common.worker_threads(tp)),
                                         "model": engine_kwargs["model"],
                                         "tensor parallel size": str(tp)}))
    common.print_table(
        f"latency: prompts of {args.prompt_len} tokens, {args.max_tokens} output tokens, "
        f"greedy, {args.requests_per_client} requests per client, closed loop",
        ["concurrency", "requests", "TTFT median ms", "TTFT p90 ms", "TPOT median ms",
         "TPOT p90 ms", "output tokens/s"], rows)
    return 0


def baseline(path: str, args: argparse.Namespace, vocab: int) -> list[object]:
    """transformers' `generate`, one request at a time: TTFT is a 1-token generate, TPOT the
    rest of a full one spread over its tokens. Medians over the same prompts as the engine."""
    from tp_engine.bench import hf_baseline

    model = hf_baseline.load(path)
    requests = common.workload(args.requests_per_client, (args.prompt_len, args.prompt_len),
                               (args.max_tokens, args.max_tokens), vocab, args.workload_seed)
    hf_baseline.generate(model, requests[:1], 1)  # warm-up
    ttft, tpot = [], []
    for r in requests:
        first = common.Request(r.prompt_ids, 1)
        ttft.append(hf_baseline.generate(model, [first], 1)[0])
        whole = hf_baseline.generate(model, [r], 1)[0]
        tpot.append((whole - ttft[-1]) / max(1, r.max_tokens - 1))
    ttft.sort()
    tpot.sort()
    per_request = common.median(ttft) + common.median(tpot) * (args.max_tokens - 1)
    return ["1 (transformers generate)", len(requests), common.ms(common.median(ttft)),
            common.ms(common.percentile(ttft, 90)), common.ms(common.median(tpot)),
            common.ms(common.percentile(tpot, 90)),
            f"{args.max_tokens / per_request:.0f}"]
