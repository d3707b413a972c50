"""The OpenAI-compatible server end to end: real `tp-engine serve` subprocesses on free loopback
ports, driven by the official openai client (sync and async). Four servers start together
(their start-up is most of this file's time): `main` for the API, and one each for the
shutdown paths that end a server (drain, second signal, a worker's death)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from conftest import free_port

PROMPT = "The capital of France is"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
SERVERS = {  # name -> flags: --tp 2 on CPU (gloo) but where one rank is enough
    "main": ["--tp", "2", "--served-model-name", "tiny"],
    "drain": ["--tp", "2", "--max-num-seqs", "4", "--max-waiting", "4"],
    "skip": ["--tp", "1", "--drain-timeout", "600"],
    "dies": ["--tp", "1", "--max-restarts", "0"],
}


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for the samples of Prometheus' text format."""
    samples = (line.rsplit(" ", 1) for line in text.splitlines()
               if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    def __init__(self, name: str, model: str, flags: list[str], log_dir: Path):
        self.name, self.model = name, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "w") as log:  # a file, not a pipe: a pipe could fill up
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tp_engine", "serve", model, "--device", "cpu",
                 "--port", str(self.port), "--no-access-log", *flags],
                stdout=log, stderr=subprocess.STDOUT)
        self.statuses: list[str] = []  # what /health said while we waited

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while "serving" not in self.statuses:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} not ready in {timeout} s:\n{self.log()}")
            try:
                self.statuses.append(httpx.get(self.url + "/health", timeout=2).json()["status"])
            except httpx.TransportError:
                time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self) -> openai.OpenAI:  # no retries: a 503 or 429 must surface
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=60)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                                  timeout=60)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)

    def health(self) -> tuple[int, str]:
        r = httpx.get(self.url + "/health", timeout=5)
        return r.status_code, r.json()["status"]

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children(recursive=True)

    def workers(self) -> list[psutil.Process]:
        # the forkserver and resource tracker are our children; the workers, the forkserver's
        return [p for p in self.descendants() if p.ppid() != self.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def assert_exits_cleanly(server: Server, family: list[psutil.Process], timeout: float) -> None:
    """Exit code 0 and, within seconds, not one of its processes left."""
    assert server.proc.wait(timeout) == 0, server.log()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {alive}\n{server.log()}"


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    started = {name: Server(name, tiny_model, flags, logs) for name, flags in SERVERS.items()}
    yield started
    family = {name: s.descendants() for name, s in started.items() if s.proc.poll() is None}
    for s in started.values():
        s.stop()
    for name, procs in family.items():
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"{name} left {alive}"


@pytest.fixture
def server(servers) -> Server:
    return servers["main"].wait_ready()


# --- the API --------------------------------------------------------------------------------

@pytest.mark.timeout(150)  # includes starting the four servers
def test_health_models_and_starting(server):
    assert server.statuses[0] == "starting"  # the port answers before the engine is up
    assert server.health() == (200, "serving")
    assert [m.id for m in server.client().models.list()] == ["tiny"]


def test_chat_and_completions_sync(server):
    client = server.client()
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, **GREEDY)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 8 and chat.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        chat.choices[0].message.content  # greedy: streamed or not, the same text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, **GREEDY)
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                            stream=True, **GREEDY))
    assert all(p.usage is None for p in pieces)  # no usage unless asked for
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


@pytest.mark.timeout(60)
def test_32_concurrent_streams_async(server):
    async def one(client: openai.AsyncOpenAI) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=16,
            stream=True, stream_options={"include_usage": True}, **GREEDY)
        text, tokens = "", 0
        async for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return text, tokens

    async def all_at_once() -> list[tuple[str, int]]:
        client = server.aclient()
        return await asyncio.gather(*(one(client) for _ in range(32)))

    results = asyncio.run(all_at_once())
    assert len(set(results)) == 1 and results[0][1] == 16  # batched, yet each as if alone


def test_unknown_fields_are_ignored_and_continuous_usage_is_streamed(server):
    """A field the server does not know is ignored (logged), never a 400, as in vLLM; with
    guidellm's stream_options.continuous_usage_stats, every chunk carries the usage so far."""
    client = server.client()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        extra_body={"foo": 1, "ignore_eos": True}, temperature=0)
    assert reply.usage.completion_tokens == 4
    chunks = list(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, stream=True, **GREEDY,
        stream_options={"include_usage": True, "continuous_usage_stats": True, "bar": 2}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert chunks[-1].choices == []  # the closing usage chunk still comes


def test_several_prompts_in_one_request_are_its_choices(server):
    """lm-eval batches its prompts: each is a choice, in order, as if sent alone; the usage
    is the sum; streamed, each chunk names its choice; one bad prompt refuses them all."""
    client = server.client()
    prompts = ["hello there", "the quick brown fox", "one two"]
    reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, **GREEDY)
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5, **GREEDY)
             for p in prompts]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [a.choices[0].text for a in alone]
    assert reply.usage.completion_tokens == 15
    assert reply.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2,
                                    **GREEDY)
    assert [c.index for c in ids.choices] == [0, 1]
    streamed = list(client.completions.create(model="tiny", prompt=prompts, max_tokens=5,
                                              stream=True, **GREEDY))
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in reply.choices]
    with pytest.raises(openai.BadRequestError):  # the second is far over the context
        client.completions.create(model="tiny", prompt=["hi", "word " * 600], max_tokens=2)
    deadline = time.monotonic() + 5
    while (metric := parse_metrics(httpx.get(server.url + "/metrics").text).get(
            "tp_engine_requests_running", 0)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric == 0  # the first prompt's request did not stay behind


def test_echo_logprobs_and_n_over_http(server):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 1 or 0, several prompts
    as token ids), chat logprobs, n, and a stream of n samples with their logprobs."""
    client = server.client()
    ids = [5, 17, 33, 2, 9, 40]
    reply = client.completions.create(model="tiny", prompt=[ids, ids[:4]], echo=True,
                                      logprobs=2, max_tokens=1, temperature=0)
    for choice, prompt in zip(reply.choices, [ids, ids[:4]]):
        lp = choice.logprobs
        assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None
        assert all(x < 0 for x in lp.token_logprobs[1:])
        assert all(len(top) <= 3 for top in lp.top_logprobs[1:])  # 2, and the chosen one
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy
        assert lp.text_offset == sorted(lp.text_offset)
    zero = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1,
                                     max_tokens=0)
    assert zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == reply.choices[0].logprobs.token_logprobs[:-1]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        logprobs=True, top_logprobs=2, n=3, seed=4, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3
    for choice in chat.choices:
        assert len(choice.logprobs.content) == 5
        assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert chat.usage.completion_tokens == 15
    events: dict[int, int] = {}
    for chunk in client.completions.create(model="tiny", prompt="hello", max_tokens=6, n=2,
                                           logprobs=1, stream=True, seed=1,
                                           extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            events[choice.index] = events.get(choice.index, 0) + len(choice.logprobs.tokens)
    assert events == {0: 6, 1: 6}
    biased = client.completions.create(model="tiny", prompt="hello", max_tokens=4, logprobs=0,
                                       logit_bias={"7": 100}, **GREEDY)
    assert len(set(biased.choices[0].logprobs.tokens)) == 1


def test_a_stream_gets_one_event_per_token_inside_runs_of_decode_steps(server):
    """The workers report each step of a run of decode steps (up to 16) as it is sampled:
    a stream gets its tokens one by one, not in bursts of a run."""
    client = server.client()
    per_chunk = [len(c.choices[0].logprobs.tokens) for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=48, logprobs=0, stream=True, **GREEDY)
        if c.choices and c.choices[0].logprobs]
    assert sum(per_chunk) == 48 and max(per_chunk) == 1, per_chunk


def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    """A body of 5 MB takes the tokenizer seconds here: done on the event loop, /health
    waited as long (a liveness probe would kill the server)."""
    prompt = "different words making another text of some length. " * 95_000

    async def probe_while_posting() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            post = asyncio.create_task(client.post(
                server.url + "/v1/completions",
                json=dict(model="tiny", prompt=prompt, max_tokens=1)))
            began, waits = time.perf_counter(), []
            while not post.done():
                start = time.perf_counter()
                assert (await client.get(server.url + "/health")).status_code == 200
                waits.append(time.perf_counter() - start)
                await asyncio.sleep(0.05)
            reply = await post
            assert reply.status_code == 400  # far over the context, once it is tokenized
            return time.perf_counter() - began, waits

    took, waits = asyncio.run(probe_while_posting())
    assert took > 1.0, f"the prompt took only {took:.2f} s: the test shows nothing"
    # 35 ms at most here (median 2 ms), the goal 100 ms: the margin is for a busy machine
    assert max(waits) < 0.2, f"/health took up to {max(waits):.2f} s"


def test_bad_requests_are_400_and_the_server_keeps_serving(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # 512 positions in the tiny model
        client.completions.create(model="tiny", prompt="hello " * 600, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=600)
    assert "maximum context length is 512" in e.value.message
    for bad in (dict(messages=[]), dict(messages=[{"content": "no role"}]), dict(n=0),
                dict(messages=[{"role": "user"}]), dict(logit_bias={"999999": 5})):
        bad.setdefault("messages", [{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", **bad)
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=5)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices
    assert server.health() == (200, "serving")


def idle(server: Server) -> bool:
    m = server.metrics()
    return m["tp_engine_requests_running"] == 0 and m["tp_engine_kv_cache_usage"] == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborted = 'tp_engine_requests_total{endpoint="completions",finish_reason="abort"}'
    before = server.metrics().get(aborted, 0)
    stream = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=400,
                                                stream=True, **GREEDY)
    chunks = iter(stream)
    next(chunks), next(chunks)
    live = server.metrics()
    assert live["tp_engine_requests_running"] == 1 and live["tp_engine_kv_cache_usage"] > 0
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: idle(server), 5, "the blocks to be freed")
    assert server.metrics()[aborted] == before + 1

    with pytest.raises(httpx.ReadTimeout):  # a whole (non-streamed) request, abandoned
        httpx.post(server.url + "/v1/completions", timeout=0.5,
                   json=dict(model="tiny", prompt=PROMPT, max_tokens=400, ignore_eos=True))
    wait_for(lambda: idle(server), 5, "the blocks to be freed")
    assert server.metrics()[aborted] == before + 2


def test_metrics(server):
    client = server.client()
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, **GREEDY)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPT, top_p=0)
    m = server.metrics()
    assert m["tp_engine_prompt_tokens_total"] > 0 and m["tp_engine_generation_tokens_total"] >= 4
    assert m["tp_engine_time_to_first_token_seconds_count"] > 0
    assert m["tp_engine_time_per_output_token_seconds_count"] > 0
    assert m["tp_engine_kv_blocks"] > 0 and m["tp_engine_requests_waiting"] == 0
    assert 'tp_engine_requests_rejected_total{status="400"}' in m
    system = " ".join(["alpha beta gamma"] * 12)  # a shared prefix of a few full blocks
    for question in ("one", "two"):
        client.completions.create(model="tiny", prompt=f"{system} {question}", max_tokens=1)
    after = server.metrics()
    hits, queries = (f"tp_engine_prefix_cache_{name}_total" for name in ("hits", "queries"))
    assert after[hits] >= m[hits] + 16 and after[queries] > after[hits]
    assert 0 < after["tp_engine_prefix_cache_hit_rate"] < 1


@pytest.mark.timeout(60)
def test_load_run_from_a_second_process(server):
    out = subprocess.run(
        [sys.executable, "-m", "tp_engine.bench.load", "--url", server.url, "--requests", "24",
         "--concurrency", "8", "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] == 24 and result["output_tokens"] == 24 * 8
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"] and result["requests_per_s"] > 0


def test_load_percentiles_and_queue_depth():
    from tp_engine.bench.common import percentile
    from tp_engine.serve.metrics import queue_depth

    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([], 50)) == (50, 99, 0)
    stats = dict(waiting=0, in_flight=9, running=0, max_num_seqs=4)  # a burst, not yet seen
    assert queue_depth(stats) == 5
    assert queue_depth(dict(stats, waiting=7, in_flight=8, running=1)) == 7


# --- ending a server ------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_sigterm_lets_eight_live_streams_finish(servers):
    server = servers["drain"].wait_ready()  # 4 run at a time, at most 4 may wait
    family = server.descendants()
    tokens = 80

    async def scenario() -> list[tuple[str, int]]:
        client = server.aclient()

        async def stream_one() -> tuple[str, int]:
            stream = await client.completions.create(
                model=server.model, prompt=PROMPT, max_tokens=tokens, stream=True,
                stream_options={"include_usage": True}, **GREEDY)
            reason, used = "", 0
            async for chunk in stream:
                reason = chunk.choices[0].finish_reason if chunk.choices else reason
                used = chunk.usage.completion_tokens if chunk.usage else used
            return reason, used

        streams = [asyncio.create_task(stream_one()) for _ in range(8)]
        for _ in range(200):
            m = await asyncio.to_thread(server.metrics)
            if (m["tp_engine_requests_running"], m["tp_engine_requests_waiting"]) == (4, 4):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail(f"never saw 4 running and 4 waiting: {m}")
        with pytest.raises(openai.RateLimitError):  # a ninth would wait: --max-waiting 4
            await client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1)
        os.kill(server.pid, signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(server.health) == (503, "draining")
        with pytest.raises(openai.APIStatusError) as e:
            await client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1)
        assert e.value.status_code == 503
        assert not any(s.done() for s in streams)  # all eight still live at the signal
        return await asyncio.gather(*streams)

    assert asyncio.run(scenario()) == [("length", tokens)] * 8
    assert_exits_cleanly(server, family, timeout=30)


@pytest.mark.timeout(60)
def test_second_signal_skips_the_drain(servers):
    server = servers["skip"].wait_ready()
    family = server.descendants()
    client = server.client()
    streams = [iter(client.completions.create(model=server.model, prompt=[1, 2, 3],
                                              max_tokens=500, stream=True, **GREEDY))
               for _ in range(2)]
    for stream in streams:
        next(stream)
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: server.health() == (503, "draining"), 5, "draining")
    server.proc.send_signal(signal.SIGTERM)
    for stream in streams:
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "abort"
    assert_exits_cleanly(server, family, timeout=15)


@pytest.mark.timeout(60)
def test_a_dead_worker_is_a_500_naming_it(servers):
    server = servers["dies"].wait_ready()
    family = server.descendants()
    client = server.client()
    live = iter(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=450,
                                          stream=True, **GREEDY))
    next(live)
    (worker,) = server.workers()  # one rank: at TP 2 a peer's collective may fail first
    worker.kill()
    died = r"worker rank 0 died \(killed by signal SIGKILL\)"
    with pytest.raises(openai.APIError, match=died):  # an error event in the stream
        list(live)
    wait_for(lambda: server.health() == (503, "failed"), 5, "/health to say failed")
    with pytest.raises(openai.InternalServerError, match=died):
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2)
    server.proc.send_signal(signal.SIGTERM)  # the engine failed; shutting down still works
    assert_exits_cleanly(server, family, timeout=15)
