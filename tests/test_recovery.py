"""Surviving a worker's death (SIGKILL for real, at TP 2): the engine restarts its worker group
and recomputes every request in flight from its tokens, so callers see a pause, never an error,
and greedy and seeded outputs equal an undisturbed run's. A group that cannot start again ends
in WorkerDiedError once `max_restarts` are spent, with nothing left behind."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time

import psutil
import pytest

from tp_engine import Engine, SamplingParams
from tp_engine.errors import WorkerDiedError

pytestmark = pytest.mark.timeout(180)

PROMPTS = [{"prompt_token_ids": [5 + i, 17, 33, 2, 9, 40 + i]} for i in range(16)]
GREEDY = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
SEEDED = [SamplingParams(max_tokens=96, temperature=1.0, seed=i, ignore_eos=True)
          for i in range(16)]


def generate_in_background(llm: Engine, params) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["outputs"] = llm.generate(PROMPTS, params)
        except Exception as e:  # the test reads it
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def wait_for_tokens(llm: Engine, at_least: int) -> None:
    """Until the workers have run `at_least` steps since the engine started."""
    deadline = time.monotonic() + 30
    while llm.core.replicas[0].loop.steps < at_least and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with Engine(tiny_model, tensor_parallel_size=2, device="cpu", dtype="float32",
                decode_steps=4, max_restarts=3) as engine:
        yield engine


@pytest.fixture(scope="module")
def undisturbed(llm):
    return {"greedy": [o.token_ids for o in llm.generate(PROMPTS, GREEDY)],
            "seeded": [o.token_ids for o in llm.generate(PROMPTS, SEEDED)]}


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_a_worker_sigkilled_mid_generate_changes_nothing(llm, undisturbed, kind):
    before = llm.restarts
    thread, result = generate_in_background(llm, GREEDY if kind == "greedy" else SEEDED)
    wait_for_tokens(llm, llm.core.replicas[0].loop.steps + 6)
    assert thread.is_alive(), "the generate ended before the kill: the test shows nothing"
    os.kill(llm.worker_pids[1], signal.SIGKILL)
    thread.join(60)
    assert "error" not in result, result.get("error")
    assert [o.token_ids for o in result["outputs"]] == undisturbed[kind]
    assert llm.restarts == before + 1 and llm.state == "running"


def test_three_kills_in_a_row_at_random_moments(tiny_model, undisturbed):
    rng = random.Random(17)
    with Engine(tiny_model, tensor_parallel_size=2, device="cpu", dtype="float32",
                decode_steps=4, max_restarts=3) as engine:
        thread, result = generate_in_background(engine, GREEDY)
        for _ in range(3):
            wait_for_tokens(engine, engine.core.stats()["steps"] + rng.randint(2, 8))
            pid = engine.worker_pids[rng.randint(0, 1)]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30  # until the new group runs
            while (engine.restarts == 0 or pid in engine.worker_pids) and \
                    time.monotonic() < deadline:
                time.sleep(0.005)
        thread.join(90)
        assert "error" not in result, result.get("error")
        assert [o.token_ids for o in result["outputs"]] == undisturbed["greedy"]
        assert engine.restarts == 3


def test_a_sigstopped_worker_is_caught_by_the_step_timeout_and_survived(tiny_model,
                                                                        undisturbed):
    with Engine(tiny_model, tensor_parallel_size=2, device="cpu", dtype="float32",
                decode_steps=4, step_timeout=1.5) as engine:
        thread, result = generate_in_background(engine, GREEDY)
        wait_for_tokens(engine, 6)
        assert thread.is_alive()
        stopped = engine.worker_pids[1]
        began = time.monotonic()
        os.kill(stopped, signal.SIGSTOP)
        thread.join(60)
        assert "error" not in result, result.get("error")
        assert [o.token_ids for o in result["outputs"]] == undisturbed["greedy"]
        assert engine.restarts == 1 and stopped not in engine.worker_pids
        assert time.monotonic() - began < 10
    assert not psutil.pid_exists(stopped) or \
        psutil.Process(stopped).status() == psutil.STATUS_ZOMBIE


def test_a_step_that_fails_on_a_rank_restarts_the_group(llm, undisturbed):
    """A rank that reports a failed step (here a StepFailed frame sent to the control socket,
    as a worker sends it) is restarted with its group, as a death is."""
    import zmq

    from tp_engine import wire

    before = llm.restarts
    thread, result = generate_in_background(llm, GREEDY)
    wait_for_tokens(llm, llm.core.replicas[0].loop.steps + 4)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(llm.core.groups[0].endpoint)
    rogue.send(wire.encode(wire.StepFailed(rank=1, step_id=0, error="RuntimeError: boom")))
    thread.join(60)
    rogue.close()
    ctx.term()
    assert "error" not in result, result.get("error")
    assert [o.token_ids for o in result["outputs"]] == undisturbed["greedy"]
    assert llm.restarts == before + 1


def test_a_group_that_cannot_start_again_ends_in_an_error(tiny_model, tmp_path):
    """The checkpoint is removed once the engine runs: every new group fails to load, each
    try counts, and after max_restarts the callers get the death's WorkerDiedError (with the
    last load error); terminate() cleans up."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    engine = Engine(str(model), tensor_parallel_size=2, device="cpu", max_restarts=2)
    pids = engine.worker_pids
    try:
        thread, result = generate_in_background(engine, GREEDY)
        wait_for_tokens(engine, 4)
        for weights in model.glob("*.safetensors"):
            weights.unlink()
        began = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        thread.join(60)
        error = result.get("error")
        assert isinstance(error, WorkerDiedError) and error.rank == 0, result
        assert "2 restarts failed" in str(error) and "failed to load" in str(error)
        assert time.monotonic() - began < 30
        assert engine.restarts == 2 and engine.state == "failed"
        with pytest.raises(WorkerDiedError):
            engine.generate("hello", GREEDY)
        last = engine.worker_pids
    finally:
        engine.terminate()
    assert engine.state == "terminated"
    alive = [p for p in pids + last if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_eight_live_server_streams_survive_a_worker_sigkill(tiny_model, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Server

    server = Server("recovers", tiny_model, ["--tp", "2", "--decode-steps", "4"], tmp_path)
    try:
        server.wait_ready()
        client = server.client()
        prompts = [f"stream number {i} says" for i in range(8)]
        args = dict(model=tiny_model, max_tokens=160, temperature=0,
                    extra_body={"ignore_eos": True})
        want = [client.completions.create(prompt=p, **args).choices[0].text for p in prompts]
        started = threading.Barrier(9)

        def stream(prompt: str) -> str:
            chunks = client.completions.create(prompt=prompt, stream=True, **args)
            text = next(chunks).choices[0].text
            started.wait(30)
            return text + "".join(c.choices[0].text for c in chunks if c.choices)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream, p) for p in prompts]
            started.wait(30)
            server.workers()[0].kill()
            got = [f.result(timeout=60) for f in futures]
        assert got == want
        assert server.metrics()["tp_engine_restarts_total"] == 1
        assert "restarting the worker group (1 of 3)" in server.log()
    finally:
        server.stop()
