"""`tp-engine bench latency`: time to first token (TTFT) and time per output token (TPOT) at
fixed concurrencies: C client threads, each sending its requests one after another (a closed
loop), every token's arrival timed where the caller receives it.

`--shared-prefix N` starts every prompt with the same N tokens, as a chat server's system
prompt: the engine is measured with its prefix cache on and again with it off, the warm-up
request having sent the prefix once (a server's steady state)."""

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
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="tokens every prompt starts with; measured with the cache on and off")
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
                               (args.max_tokens, args.max_tokens), vocab, seed,
                               prefix=common.shared_prefix(args.shared_prefix, vocab))
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
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.shared_prefix:
        sides = {f"cache {side}": {**engine_kwargs, "enable_prefix_caching": side == "on"}
                 for side in ("on", "off")}
    else:
        sides = {"": engine_kwargs}
    rows = []
    for side, kwargs in sides.items():
        made, path, vocab = measure_levels(levels, args, kwargs)
        rows += [[f"{level} ({side})" if side else level, *row] for level, row in made]
    if not args.no_baseline:
        rows.append(baseline(path, args, vocab))
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    common.print_machine(common.machine({"engine worker threads": str(common.worker_threads(tp)),
                                         "model": engine_kwargs["model"],
                                         "tensor parallel size": str(tp)}))
    prefix = f" after a shared prefix of {args.shared_prefix}" if args.shared_prefix else ""
    common.print_table(
        f"latency: prompts of {args.prompt_len} tokens{prefix}, {args.max_tokens} output "
        f"tokens, greedy, {args.requests_per_client} requests per client, closed loop",
        ["concurrency", "requests", "TTFT median ms", "TTFT p90 ms", "TPOT median ms",
         "TPOT p90 ms", "output tokens/s", "prefix cache hits"], rows)
    return 0


def measure_levels(levels: list[int], args: argparse.Namespace, engine_kwargs: dict,
                   ) -> tuple[list[tuple[int, list[object]]], str, int]:
    """One engine through every concurrency: a row for each, the model's path, its vocab."""
    from tp_engine import Engine

    rows = []
    with Engine(**engine_kwargs) as engine:
        vocab = engine.core.model_config.vocab_size
        measure(engine, 1, argparse.Namespace(**{**vars(args), "requests_per_client": 1}),
                vocab, seed=-1)  # warm-up
        for level in levels:
            before = engine.core.stats()
            results, seconds, tokens = measure(engine, level, args, vocab, args.workload_seed)
            after = engine.core.stats()
            ttft = sorted(r[0] for r in results)
            tpot = sorted(r[1] for r in results)
            rows.append((level, [
                len(results), common.ms(common.median(ttft)),
                common.ms(common.percentile(ttft, 90)), common.ms(common.median(tpot)),
                common.ms(common.percentile(tpot, 90)), f"{tokens / seconds:.0f}",
                f"{common.hit_rate(before, after):.0%}"]))
        return rows, engine.config.model, vocab


def baseline(path: str, args: argparse.Namespace, vocab: int) -> list[object]:
    """transformers' `generate`, one request at a time: TTFT is a 1-token generate, TPOT the
    rest of a full one spread over its tokens. Medians over the same prompts as the engine."""
    from tp_engine.bench import hf_baseline

    model = hf_baseline.load(path)
    requests = common.workload(args.requests_per_client, (args.prompt_len, args.prompt_len),
                               (args.max_tokens, args.max_tokens), vocab, args.workload_seed,
                               prefix=common.shared_prefix(args.shared_prefix, vocab))
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
            f"{args.max_tokens / per_request:.0f}", "-"]
