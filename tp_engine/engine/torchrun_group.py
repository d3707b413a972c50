"""The worker group when torchrun started the ranks: nothing to spawn. Rank 0 (this process)
runs its own worker loop in a thread beside the controller; the other ranks, maybe on other
nodes, connect to our TCP socket, whose address they learn through a broadcast.

Shutdown: the other ranks leave their loop, destroy their process group and say goodbye;
rank 0 destroys its own group last."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading

from tp_engine import wire
from tp_engine.config import AUTH_KEY_ENV, EngineConfig
from tp_engine.engine.resources import Deadline
from tp_engine.engine.worker_group import WorkerGroup
from tp_engine.worker.main import WorkerArgs, worker_loop
from tp_engine.worker.parent_watch import watch_parent

log = logging.getLogger("tp_engine.torchrun")
SIGTERM_GRACE_S = 15.0


class TorchrunGroup(WorkerGroup):
    restartable = False  # the job exits non-zero, and torchrun's --max-restarts restarts it

    def start(self) -> None:
        from tp_engine.worker.distributed import share_string

        # the other ranks need the address and, unless $TP_ENGINE_AUTH_KEY gave every node the
        # secret already, the HMAC secret too (then it crosses the process group's network)
        shared = "" if os.environ.get(AUTH_KEY_ENV) else self.config.auth_key
        share_string(f"{self.endpoint} {shared}", self.config.device)
        args = WorkerArgs(self.config, 0, self.size, self.endpoint, "env://", os.getpid(),
                          owns_group=False)
        self.local = threading.Thread(target=worker_loop, args=(args,), name="tp-engine-rank-0",
                                      daemon=True)
        self.local.start()

    @property
    def sentinels(self) -> list[int]:
        return []  # torchrun watches the ranks; a dead peer fails rank 0's next collective

    def dead(self) -> list[tuple[int, int | None]]:
        return []

    def reap(self, deadline: Deadline, grace: bool = True) -> None:
        waiting = set(range(self.size)) if self.shutdown_sent else set()
        while waiting and self.router.poll(deadline.left() * 1000):
            msg = self.recv()
            if isinstance(msg, wire.Goodbye):
                waiting.discard(msg.rank)
        if waiting:
            log.warning("ranks %s did not say goodbye in time", sorted(waiting))
        if hasattr(self, "local"):
            self.local.join(deadline.left())
        from tp_engine.worker.distributed import destroy_distributed

        destroy_distributed()


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def master_host() -> str:
    """The address other nodes reach rank 0 at: torchrun's MASTER_ADDR, as an IP to bind."""
    return socket.gethostbyname(os.environ.get("MASTER_ADDR", "127.0.0.1"))


def controller_host(first_rank: int) -> str:
    """Where the controller of the replica whose first rank is `first_rank` (this process)
    listens: MASTER_ADDR on rank 0; elsewhere this node's address on the interface that
    reaches MASTER_ADDR, which the ranks on other nodes reach too (a UDP connect picks the
    interface and sends nothing)."""
    master = master_host()
    if first_rank == 0 or ipaddress.ip_address(master).is_loopback:
        return master
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master, 9))
        return probe.getsockname()[0]


def run_rank(config: EngineConfig, rank: int, world_size: int) -> int:
    """A rank other than 0: wait for the controller's address, then run the worker loop.
    Preemption's SIGTERM reaches every rank; rank 0 drains and sends SHUTDOWN, so the others
    wait for it, but no longer than a grace period."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_later)
    watch_parent(None, os.getppid())
    from tp_engine.worker.distributed import share_string

    endpoint, _, key = share_string(None, config.device).partition(" ")
    config.auth_key = key or config.auth_key
    return worker_loop(WorkerArgs(config, rank, world_size, endpoint, "env://", os.getppid()))


def _exit_later(signum: int, frame: object) -> None:
    timer = threading.Timer(SIGTERM_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
