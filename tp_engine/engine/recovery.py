"""What a worker group's failure becomes: a fresh group, up to `max_restarts` times in an
engine's life, or the engine's end.

A failure is a death (a worker's sentinel fires), a step one rank reports as failed, or a
step past `step_timeout` (a hung worker, SIGSTOP say). Each ends the whole group: the
survivors wait for the failed rank in a collective. The request loop then requeues every
sequence as preempted (engine/request_loop), and a group that dies while starting counts as a
restart too, so a crash loop ends."""

from __future__ import annotations

import logging
from collections.abc import Callable
from multiprocessing.connection import wait as wait_any

from tp_engine import wire
from tp_engine.engine.worker_group import WorkerGroup
from tp_engine.errors import EngineError, WorkerDiedError

log = logging.getLogger("tp_engine.request_loop")
DEATH_NOTICE_S = 0.5


class Recovery:
    def __init__(self, group: WorkerGroup, max_restarts: int, step_timeout: float | None):
        self.group = group
        self.max_restarts = max_restarts
        self.step_timeout = step_timeout
        self.restarts = 0         # worker groups started after a failure
        self.restarting = False   # a new group is starting (the server's /health says so)

    @property
    def can_restart(self) -> bool:
        return self.group.restartable and self.restarts < self.max_restarts

    def restart(self, error: WorkerDiedError, stopping: Callable[[], bool]) -> None:
        """Start a fresh group in place of the failed one; raise the failure (with the last
        start's error) once the restarts are spent."""
        death = error
        self.restarting = True
        try:
            while True:
                self.restarts += 1
                log.error("%s: restarting the worker group (%d of %d)", error, self.restarts,
                          self.max_restarts)
                try:
                    self.group.restart()
                    return
                except EngineError as e:  # the new group failed to start: that counts too
                    if self.restarts >= self.max_restarts or stopping():
                        raise WorkerDiedError(
                            death.rank, death.exitcode, f"{death.detail}; {self.restarts} "
                            f"restarts failed, the last: {e}".lstrip("; "),
                            death.replica) from e
                    error = e
        finally:
            self.restarting = False

    def hung(self, step_id: int) -> WorkerDiedError:
        """A step past step_timeout: the group is killed (own pids) and counts as dead,
        naming a stopped rank if there is one (the others wait for it in a collective)."""
        stopped = [rank for rank, proc in enumerate(self.group.procs)
                   if wire.process_state(proc.pid) in ("T", "t")]
        self._kill_group()
        rank = stopped[0] if stopped else 0
        return WorkerDiedError(rank, None, f"step {step_id} took over {self.step_timeout:g} s "
                                           "(step_timeout): killed as hung", self.group.label)

    def step_failure(self, msg: wire.StepFailed) -> EngineError:
        """A rank whose peer died fails its collective at the moment the peer dies, often
        before the death's sentinel is seen: wait briefly for it, and name the dead one. A
        failed step with no death ends the group too when it can restart."""
        wait_any(self.group.sentinels, timeout=DEATH_NOTICE_S)
        dead = self.group.dead()
        if dead:
            return WorkerDiedError(*dead[0], replica=self.group.label)
        failure = f"failed step {msg.step_id}: {msg.error}"
        if self.can_restart:
            self._kill_group()
            return WorkerDiedError(msg.rank, None, f"{failure}; the group is restarted",
                                   self.group.label)
        return EngineError(f"worker rank {msg.rank}{self.group.where} {failure}")

    def _kill_group(self) -> None:
        for proc in self.group.procs:
            if proc.is_alive():
                proc.kill()
