"""Data parallelism in one process: two worker groups behind one controller. Outputs equal a
single group's; requests spread over both; a death fails or restarts its own group only; and
terminate reaps every worker of every group."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from tp_engine import Engine, SamplingParams
from tp_engine.errors import WorkerDiedError

pytestmark = pytest.mark.timeout(120)

PROMPTS = [{"prompt_token_ids": [3 + i, 17, 33, 2, 9, 40 + i] * (1 + i % 3)} for i in range(12)]
PARAMS = [SamplingParams(max_tokens=64, temperature=0, ignore_eos=True) if i % 2 else
          SamplingParams(max_tokens=64, temperature=0.9, seed=i, ignore_eos=True, n=2)
          for i in range(12)]
LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


def texts(outputs) -> list[list[list[int]]]:
    return [[sample.token_ids for sample in out.outputs] for out in outputs]


@pytest.fixture(scope="module")
def single(tiny_model) -> list:
    with Engine(tiny_model, device="cpu", dtype="float32") as engine:
        return texts(engine.generate(PROMPTS, PARAMS))


def test_two_groups_give_the_outputs_of_one_and_share_the_work(tiny_model, single):
    with Engine(tiny_model, device="cpu", dtype="float32", data_parallel_size=2) as engine:
        assert len(engine.worker_pids) == 2
        assert texts(engine.generate(PROMPTS, PARAMS)) == single
        steps = [replica.loop.steps for replica in engine.core.replicas]
        stats = engine.core.stats()
        assert stats["replicas"] == 2 and stats["kv_blocks_free"] == stats["kv_blocks"]
        assert all(replica.room == replica.blocks.num_blocks
                   for replica in engine.core.replicas)  # every claim released
        pids = engine.worker_pids
    assert min(steps) > 0  # both groups computed
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_a_death_without_restarts_fails_only_its_group(tiny_model):
    with Engine(tiny_model, device="cpu", dtype="float32", data_parallel_size=2,
                max_restarts=0, decode_steps=4) as engine:
        states = [samples[0] for samples in engine.core.submit_many(
            [(p["prompt_token_ids"], LONG, None) for p in PROMPTS[:4]])]
        while engine.core.stats()["steps"] < 8:
            time.sleep(0.005)
        os.kill(engine.core.groups[1].procs[0].pid, signal.SIGKILL)
        errors = []
        for state in states:
            try:
                assert len(state.result().token_ids) == LONG.max_tokens
                errors.append(None)
            except WorkerDiedError as e:
                errors.append(str(e))
        assert errors.count(None) == 2, errors  # two requests a group, placed in turn
        assert all("rank 0 of replica 1 died" in e for e in errors if e), errors
        assert engine.state == "running"
        assert engine.core.stats()["replicas_failed"] == 1
        out = engine.generate(PROMPTS[:3], PARAMS[1])  # the live group serves them all
        assert [o.finish_reason for o in out] == ["length"] * 3


def test_a_death_restarts_its_group_only_and_outputs_are_unchanged(tiny_model, single):
    with Engine(tiny_model, device="cpu", dtype="float32", data_parallel_size=2,
                max_restarts=1, decode_steps=4) as engine:
        first = engine.core.groups[0].procs[0].pid
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("out", engine.generate(PROMPTS, PARAMS)))
        thread.start()
        while engine.core.stats()["steps"] < 4:
            time.sleep(0.002)
        assert engine.core.replicas[1].loop.seqs  # it dies with requests in flight
        os.kill(engine.core.groups[1].procs[0].pid, signal.SIGKILL)
        thread.join(60)
        assert texts(result["out"]) == single
        assert engine.restarts == 1
        assert [r.loop.restarts for r in engine.core.replicas] == [0, 1]
        assert engine.core.groups[0].procs[0].pid == first  # the other group never stopped
