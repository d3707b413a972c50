"""The worker processes of one engine: spawned, made ready, watched and reaped.

Workers start from a forkserver that has already imported torch (milliseconds instead of a
second each), or by spawn. Each gets the read end of a pipe whose only writer is this process,
so it notices our death even when the kernel's parent-death signal cannot reach it."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.forkserver as mp_forkserver
import multiprocessing.spawn as mp_spawn
import os
import signal
import threading
import time
from multiprocessing.connection import wait as wait_any

import zmq

from tp_engine import wire
from tp_engine.config import EngineConfig
from tp_engine.engine.resources import Deadline
from tp_engine.errors import EngineError, WorkerDiedError
from tp_engine.worker.main import WorkerArgs, worker_main

log = logging.getLogger("tp_engine.workers")


_launch_lock = threading.Lock()


def _start_without_main(proc: mp.process.BaseProcess) -> None:
    """Start a worker without re-running the user's main script in it. multiprocessing
    re-imports __main__ in every child it does not fork, so that functions defined there can
    be unpickled; a worker needs none of them, and a script without an
    `if __name__ == "__main__":` guard (or one read from stdin) would otherwise break. The
    change is confined to our own start() calls, under a lock."""
    original = mp_spawn.get_preparation_data

    def preparation(name: str) -> dict:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _launch_lock:
        mp_spawn.get_preparation_data = preparation
        try:
            proc.start()
        finally:
            mp_spawn.get_preparation_data = original


def _context(method: str) -> mp.context.BaseContext:
    ctx = mp.get_context(method)
    if method == "forkserver":
        # torch and the model code, imported once; each worker then starts in milliseconds
        ctx.set_forkserver_preload(["tp_engine.worker.main", "tp_engine.worker.model_runner"])
    return ctx


def _stop_forkserver() -> None:
    """At interpreter exit, stop the forkserver this process started. Left alone, it sees our
    exit only as the end of its "alive" pipe, and then shuts its own interpreter down with
    torch loaded (0.5 s on an idle machine, 1-2.5 s on a busy one), an orphan all the while.
    It holds nothing worth a clean exit, so it is killed and reaped here, and then
    multiprocessing's own ForkServer._stop() closes the pipe and removes its socket. Only at
    exit: while the process lives, a warm forkserver starts the next engine in ~100 ms."""
    server = getattr(mp_forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:  # never started, or started by our parent, not by us
        return
    if mp.active_children():  # the user's own processes, which may be its children: their
        return                # exit codes pass through it, so it goes when they do
    try:
        os.kill(pid, signal.SIGKILL)
        server._stop()
    except (OSError, AttributeError):  # already gone or reaped; or no _stop() (a new Python)
        pass


# Registered at import, before any engine exists: atexit runs the last registered hook first,
# so the one that terminates the live engines (registered with the first engine) runs before
# this one, and no worker is running when its forkserver goes.
atexit.register(_stop_forkserver)


class WorkerGroup:
    """`replica`: which of the engine's data-parallel groups this is; its sockets and
    rendezvous live in `ipc_dir`, its own."""

    def __init__(self, config: EngineConfig, ipc_dir: str, replica: int = 0):
        self.config = config
        self.size = config.tensor_parallel_size
        self.replica = replica
        # errors name the replica only where there is more than one
        self.label = replica if config.data_parallel_size > 1 else None
        self.ipc_dir = ipc_dir
        self.ctx = zmq.Context()
        self.router, self.endpoint = wire.bind_router(
            self.ctx, wire.control_endpoint(ipc_dir, config.host))
        self.link = wire.Link(self.router, config.auth_key_bytes)
        self.procs: list[mp.process.BaseProcess] = []
        self._alive_writers = []
        self.ready: dict[int, wire.Ready] = {}
        self.shutdown_sent = False

    restartable = True  # a torchrun group's ranks are torchrun's to restart

    def restart(self) -> None:
        """A fresh group in place of this one, on the same socket: every rank reaped (the
        survivors of a death too), the rendezvous file removed, the ranks started again and
        READY. Raises as start-up does when the new group fails to load."""
        self.reap(Deadline(self.config.terminate_timeout), grace=False)
        self._close_exited()
        self.procs, self.ready, self.shutdown_sent = [], {}, False
        if os.path.exists(self.store):
            os.remove(self.store)
        while self.router.poll(0):  # what the dead group said last is nobody's news now
            self.recv()
        self.start()
        self.wait_ready(self.config.startup_timeout)

    @property
    def store(self) -> str:
        """The process group's rendezvous file."""
        return os.path.join(self.ipc_dir, "store")

    def start(self) -> None:
        ctx = _context(self.config.start_method)
        init_method = f"file://{self.store}"
        for rank in range(self.size):
            reader, writer = ctx.Pipe(duplex=False)
            args = WorkerArgs(self.config, rank, self.size, self.endpoint, init_method,
                              os.getpid(), replica=self.replica)
            name = "tp-engine-worker-" + (f"{self.label}-" if self.label is not None else "")
            proc = ctx.Process(target=worker_main, args=(args, reader), name=f"{name}{rank}",
                               daemon=True)
            self.procs.append(proc)
            self._alive_writers.append(writer)
            _start_without_main(proc)
            reader.close()

    def wait_ready(self, timeout: float) -> None:
        """Return when every rank is READY; raise, naming the rank, when one fails or dies."""
        deadline = Deadline(timeout)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        for proc in self.procs:
            poller.register(proc.sentinel, zmq.POLLIN)
        while len(self.ready) < self.size:
            if deadline.left() == 0:
                missing = sorted(set(range(self.size)) - set(self.ready))
                raise EngineError(f"worker ranks {missing}{self.where} not ready after "
                                  f"{timeout:.0f} s (startup_timeout)")
            events = dict(poller.poll(deadline.left() * 1000))
            while self.router.poll(0):  # messages first: a LoadFailed says more than a death
                self._on_startup_message(self.recv())
            fired = [s for s in self.sentinels if s in events]
            if fired:
                time.sleep(0.05)  # a dying worker's last message may still be in flight
                while self.router.poll(0):
                    self._on_startup_message(self.recv())
                error = self.died(fired[0])
                raise WorkerDiedError(error.rank, error.exitcode,
                                      f"while loading {self.config.model}", self.label)

    def _on_startup_message(self, msg: wire.Message | None) -> None:
        if isinstance(msg, wire.Ready):
            self.ready[msg.rank] = msg
        elif isinstance(msg, wire.LoadFailed):
            raise EngineError(f"worker rank {msg.rank}{self.where} failed to load "
                              f"{self.config.model}: {msg.error}")

    def recv(self) -> wire.Message | None:
        """One message from any worker; None for a malformed frame (logged and dropped)."""
        try:
            return self.link.recv()[1]
        except wire.WireError as e:
            log.warning("dropped a frame: %s", e)
            return None

    def broadcast(self, msg: wire.Message) -> None:
        frames = self.link.frames(msg)
        for rank in range(self.size):
            try:
                self.router.send_multipart([wire.identity(rank), *frames], copy=False)
            except zmq.ZMQError:  # that worker is gone; its sentinel reports it
                pass

    def send_shutdown(self) -> None:
        if not self.shutdown_sent and self.ready:
            self.shutdown_sent = True
            self.broadcast(wire.Shutdown())

    @property
    def sentinels(self) -> list[int]:
        return [proc.sentinel for proc in self.procs]

    def died(self, sentinel: int) -> WorkerDiedError:
        """The error for the worker whose sentinel fired; its exit status can lag a moment."""
        rank = self.sentinels.index(sentinel)
        self.procs[rank].join(0.5)
        return WorkerDiedError(rank, self.procs[rank].exitcode, replica=self.label)

    def dead(self) -> list[tuple[int, int | None]]:
        return [(rank, proc.exitcode) for rank, proc in enumerate(self.procs)
                if not proc.is_alive()]

    @property
    def where(self) -> str:
        return "" if self.label is None else f" of replica {self.label}"

    def reap(self, deadline: Deadline, grace: bool = True) -> None:
        """Wait for the workers to leave; then SIGTERM, then SIGKILL, all within the deadline
        (the last quarter of it, at most a second, is kept for the signals). Only our own
        children are ever signalled."""
        started = [p for p in self.procs if p.pid is not None]
        reserve = min(1.0, deadline.seconds / 4)
        if grace:
            _wait_all(started, deadline.left() - reserve)
        for signal_name in ("terminate", "kill"):
            alive = [p for p in started if p.is_alive()]
            if not alive:
                break
            log.warning("%s worker pids %s", signal_name, [p.pid for p in alive])
            for p in alive:
                getattr(p, signal_name)()
            share = deadline.left() / 2 if signal_name == "terminate" else deadline.left()
            _wait_all(alive, max(share, 0.05))
        for writer in self._alive_writers:
            writer.close()
        self._alive_writers.clear()

    def close(self, deadline: Deadline | None = None) -> None:
        self.router.close(linger=0)
        self.ctx.term()
        self._close_exited()

    def _close_exited(self) -> None:
        for p in self.procs:
            if p.exitcode is not None:
                p.close()


def _wait_all(procs: list[mp.process.BaseProcess], seconds: float) -> None:
    """Until every process is reaped, or `seconds` pass. A sentinel can fire a moment before
    the exit status can be collected, hence the short joins."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            return
        wait_any([p.sentinel for p in alive], timeout=max(0.0, end - time.monotonic()))
        for p in alive:
            p.join(0.01)
