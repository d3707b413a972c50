"""The stream-back thread: turns each step's sampled tokens into text deltas and routes them to
their requests, so detokenization never delays the next step."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tp_engine.engine.request import Registry

log = logging.getLogger("tp_engine.stream_back")

# one step's news: (sequence id, new token ids, finish reason or None) for each sequence
StepOutputs = list[tuple[int, list[int], str | None]]


@dataclass
class Failure:
    """Fail every request in flight with this error."""
    error: BaseException


STOP = object()


class StreamBack:
    def __init__(self, registry: Registry, abort: Callable[[int], None]):
        self.registry = registry
        self.abort = abort
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="tp-engine-stream-back",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is STOP:
                return
            try:
                if isinstance(item, Failure):
                    self.registry.fail_all(item.error)
                else:
                    self._route(item)
            except Exception:  # a bad request must not take the others down with it
                log.exception("stream-back failed on an item")

    def _route(self, outputs: StepOutputs) -> None:
        for seq_id, token_ids, finish_reason in outputs:
            state = self.registry.get(seq_id)
            if state is None:
                continue  # aborted while its last tokens were on the way
            stopped = state.on_tokens(token_ids, finish_reason)
            if state.finished:
                self.registry.remove(seq_id)
            if stopped:
                self.abort(seq_id)

    def stop(self) -> None:
        self.queue.put(STOP)

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)
