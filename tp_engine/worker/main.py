"""The worker process: one per rank. Joins the process group, loads its shard, reports READY,
then runs the steps it is sent until SHUTDOWN, and leaves with os._exit once clean.

torch is imported only where the work is done (the forkserver preloads it with the model
runner), so that the controller, which imports this module for the entry point, never pays
for it."""

from __future__ import annotations

import logging
import os
import signal
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

import zmq

from tp_engine import wire
from tp_engine.config import EngineConfig
from tp_engine.worker.interrupted import Interrupted
from tp_engine.worker.parent_watch import watch_parent

log = logging.getLogger("tp_engine.worker")


@dataclass
class WorkerArgs:
    config: EngineConfig
    rank: int
    world_size: int
    endpoint: str          # the controller's ROUTER
    init_method: str       # the process group's rendezvous
    controller_pid: int
    owns_group: bool = True  # False for rank 0 under torchrun: the controller destroys it last
    replica: int = 0         # its worker group, of the engine's data_parallel_size


def worker_main(args: WorkerArgs, alive: Connection | None) -> None:
    """Entry of a spawned worker. Never returns: the process leaves with os._exit."""
    # Signals sent to the controller's process group (Ctrl-C, `timeout`, systemd) are the
    # controller's to handle: a worker stops when told, or when its controller is gone.
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(alive, args.controller_pid)
    os._exit(worker_loop(args))


def worker_loop(args: WorkerArgs) -> int:
    """Load, report, run the loop; return the exit code. Also the torchrun worker entry."""
    ctx = zmq.Context()
    sock = wire.connect_dealer(ctx, args.endpoint, args.rank)
    link = wire.Link(sock, args.config.auth_key_bytes)
    try:
        try:
            runner = _load(args)
        except BaseException as e:  # report every failure, KeyboardInterrupt included
            detail = f"{type(e).__name__}: {e}"
            log.debug("rank %d failed to load:\n%s", args.rank, traceback.format_exc())
            _send_last(link, wire.LoadFailed(rank=args.rank, error=detail))
            return 1
        link.send(wire.Ready(rank=args.rank, pid=os.getpid(), num_kv_blocks=runner.num_blocks,
                             param_bytes=runner.param_bytes))
        _loop(args.rank, link, runner)
        if args.owns_group:
            from tp_engine.worker.distributed import destroy_distributed

            destroy_distributed()
        _send_last(link, wire.Goodbye(rank=args.rank))
        return 0
    finally:
        sock.close()  # LINGER is 0 but for a last message (see _send_last)
        ctx.term()


def _load(args: WorkerArgs):
    from tp_engine.worker.distributed import init_distributed
    from tp_engine.worker.model_runner import ModelRunner

    cfg = args.config
    dtype = cfg.worker_dtype()
    tp = init_distributed(args.rank, args.world_size, args.init_method, cfg.device,
                          timeout_s=cfg.startup_timeout,
                          device_index=None if cfg.start_method == "torchrun"
                          else args.replica * args.world_size + args.rank,
                          ranks_here=cfg.num_workers, bind_threads=cfg.cpu_bind_threads)
    return ModelRunner(cfg, tp, dtype)  # load_model checks that the TP size fits the model


class Inbox:
    """The worker's messages, in order. A run of decode steps asks between two steps whether a
    SHUTDOWN waits (behind the next step, pipelined), so that terminate() never waits for the
    runs in flight; the messages read to find out are kept for later."""

    def __init__(self, rank: int, link: wire.Link):
        self.rank, self.link = rank, link
        self._backlog: deque[wire.Message] = deque()

    def next(self) -> wire.Message:
        while not self._backlog:
            self._read()
        return self._backlog.popleft()

    def shutdown_waiting(self) -> bool:
        while self.link.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._read()
        return any(isinstance(m, wire.Shutdown) for m in self._backlog)

    def _read(self) -> None:
        try:
            self._backlog.append(self.link.recv()[1])
        except wire.WireError as e:
            log.warning("rank %d dropped a malformed frame: %s", self.rank, e)


def _loop(rank: int, link: wire.Link, runner) -> None:
    inbox = Inbox(rank, link)
    while True:
        msg = inbox.next()
        if isinstance(msg, wire.Shutdown):
            return
        if not isinstance(msg, wire.Step):
            log.warning("rank %d dropped an unexpected %s", rank, type(msg).__name__)
            continue
        def report(index: int, tokens: list[int], logprobs: list, step_id: int = msg.step_id):
            link.send(wire.StepTokens(step_id=step_id, index=index, token_ids=tokens,
                                      logprobs=logprobs))

        try:
            tokens = runner.step(msg, inbox.shutdown_waiting, report)
        except Interrupted:
            continue  # the SHUTDOWN is next in the inbox
        except Exception as e:
            log.error("rank %d failed step %d: %s", rank, msg.step_id, e)
            log.debug("rank %d step %d:\n%s", rank, msg.step_id, traceback.format_exc())
            link.send(wire.StepFailed(rank=rank, step_id=msg.step_id,
                                      error=f"{type(e).__name__}: {e}"))
            continue
        if rank == 0:
            link.send(wire.StepDone(step_id=msg.step_id, token_ids=tokens or [],
                                    steps=max(msg.decode_steps, default=1),
                                    model_seconds=runner.model_seconds,
                                    logprobs=runner.logprobs,
                                    prompt_logprobs=runner.prompt_logprobs))


def _send_last(link: wire.Link, msg: wire.Message) -> None:
    """A last message must reach the controller even though the socket closes right after."""
    link.sock.setsockopt(zmq.LINGER, 1000)
    try:
        link.send(msg, flags=zmq.NOBLOCK)
    except zmq.ZMQError:
        pass
