"""The lifecycle measurements that run in a controller process of their own: a cold start
(nothing imported, no forkserver yet), a controller killed by SIGKILL, and a worker killed by
SIGKILL. The child runs `_child` from a `python -c` line that notes the time before anything of
tp_engine is imported; it prints one JSON line.

The deliberate kills make the engine say what a real failure would: the controller logs
"engine failed: worker rank 1 died (killed by signal SIGKILL)", and the surviving rank logs
"rank 0 failed step N: ... Connection reset by peer" (gloo's exception, logged by the
worker's own logger in the worker process, out of reach of any logger level set in the
benchmark's process). So the children that kill write their stderr, their workers' with it
(the forkserver a child starts inherits its stderr), to a file, shown only when the
measurement itself fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from tp_engine import wire

CHILD = ("import time; start = time.perf_counter(); import sys, json; "
         "from tp_engine.bench.lifecycle_proc import _child; "
         "_child(json.loads(sys.argv[1]), sys.argv[2], start, *sys.argv[3:])")


def _child(kwargs: dict, mode: str, start: float, runs: str = "1") -> None:
    if mode in ("worker-kill", "worker-restart"):
        from tp_engine.bench import lifecycle

        measure = lifecycle.worker_kill if mode == "worker-kill" else lifecycle.worker_restart
        print(json.dumps({"seconds": measure(kwargs, int(runs))}), flush=True)
        return
    from tp_engine import Engine, SamplingParams

    imported = time.perf_counter()
    engine = Engine(**kwargs)
    ready = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "ready_s": ready - imported,
                      "pids": engine.worker_pids}), flush=True)
    if mode == "cold":
        engine.terminate()
        return
    # "kill": stay busy until the parent kills us
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    while True:
        engine.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, params)


def _spawn(kwargs: dict, mode: str, *args: str, stderr=None,
           env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(kwargs), mode, *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"the benchmark's controller process exited with {proc.returncode}"
                           + _tail(stderr))
    return proc, json.loads(line)


def _stderr_file():
    return tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")


def _tail(stderr, chars: int = 4000) -> str:
    """The end of a child's stderr file, to show when its measurement failed."""
    if stderr is None:
        return ""
    stderr.seek(0)
    return ":\n" + stderr.read()[-chars:]


def cold_start(kwargs: dict) -> tuple[float, float]:
    """(seconds to import tp_engine, seconds for Engine(...) to be ready) in a fresh process."""
    proc, info = _spawn(kwargs, "cold")
    proc.wait(timeout=60)
    return info["import_s"], info["ready_s"]


def worker_kill(kwargs: dict, runs: int, mode: str = "worker-kill") -> list[float]:
    """lifecycle.worker_kill (or worker_restart, with mode "worker-restart"), in a controller
    of its own whose stderr is kept out of sight."""
    with _stderr_file() as stderr:
        proc, info = _spawn(kwargs, mode, str(runs), stderr=stderr)
        proc.wait(timeout=60)
        seconds = info["seconds"]
        if proc.returncode != 0 or float("inf") in seconds:  # a death was missed: say why
            sys.stderr.write(f"{mode}: exit {proc.returncode}{_tail(stderr)}\n")
    return seconds


def controller_kill(kwargs: dict, timeout: float = 10.0) -> float:
    """Seconds from SIGKILL of a busy controller until none of its workers runs any more."""
    # a controller killed so cannot remove its IPC directory nor multiprocessing's: it gets a
    # temp directory of its own, removed here
    with tempfile.TemporaryDirectory(prefix="tpe-bench-") as tmp:
        with _stderr_file() as stderr:  # a worker may see its peer leave first, and say so
            proc, info = _spawn(kwargs, "kill", stderr=stderr, env=dict(os.environ, TMPDIR=tmp))
        return _until_gone(proc, info["pids"], timeout)


def _until_gone(proc: subprocess.Popen, pids: list[int], timeout: float) -> float:
    time.sleep(0.3)  # let it get busy
    start = time.perf_counter()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while any(_running(pid) for pid in pids):
        if time.perf_counter() - start > timeout:
            for pid in pids:  # the workers of the controller we started, and only those
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
            return float("inf")
        time.sleep(0.0005)
    return time.perf_counter() - start


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited worker whose parent has not reaped it yet)."""
    return wire.process_state(pid) not in ("", "Z")
