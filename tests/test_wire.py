"""The wire under hostile input: random, truncated, oversized, mistyped and pickled frames are
dropped by the controller and the workers, which keep serving; over TCP a peer without the
HMAC secret is refused."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import random
from array import array
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_engine import Engine, SamplingParams, wire
from tp_engine.config import EngineConfig
from tp_engine.worker.main import WorkerArgs, worker_main

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = {"prompt_token_ids": [5, 17, 33, 2, 9]}
EXAMPLES = [wire.Ready(0, 1, 2, 3), wire.LoadFailed(1, "x"), wire.StepDone(3, [1, 2], 1, 0.5),
            wire.Step(1, [0], [2], array("i", [4, 5]).tobytes(), [[0]],
                      [[0, 0.0, 1.0, 0, -1, 0, 0.0, -1]], [3]),
            wire.StepFailed(0, 1, "e"), wire.Shutdown(), wire.Goodbye(1)]
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text()
           | st.binary())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


class Boom:
    """A pickle that, if ever loaded, leaves a file behind."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


@given(st.binary(max_size=256))
def test_random_bytes_raise_only_wire_error(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)


@settings(max_examples=300)
@given(st.integers(-3, 3), st.integers(-2, 10), st.lists(values, max_size=8))
def test_random_arrays_raise_only_wire_error_or_decode_typed(version, tag, fields):
    try:
        msg = wire.decode(msgpack.packb([version, tag, *fields]))
    except wire.WireError:
        return
    assert wire.decode(wire.encode(msg)) == msg  # what passes is a well-typed message


def test_every_truncation_of_every_message_is_refused():
    for msg in EXAMPLES:
        frame = wire.encode(msg)
        assert wire.decode(frame) == msg
        for cut in range(len(frame)):
            with pytest.raises(wire.WireError):
                wire.decode(frame[:cut])


def test_oversized_frames_are_refused():
    with pytest.raises(wire.WireError):
        wire.decode(b"\x00" * (wire.MAX_FRAME_BYTES + 1))


def test_hmac_refuses_unsigned_and_wrongly_signed_frames():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://hmac")
    b.connect("inproc://hmac")
    good, bad, none = wire.Link(a, b"k" * 32), wire.Link(b, b"j" * 32), wire.Link(b, None)
    try:
        for sender in (bad, none):
            sender.send(wire.Shutdown())
            with pytest.raises(wire.WireError, match="HMAC"):
                good.recv()
        wire.Link(b, b"k" * 32).send(wire.Goodbye(3))
        assert good.recv() == (None, wire.Goodbye(3))
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def junk_frames(seed: int, n: int, marker: str) -> list[list[bytes]]:
    rng = random.Random(seed)
    frames = [[pickle.dumps(Boom(marker))], [b""], [b"x", b"y", b"z"],
              [msgpack.packb([wire.VERSION + 1, 4, 0, [1]])],
              [msgpack.packb([wire.VERSION, 4, "step", [1]])],
              [msgpack.packb([wire.VERSION, 4, 0, [1]])[:-1]]]
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            frames.append([rng.randbytes(rng.randrange(1, 300))])
        elif kind == 1:
            frame = wire.encode(rng.choice(EXAMPLES))
            frames.append([frame[:rng.randrange(len(frame))]])
        else:
            frames.append([msgpack.packb([wire.VERSION, rng.randrange(10),
                                          *[rng.random() for _ in range(rng.randrange(6))]])])
    return frames


@pytest.mark.parametrize("host", [None, "127.0.0.1"])
def test_controller_drops_hostile_frames_and_keeps_serving(tiny_model, tmp_path, caplog,
                                                           host):
    marker = str(tmp_path / "unpickled")
    with Engine(tiny_model, tensor_parallel_size=2, device="cpu", host=host) as engine:
        expect = engine.generate(PROMPT, GREEDY)[0].token_ids
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(engine.core.groups[0].endpoint)
        with caplog.at_level(logging.WARNING, logger="tp_engine"):
            for frames in junk_frames(1, 150, marker):
                rogue.send_multipart(frames)
            # a well-formed StepDone for the next step, unsigned: over TCP it is refused
            rogue.send(wire.encode(wire.StepDone(1_000_000, [1], 1, 0.0)))
            assert engine.generate(PROMPT, GREEDY)[0].token_ids == expect
        rogue.close()
        ctx.term()
        assert engine.state == "running"
    assert not os.path.exists(marker), "a pickle was loaded"
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped
    if host is not None:
        assert any("HMAC" in r.getMessage() for r in caplog.records)


def test_a_worker_drops_hostile_frames_and_keeps_serving(tiny_model, tmp_path):
    config = EngineConfig(model=tiny_model, device="cpu", num_kv_blocks=8, block_size=16)
    ctx = zmq.Context()
    router, endpoint = wire.bind_router(ctx, wire.control_endpoint(str(tmp_path)))
    link = wire.Link(router, None)
    args = WorkerArgs(config, 0, 1, endpoint, "", os.getpid())
    worker = mp.get_context("spawn").Process(target=worker_main, args=(args, None))
    worker.start()
    marker = str(tmp_path / "unpickled")
    try:
        assert router.poll(60_000)
        sender, ready = link.recv()
        assert isinstance(ready, wire.Ready)
        for frames in junk_frames(2, 100, marker):
            router.send_multipart([sender, *frames])
        prompt = [5, 17, 33, 2, 9]

        def greedy(output_index: int) -> list:  # a wire.Sample, greedy, no rank-0 state
            return [0, 0.0, 1.0, 0, -1, output_index, 0.0, -1]

        step = wire.Step(1, [0], [5], array("i", prompt).tobytes(), [[0]], [greedy(0)], [])
        bad = wire.Step(2, [0], [5], array("i", prompt).tobytes(), [[99]], [], [])
        for msg in (bad, step):
            router.send_multipart([sender, *link.frames(msg)])
        assert router.poll(30_000)
        failed = link.recv()[1]
        assert isinstance(failed, wire.StepFailed) and "block id" in failed.error
        assert router.poll(30_000)
        done = link.recv()[1]
        assert isinstance(done, wire.StepDone) and done.step_id == 1 and len(done.token_ids) == 1
        # runs of decode steps: a table too short for the run, a run of 0 steps, a run that
        # does not sample, a sample of the wrong shape; then a good run of 4 steps from the
        # token step 1 sampled
        last = array("i", [-1]).tobytes()
        bad_runs = {"too short": wire.Step(3, [5], [1], last, [[0]], [greedy(1)], [12]),
                    "decode_steps": wire.Step(4, [5], [1], last, [[0]], [greedy(1)], [0]),
                    "one sample": wire.Step(5, [5], [1], last, [[0]], [], [2]),
                    "a sample is not": wire.Step(7, [5], [1], last, [[0]], [[0, 1.0]], [])}
        for expected, msg in bad_runs.items():
            router.send_multipart([sender, *link.frames(msg)])
            assert router.poll(30_000)
            failed = link.recv()[1]
            assert isinstance(failed, wire.StepFailed) and expected in failed.error
        run = wire.Step(6, [5], [1], last, [[0]], [greedy(1)], [4])
        router.send_multipart([sender, *link.frames(run)])
        assert router.poll(30_000)
        done = link.recv()[1]
        assert isinstance(done, wire.StepDone) and done.step_id == 6 and len(done.token_ids) == 4
        router.send_multipart([sender, *link.frames(wire.Shutdown())])
        assert router.poll(30_000) and isinstance(link.recv()[1], wire.Goodbye)
        worker.join(30)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()
        router.close(0)
        ctx.term()
    assert not os.path.exists(marker), "a pickle was loaded"
