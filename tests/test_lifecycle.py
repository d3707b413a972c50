"""The lifecycle contract (API.md, "Lifecycle"), with real worker processes and no mocks.

terminate() is idempotent and wakes every consumer; a failed constructor leaves nothing behind;
a dead worker fails requests within a second and terminate() still cleans up; workers outlive
neither a SIGKILLed controller nor one that never calls terminate(); engine after engine leaves
threads, file descriptors, child processes and IPC files exactly as they were."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import snapshot

from tp_engine import AsyncEngine, Engine, SamplingParams
from tp_engine.errors import (
    ConfigError,
    EngineError,
    EngineTerminatedError,
    WorkerDiedError,
)
from tp_engine.wire import ipc_base

TP = 2
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
# ~400 decode steps: several seconds on a CPU, so the run is surely still going when we act
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
LONG_PROMPTS = ["hello", "the quick brown fox"]


# --- helpers -------------------------------------------------------------------------------

def resources() -> dict:
    """conftest's snapshot, plus the OS threads (ZeroMQ's I/O threads are not Python's)."""
    return dict(snapshot(), os_threads=len(os.listdir("/proc/self/task")))


def ipc_dirs() -> list[str]:
    return sorted(n for n in os.listdir(ipc_base()) if n.startswith("tp-engine-"))


def assert_back_to(baseline: dict, settle: float = 1.0) -> None:
    """Every child, thread and descriptor is given back (polling up to `settle` seconds), and
    no private IPC directory is left in the temporary directory."""
    deadline = time.monotonic() + settle
    now = resources()
    while now != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        now = resources()
    extra_children = now["children"] - baseline["children"]
    described = {pid: _describe(pid) for pid in extra_children}
    assert now == baseline, f"leaked: now {now}, baseline {baseline}, extra {described}"
    assert ipc_dirs() == [], f"IPC directories left in {ipc_base()}: {ipc_dirs()}"


def _describe(pid: int) -> str:
    try:
        p = psutil.Process(pid)
        return f"{p.status()} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return "gone"


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may wait for a lazy init to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_all_dead(pids: list[int], timeout: float) -> list[int]:
    """Poll until none of `pids` is alive; return those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


class Background:
    """Run `fn` in a thread; record its result or exception and the moment it came back."""

    def __init__(self, fn, *args, **kwargs):
        self.result = self.error = self.done_at = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as e:  # the test inspects it
            self.error = e
        finally:
            self.done_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still blocked after {timeout} s"


def engine(model: str, **kwargs) -> Engine:
    kwargs.setdefault("tensor_parallel_size", TP)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("max_restarts", 0)  # fail-stop: a death here ends the engine (see
    # test_recovery.py for the restarts)
    return Engine(model, **kwargs)


@pytest.fixture(scope="module")
def warm(tiny_model):
    """One engine built and terminated first: the forkserver (a child for the whole session,
    with its resource tracker) then exists before any baseline is taken."""
    e = engine(tiny_model)
    e.generate("warm up", SHORT)
    e.terminate()
    return tiny_model


@pytest.fixture
def baseline(warm, tmp_path_factory, monkeypatch):
    """The resources before the test, with a private temporary directory, so IPC directories
    of engines in other processes (another test run) cannot be mistaken for ours."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("ipc")))
    time.sleep(0.05)
    return resources()


def assert_not_serving(e: Engine, error: type[EngineError]) -> None:
    with pytest.raises(error):
        e.generate("hello", SHORT)
    with pytest.raises(error):
        e.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(error):
        e.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  stream=True)
    with pytest.raises(error):
        e.completions.create(prompt="hello", max_tokens=4)


# --- 1. terminate() is idempotent; calls after it raise; the context manager terminates -----

@pytest.mark.timeout(60)
def test_terminate_twice_and_calls_after_terminate(warm, baseline):
    e = engine(warm)
    assert e.state == "running"
    pids = e.worker_pids
    assert len(pids) == TP and all(alive(p) for p in pids)
    assert len(e.generate("hello", SHORT)[0].token_ids) == 4

    e.terminate()
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    start = time.monotonic()
    e.terminate()
    e.terminate(timeout=0)
    assert time.monotonic() - start < 0.05
    assert e.state == "terminated"
    assert_not_serving(e, EngineTerminatedError)
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_terminate_from_many_threads_at_once(warm, baseline):
    e = engine(warm)
    pids = e.worker_pids
    barrier = threading.Barrier(4)

    def terminate():
        barrier.wait()
        e.terminate()

    callers = [Background(terminate) for _ in range(4)]
    for c in callers:
        c.join(10)
        assert c.error is None
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_context_manager_terminates_on_exit(warm, baseline):
    with engine(warm) as e:
        pids = e.worker_pids
        assert e.generate("hello", SHORT)[0].finish_reason == "length"
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    assert_back_to(baseline)

    with pytest.raises(KeyError), engine(warm) as e:  # also when the body raises
        pids = e.worker_pids
        raise KeyError("boom")
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    assert_back_to(baseline)


# --- 2. a constructor that fails leaves nothing behind -----------------------------------------

def test_missing_checkpoint_leaves_nothing(baseline, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        engine(str(tmp_path / "no-such-model"))
    assert_back_to(baseline)


def test_tp_past_the_heads_leaves_nothing(warm, baseline):
    with pytest.raises(ConfigError) as info:
        engine(warm, tensor_parallel_size=5)  # the tiny model has 4 heads
    assert "tensor_parallel_size=5" in str(info.value) and "4" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert_back_to(baseline)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", [0.0, 0.7])
def test_worker_killed_while_loading(warm, baseline, delay):
    """spawn makes each worker import torch (more than a second): kill one meanwhile, at
    once or in the middle of its imports."""
    ctor = Background(engine, warm, start_method="spawn")
    deadline = time.monotonic() + 20
    workers: list[psutil.Process] = []
    while len(workers) < TP:
        assert time.monotonic() < deadline, "the workers never appeared"
        assert ctor.done_at is None, f"constructor returned early: {ctor.error!r}"
        workers = [p for p in psutil.Process().children(recursive=True)
                   if p.pid not in baseline["children"]]
        time.sleep(0.01)
    assert len(workers) == TP, [_describe(p.pid) for p in workers]
    # ranks are started in order: rank 1 is the younger process
    rank1 = sorted(workers, key=lambda p: (p.create_time(), p.pid))[1]
    time.sleep(delay)
    assert ctor.done_at is None, f"constructor returned early: {ctor.error!r}"
    rank1.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    ctor.join(10)
    if ctor.result is not None:
        ctor.result.terminate()
    assert isinstance(ctor.error, WorkerDiedError), repr(ctor.error)
    assert ctor.error.rank == 1
    assert ctor.error.exitcode == -signal.SIGKILL
    assert "rank 1" in str(ctor.error) and "SIGKILL" in str(ctor.error)
    assert ctor.done_at - killed_at < 3.0
    assert wait_all_dead([p.pid for p in workers], 0) == []
    del ctor
    assert_back_to(baseline)


# --- 3. terminate() wakes every consumer ------------------------------------------------------

@pytest.mark.timeout(60)
def test_terminate_wakes_a_running_generate(warm, baseline):
    e = engine(warm)
    pids = e.worker_pids
    caller = Background(e.generate, LONG_PROMPTS, LONG)
    time.sleep(0.5)
    assert caller.done_at is None, "the generate finished too soon to be interrupted"
    asked_at = time.monotonic()
    e.terminate()
    caller.join(5)
    assert isinstance(caller.error, EngineTerminatedError), repr(caller.error)
    assert caller.done_at - asked_at < 1.0
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    del caller
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_terminate_interrupts_long_decode_runs(warm, baseline, caplog):
    """With 64-step runs of 48 sequences, two runs in flight take well over a second; the
    workers see SHUTDOWN between two steps, so terminate() returns at once and they leave by
    themselves (no signal had to be sent)."""
    e = engine(warm, decode_steps=64, decode_run_seconds=None)
    caller = Background(e.generate, [f"request {i}" for i in range(48)], LONG)
    deadline = time.monotonic() + 20
    while e.core.stats()["running"] < 48 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.2)  # past the prefill and the runs that double up to 64 steps
    asked_at = time.monotonic()
    with caplog.at_level("WARNING", logger="tp_engine"):
        e.terminate()
    took = time.monotonic() - asked_at
    caller.join(5)
    assert isinstance(caller.error, EngineTerminatedError), repr(caller.error)
    assert took < 0.5, f"terminate took {took:.3f} s"
    assert not [r for r in caplog.records if "worker pids" in r.getMessage()]
    del caller
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_terminate_wakes_a_chat_stream_consumer(warm, baseline):
    e = engine(warm)
    pids = e.worker_pids
    stream = e.chat.completions.create(messages=[{"role": "user", "content": "Tell a story"}],
                                       max_tokens=400, temperature=0, ignore_eos=True,
                                       stream=True)
    chunks = []

    def consume(chunks_of):
        for chunk in chunks_of:
            chunks.append(chunk)

    consumer = Background(consume, stream)
    terminate_mid_stream(e, consumer, chunks, pids)
    del consumer
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_terminate_wakes_an_async_stream_consumer(warm, baseline):
    e = AsyncEngine(warm, tensor_parallel_size=TP, device="cpu")
    pids = e.worker_pids
    chunks = []

    async def consume():
        stream = await e.chat.completions.create(
            messages=[{"role": "user", "content": "Tell a story"}], max_tokens=400,
            temperature=0, ignore_eos=True, stream=True)
        async for chunk in stream:
            chunks.append(chunk)

    consumer = Background(asyncio.run, consume())
    terminate_mid_stream(e, consumer, chunks, pids)
    del consumer
    assert_back_to(baseline)


def terminate_mid_stream(e, consumer: Background, chunks: list, pids: list[int]) -> None:
    """Once the consumer has a few chunks, terminate(): it must be woken within a second."""
    deadline = time.monotonic() + 10
    while len(chunks) < 5:
        assert time.monotonic() < deadline and consumer.done_at is None, repr(consumer.error)
        time.sleep(0.01)
    asked_at = time.monotonic()
    e.terminate()
    consumer.join(5)
    assert isinstance(consumer.error, EngineTerminatedError), repr(consumer.error)
    assert consumer.done_at - asked_at < 1.0
    assert 5 <= len(chunks) < 400
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []


# --- 4. a worker dies mid-generation --------------------------------------------------------

@pytest.mark.timeout(60)
def test_worker_sigkilled_mid_generation(warm, baseline):
    """The surviving rank's collective fails at the same moment (its peer is gone), and that
    failure races the death notice: whichever comes first, the caller must get WorkerDiedError.
    Several rounds, killing rank 1 and rank 0 in turn, so that a lost race shows."""
    for attempt in range(6):
        kill_mid_generation(warm, rank=1 - attempt % 2, attempt=attempt)
        assert_back_to(baseline)


def kill_mid_generation(model: str, rank: int, attempt: int) -> None:
    e = engine(model)
    pids = e.worker_pids
    try:
        caller = Background(e.generate, LONG_PROMPTS, LONG)
        time.sleep(0.3)
        assert caller.done_at is None, "the generate finished too soon"
        os.kill(pids[rank], signal.SIGKILL)
        killed_at = time.monotonic()
        caller.join(5)
        where = f"attempt {attempt}, killed rank {rank}: {caller.error!r}"
        assert caller.done_at - killed_at < 1.0, where
        assert isinstance(caller.error, WorkerDiedError), where
        assert caller.error.rank == rank, where
        assert caller.error.exitcode == -signal.SIGKILL, where
        assert f"rank {rank}" in str(caller.error), where
        assert e.state == "failed"
        with pytest.raises(WorkerDiedError):
            e.generate("hello", SHORT)
        with pytest.raises(WorkerDiedError):
            e.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=4)
    finally:
        start = time.monotonic()
        e.terminate()
        took = time.monotonic() - start
    assert e.state == "terminated"
    assert took < e.config.terminate_timeout + 3.0  # its timeout, then SIGTERM and SIGKILL
    assert wait_all_dead(pids, 0) == []
    e.terminate()  # still idempotent


@pytest.mark.timeout(60)
def test_idle_worker_death_is_noticed_within_a_second(warm, baseline):
    e = engine(warm)
    pids = e.worker_pids
    e.generate("hello", SHORT)
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    while e.state != "failed" and time.monotonic() - killed_at < 1.0:
        time.sleep(0.01)
    assert e.state == "failed"
    with pytest.raises(WorkerDiedError) as info:
        e.generate("hello", SHORT)
    assert info.value.rank == 0 and "rank 0" in str(info.value)
    e.terminate()
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_terminate_is_bounded_when_a_worker_hangs(warm, baseline):
    """A worker that stops answering (SIGSTOP mid-step) neither strands the caller nor holds
    terminate() past its timeout by more than the SIGTERM/SIGKILL escalation."""
    e = engine(warm)
    pids = e.worker_pids
    caller = Background(e.generate, LONG_PROMPTS, LONG)
    time.sleep(0.5)
    assert caller.done_at is None
    os.kill(pids[1], signal.SIGSTOP)
    try:
        time.sleep(0.2)
        assert caller.done_at is None  # a stopped worker is not a dead one
        asked_at = time.monotonic()
        e.terminate(timeout=1.0)
        took = time.monotonic() - asked_at
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    caller.join(1)
    assert isinstance(caller.error, EngineTerminatedError), repr(caller.error)
    assert caller.done_at - asked_at < 1.0
    assert took < 1.0 + 2.0, f"terminate(timeout=1) took {took:.2f} s"
    assert e.state == "terminated"
    assert wait_all_dead(pids, 0) == []
    del caller
    assert_back_to(baseline)


# --- 5, 6. the controller dies, or never calls terminate() -----------------------------------

SIGKILLED_CONTROLLER = """
    import json, sys
    from tp_engine import AsyncEngine, Engine, SamplingParams

    if __name__ == "__main__":
        engine = Engine(sys.argv[1], tensor_parallel_size=2, device="cpu")
        print(json.dumps(engine.worker_pids), flush=True)
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        engine.generate(["hello"] * 4, params)
        print("finished", flush=True)
"""

NO_TERMINATE = """
    import json, sys
    from tp_engine import AsyncEngine, Engine, SamplingParams

    if __name__ == "__main__":
        engine = Engine(sys.argv[1], tensor_parallel_size=2, device="cpu")
        print(json.dumps(engine.worker_pids), flush=True)
        out = engine.generate("hello", SamplingParams(max_tokens=8, temperature=0,
                                                      ignore_eos=True))
        assert len(out[0].token_ids) == 8
        print("done", flush=True)
"""


def script(tmp_path: Path, name: str, source: str) -> tuple[list[str], dict]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return [sys.executable, str(path)], env


@pytest.mark.timeout(60)
def test_workers_exit_when_the_controller_is_sigkilled(warm, tmp_path):
    cmd, env = script(tmp_path, "controller.py", SIGKILLED_CONTROLLER)
    proc = subprocess.Popen([*cmd, warm], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the controller printed nothing; stderr:\n{proc.stderr.read()}"
        pids = json.loads(line)
        assert len(pids) == TP and all(alive(p) for p in pids)
        descendants = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        time.sleep(0.3)  # into the generate
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    left = wait_all_dead(pids, 2.0 - (time.monotonic() - killed_at))
    assert left == [], f"workers alive 2 s after the controller's SIGKILL: {left}"
    # the forkserver and resource tracker it started go too (a little later is fine)
    others = wait_all_dead(descendants, 5.0)
    assert others == [], {pid: _describe(pid) for pid in others}


@pytest.mark.timeout(60)
def test_script_without_terminate_exits_cleanly(warm, tmp_path):
    cmd, env = script(tmp_path, "no_terminate.py", NO_TERMINATE)
    start = time.monotonic()
    done = subprocess.run([*cmd, warm], capture_output=True, text=True, env=env, timeout=30)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert took < 15, f"the script took {took:.1f} s to exit"
    lines = done.stdout.splitlines()
    assert lines[-1] == "done"
    pids = json.loads(lines[0])
    assert len(pids) == TP
    assert wait_all_dead(pids, 1.0) == []
    assert "Traceback" not in done.stderr, done.stderr
    assert "leaked" not in done.stderr, done.stderr
    leftovers = [n for n in os.listdir(tmp_path / "tmp") if n.startswith("tp-engine-")]
    assert leftovers == [], f"IPC directories left: {leftovers}"


UNGUARDED = """
    import sys
    from tp_engine import Engine, SamplingParams

    engine = Engine(sys.argv[1], tensor_parallel_size=2, device="cpu", start_method=sys.argv[2])
    out = engine.generate("hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    print(len(out[0].token_ids), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_script_with_no_main_guard_read_from_stdin_works(warm, tmp_path, method):
    """multiprocessing would re-run such a script in every worker; ours do not."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-", warm, method], input=textwrap.dedent(UNGUARDED),
                          capture_output=True, text=True, env=env, timeout=45)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4"]
    assert "failed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


# --- 7, 8. engine after engine; dropping the last reference ----------------------------------

@pytest.mark.timeout(90)
def test_ten_engines_in_a_row_leave_nothing(warm, baseline):
    all_pids = []
    for i in range(10):
        e = engine(warm)
        all_pids += e.worker_pids
        out = e.generate(f"engine {i}", SHORT)
        assert len(out[0].token_ids) == 4
        e.terminate()
        assert e.state == "terminated"
    del e
    assert len(set(all_pids)) == 10 * TP
    assert wait_all_dead(all_pids, 0) == []
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_dropping_the_last_reference_reaps_the_workers(warm, baseline):
    e = engine(warm)
    pids = e.worker_pids
    assert len(e.generate("hello", SHORT)[0].token_ids) == 4
    del e  # no gc.collect(): reference counting alone must do it
    assert wait_all_dead(pids, 2.0) == []
    assert_back_to(baseline)


# --- 9. the private IPC directory ------------------------------------------------------------

@pytest.mark.timeout(60)
def test_ipc_directory_is_private_and_removed(warm, baseline):
    e = engine(warm)
    try:
        [name] = ipc_dirs()
        path = os.path.join(ipc_base(), name)
        assert os.stat(path).st_mode & 0o777 == 0o700
        assert os.listdir(path), "the IPC directory should hold the control socket"
        e.generate("hello", SHORT)
    finally:
        e.terminate()
    assert not os.path.exists(path)
    assert_back_to(baseline)


@pytest.mark.timeout(60)
def test_a_temp_directory_too_long_for_a_socket_path(warm, baseline, tmp_path, monkeypatch):
    """A socket's path holds at most 107 bytes: under a longer TMPDIR the IPC directory is
    made in /tmp instead, and is removed from there."""
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    assert ipc_base() == "/tmp"
    e = engine(warm)
    try:
        [name] = ipc_dirs()
        assert e.generate("hello", SHORT)[0].token_ids
    finally:
        e.terminate()
    assert not os.path.exists(os.path.join("/tmp", name))
    assert_back_to(baseline)


# --- 10. the forkserver goes with the controller ---------------------------------------------

TERMINATED_THEN_EXITS = """
    import json, sys
    import psutil
    from tp_engine import Engine

    engine = Engine(sys.argv[1], tensor_parallel_size=2, device="cpu")
    workers = engine.worker_pids
    engine.terminate()
    [server] = [p.pid for p in psutil.Process().children()
                if "multiprocessing.forkserver" in " ".join(p.cmdline())]
    print(json.dumps({"forkserver": server, "workers": workers}), flush=True)
"""


@pytest.mark.timeout(60)
def test_the_forkserver_is_gone_when_the_controller_exits(warm, tmp_path):
    """Left to itself, the forkserver (torch loaded) outlived a controller that exited
    normally by 0.5-2.5 s, orphaned, shutting its own interpreter down."""
    cmd, env = script(tmp_path, "exits.py", TERMINATED_THEN_EXITS)
    # stderr to a file and no wait for stdout's end: the forkserver inherits both, so reading
    # them to the end would wait for it too
    with (tmp_path / "stderr").open("w+") as stderr:
        proc = subprocess.Popen([*cmd, warm], stdout=subprocess.PIPE, stderr=stderr, env=env,
                                text=True)
        try:
            line = proc.stdout.readline()
            code = proc.wait(45)
            exited_at = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        stderr.seek(0)
        errors = stderr.read()
    assert code == 0 and line, errors
    pids = json.loads(line)
    left = wait_all_dead([pids["forkserver"], *pids["workers"]],
                         0.5 - (time.monotonic() - exited_at))
    assert left == [], {pid: _describe(pid) for pid in left}
    assert "Traceback" not in errors, errors
