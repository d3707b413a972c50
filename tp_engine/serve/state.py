"""What the routes and the shutdown share: the server's phase, the engine once it is up, the
requests in flight and the metrics. Touched only from the event loop's thread."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from tp_engine.serve.errors import APIError, unavailable
from tp_engine.serve.metrics import Metrics, queue_depth

if TYPE_CHECKING:
    from tp_engine.engine.api import AsyncEngine

log = logging.getLogger("tp_engine.serve")

# starting -> serving -> draining -> stopped; failed when the engine cannot start or dies
PHASES = ("starting", "serving", "draining", "stopped", "failed")


class InFlight(Protocol):
    """What the state needs of a request in flight (a serve.jobs.Job): a drain aborts it."""

    def abort(self) -> None: ...


class ServerState:
    def __init__(self, served_name: str, max_waiting: int | None = None):
        self.served_name = served_name
        self.max_waiting = max_waiting
        self.phase = "starting"
        self.engine: AsyncEngine | None = None
        self.start_error: BaseException | None = None
        self.jobs: set[InFlight] = set()
        self.metrics = Metrics(self.stats)
        self.engine_settled = asyncio.Event()  # the engine is up, or failed to start

    # --- lifecycle, called by server.py ----------------------------------------------------

    def engine_ready(self, engine: AsyncEngine | None, error: BaseException | None) -> None:
        self.engine, self.start_error = engine, error
        if error is not None:
            self.phase = "failed"
            log.error("the engine failed to start: %s", error)
        elif self.phase == "starting":  # a signal during startup has already moved us on
            self.phase = "serving"
            log.info("engine ready: serving %s", self.served_name)
        self.engine_settled.set()

    @property
    def health(self) -> str:
        """The phase as /health reports it: an engine that died mid-run is "failed"."""
        if self.phase == "serving" and self.engine is not None:
            if self.engine.state != "running":
                return "failed"
            if self.engine.core.restarting:  # a worker died: a new group is starting
                return "restarting"
        return self.phase

    def stats(self) -> dict[str, float] | None:
        engine = self.engine
        if engine is None or engine.state != "running":
            return None
        return dict(engine.core.stats(), max_num_seqs=engine.config.max_num_seqs)

    # --- admission -------------------------------------------------------------------------

    def admit(self, model: str) -> AsyncEngine:
        """The engine, if a new request may go to it now; else the error to answer with."""
        if self.phase != "serving" or self.engine is None:
            how = {"starting": "is starting", "draining": "is shutting down",
                   "stopped": "has stopped"}.get(self.phase, "has failed")
            raise unavailable(f"the server {how}")
        if model not in (self.served_name, self.engine.config.model):
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")
        stats = self.stats()
        if stats is not None and self.max_waiting is not None:
            waiting = queue_depth(stats)
            if waiting >= self.max_waiting:
                raise APIError(429, f"too many requests waiting ({waiting}, --max-waiting "
                               f"{self.max_waiting}); retry later", "rate_limit_error",
                               code="rate_limit_exceeded")
        # a failed engine is not refused here: submitting raises its WorkerDiedError (a 500)
        return self.engine
