"""The lifecycle measurements that need a fresh controller process: a cold start (nothing
imported, no forkserver yet) and a controller killed by SIGKILL. The child runs `_child` from a
`python -c` line that notes the time before anything of tp_engine is imported; it prints one
JSON line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

CHILD = ("import time; start = time.perf_counter(); import sys, json; "
         "from tp_engine.bench.lifecycle_proc import _child; "
         "_child(json.loads(sys.argv[1]), sys.argv[2], start)")


def _child(kwargs: dict, mode: str, start: float) -> None:
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


def _spawn(kwargs: dict, mode: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(kwargs), mode],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"the benchmark's controller process exited with {proc.returncode}")
    return proc, json.loads(line)


def cold_start(kwargs: dict) -> tuple[float, float]:
    """(seconds to import tp_engine, seconds for Engine(...) to be ready) in a fresh process."""
    proc, info = _spawn(kwargs, "cold")
    proc.wait(timeout=60)
    return info["import_s"], info["ready_s"]


def controller_kill(kwargs: dict, timeout: float = 10.0) -> float:
    """Seconds from SIGKILL of a busy controller until none of its workers runs any more."""
    proc, info = _spawn(kwargs, "kill")
    pids = info["pids"]
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
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
