"""A bounded load run against an OpenAI-compatible server: a fixed number of streamed
requests at a fixed concurrency, then requests/s, time to first token (p50, p99) and output
tokens/s. Every request asks for exactly --max-tokens tokens (ignore_eos), so runs compare.

    python -m tp_engine.bench.load --url http://127.0.0.1:8000 --requests 256 --concurrency 32

Needs httpx (in the `test` extra)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tp_engine.bench.common import percentile


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""


async def one_request(client, url: str, body: dict) -> Result:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return Result(False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, error=chunk["error"]["message"])
                if chunk.get("choices") and ttft is None:
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a load run reports failures, it does not stop
        return Result(False, error=f"{type(e).__name__}: {e}")
    return Result(True, ttft or 0.0, time.perf_counter() - start, tokens)


async def run_load(base_url: str, model: str | None, requests: int, concurrency: int,
                   max_tokens: int, prompt: str, chat: bool) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        body: dict = dict(model=model, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                          stream=True, stream_options={"include_usage": True})
        if chat:
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        else:
            url, body["prompt"] = "/v1/completions", prompt
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        results: list[Result] = []

        async def user() -> None:  # one of `concurrency` clients, each sending in turn
            while not queue.empty():
                queue.get_nowait()
                results.append(await one_request(client, url, body))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    return dict(model=model, requests=requests, concurrency=concurrency,
                max_tokens=max_tokens, ok=len(ok), failed=len(results) - len(ok),
                errors=sorted({r.error for r in results if not r.ok})[:5],
                seconds=elapsed, requests_per_s=len(ok) / elapsed,
                ttft_p50_ms=percentile(ttfts, 50) * 1e3, ttft_p99_ms=percentile(ttfts, 99) * 1e3,
                latency_p50_ms=percentile([r.latency for r in ok], 50) * 1e3,
                output_tokens=tokens, output_tokens_per_s=tokens / elapsed,
                mean_ttft_ms=statistics.fmean(ttfts) * 1e3 if ttfts else 0.0)


def report(r: dict) -> str:
    lines = [
        f"model {r['model']}: {r['requests']} requests, concurrency {r['concurrency']}, "
        f"max_tokens {r['max_tokens']}",
        f"  ok {r['ok']}  failed {r['failed']}  in {r['seconds']:.2f} s",
        f"  requests/s      {r['requests_per_s']:.2f}",
        f"  TTFT p50        {r['ttft_p50_ms']:.1f} ms",
        f"  TTFT p99        {r['ttft_p99_ms']:.1f} ms",
        f"  latency p50     {r['latency_p50_ms']:.1f} ms",
        f"  output tokens/s {r['output_tokens_per_s']:.1f}  ({r['output_tokens']} tokens)",
    ]
    lines += [f"  error: {e}" for e in r["errors"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tp_engine.bench.load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("the load run needs httpx: pip install httpx", file=sys.stderr)
        return 2
    result = asyncio.run(run_load(args.url, args.model, args.requests, args.concurrency,
                                  args.max_tokens, args.prompt, args.chat))
    print(json.dumps(result) if args.json else report(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
