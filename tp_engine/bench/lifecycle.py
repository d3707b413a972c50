"""`tp-engine bench lifecycle`: the cost of every lifecycle step of a TP engine (default TP=2):
a cold start, a second engine in the same process, terminate() idle and with requests in
flight, a worker's SIGKILL until the caller's WorkerDiedError (fail-stop) and until a stream's
next token (the group restarted), a controller's SIGKILL until no worker is left."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from tp_engine.bench import common, lifecycle_proc

TARGETS_MS = {"cold": 2000, "warm": 500, "terminate idle": 100, "terminate busy": 200,
              "worker kill": 100, "worker restart": 1000, "controller kill": 500}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=5, help="runs of each in-process measurement")
    p.add_argument("--process-runs", type=int, default=3,
                   help="runs of each measurement that starts a fresh process (slower)")
    p.add_argument("--in-flight", type=int, default=64)


def _submit(engine, n: int, max_tokens: int = 100_000) -> list:
    from tp_engine import SamplingParams
    from tp_engine.engine.request import SyncSink

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [engine.core.submit([5 + i % 50, 6, 7], params, SyncSink()) for i in range(n)]


def _first_token(state) -> None:
    """Wait until the request has produced a token: the engine is mid-generation."""
    while not state.get().token_ids:
        pass


def warm_and_terminate(kwargs: dict, runs: int, in_flight: int) -> dict[str, list[float]]:
    from tp_engine import Engine

    Engine(**kwargs).terminate()  # the first engine of this process starts the forkserver
    out: dict[str, list[float]] = {"warm": [], "terminate idle": [], "terminate busy": []}
    for _ in range(runs):
        start = time.perf_counter()
        engine = Engine(**kwargs)
        out["warm"].append(time.perf_counter() - start)
        out["terminate idle"].append(common.timed(engine.terminate))
    for _ in range(runs):
        engine = Engine(**kwargs)
        states = _submit(engine, in_flight)
        _first_token(states[-1])
        out["terminate busy"].append(common.timed(engine.terminate))
        if not all(state.finished for state in states):  # every consumer must be woken
            raise RuntimeError("a request in flight was not failed by terminate()")
    return out


def worker_kill(kwargs: dict, runs: int) -> list[float]:
    """Seconds from SIGKILL of rank 1 (rank 0 if alone) until the waiting caller raises. Run
    by lifecycle_proc in a controller of its own, which keeps the failure messages that the
    kills cause (in this controller and in the surviving workers) off the user's terminal."""
    from tp_engine import Engine
    from tp_engine.errors import WorkerDiedError

    seconds = []
    for _ in range(runs):
        engine = Engine(**{**kwargs, "max_restarts": 0})  # the death is the error measured
        try:
            state = _submit(engine, 1)[0]
            _first_token(state)
            raised: list[float] = []

            def wait(state=state, raised=raised) -> None:
                while True:
                    delta = state.get()
                    if isinstance(delta.error, WorkerDiedError):
                        raised.append(time.perf_counter())
                        return
                    if delta.finish_reason is not None:
                        return

            caller = threading.Thread(target=wait)
            caller.start()
            pid = engine.worker_pids[-1]
            start = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            caller.join(10)
            seconds.append(raised[0] - start if raised else float("inf"))
        finally:
            engine.terminate()
    return seconds


def worker_restart(kwargs: dict, runs: int) -> list[float]:
    """Seconds from SIGKILL of a worker until a streaming request's next token, which the
    engine makes after restarting the group and recomputing the request (one engine, a kill a
    run, rank 1 and rank 0 in turn). Run by lifecycle_proc in a controller of its own."""
    from tp_engine import Engine, SamplingParams
    from tp_engine.engine.request import SyncSink

    seconds = []
    params = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
    with Engine(**{**kwargs, "max_restarts": runs}) as engine:
        for run in range(runs):
            state = engine.core.submit([5, 6, 7], params, SyncSink(), stream=True)
            _first_token(state)
            state.take()
            start = time.perf_counter()
            os.kill(engine.worker_pids[(run + 1) % len(engine.worker_pids)], signal.SIGKILL)
            while not state.get().token_ids:
                pass
            seconds.append(time.perf_counter() - start)
            engine.core.abort(state)
    return seconds


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    kwargs = {"tensor_parallel_size": 2, **engine_kwargs}
    results: dict[str, list[float]] = {"cold": [], "import": [], "controller kill": []}
    for _ in range(args.process_runs):
        imported, ready = lifecycle_proc.cold_start(kwargs)
        results["import"].append(imported)
        results["cold"].append(ready)
    results.update(warm_and_terminate(kwargs, args.runs, args.in_flight))
    results["worker kill"] = lifecycle_proc.worker_kill(kwargs, args.runs)
    results["worker restart"] = lifecycle_proc.worker_kill(kwargs, args.runs, "worker-restart")
    for _ in range(args.process_runs):
        results["controller kill"].append(lifecycle_proc.controller_kill(kwargs))
    tp = kwargs["tensor_parallel_size"]
    names = {
        "import": "`import tp_engine` in a fresh process (not part of the target)",
        "cold": f"Engine(tp={tp}) ready, cold (fresh process, forkserver included)",
        "warm": f"Engine(tp={tp}) ready, a later engine in the same process",
        "terminate idle": "terminate(), idle",
        "terminate busy": f"terminate() with {args.in_flight} requests in flight",
        "worker kill": "worker SIGKILL -> WorkerDiedError in the caller (max_restarts=0)",
        "worker restart": "worker SIGKILL -> a stream's next token, after the restart",
        "controller kill": "controller SIGKILL -> no worker left",
    }
    rows = []
    for key, label in names.items():
        values = results[key]
        target = TARGETS_MS.get(key)
        value = common.ms(common.median(values))
        rows.append([label, f"{value:.1f}", f"{common.ms(min(values)):.1f}-"
                     f"{common.ms(max(values)):.1f}", len(values),
                     f"< {target}" if target else "", common.verdict(value, target)])
    common.print_machine(common.machine({"model": kwargs["model"],
                                         "device": kwargs.get("device", "auto")}))
    common.print_table(f"lifecycle, TP={tp}", ["step", "median ms", "range ms", "runs",
                                               "target ms", "verdict"], rows)
    return 0
