"""The stream-back thread: turns each step's sampled tokens into text deltas and routes them to
their requests, so detokenization never delays the next step."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from tp_engine.engine.request import Registry

log = logging.getLogger("tp_engine.stream_back")


class SeqOutput(NamedTuple):
    """A step's news for one sequence."""
    seq_id: int
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None         # a wire.TokenLogprobs per token, when asked for
    prompt_logprobs: list | None = None  # the same for prompt tokens, as they are made


StepOutputs = list[SeqOutput]


@dataclass
class Failure:
    """Fail the requests of these sequences (None: every request in flight) with this
    error."""
    error: BaseException
    seq_ids: list[int] | None = None


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
                    self.registry.fail(item.error, item.seq_ids)
                else:
                    self._route(item)
            except Exception:  # a bad request must not take the others down with it
                log.exception("stream-back failed on an item")

    def _route(self, outputs: StepOutputs) -> None:
        for out in outputs:
            state = self.registry.get(out.seq_id)
            if state is None:
                continue  # aborted while its last tokens were on the way
            stopped = state.on_tokens(out.token_ids, out.finish_reason, out.logprobs,
                                      out.prompt_logprobs)
            if state.finished:
                self.registry.remove(out.seq_id)
            if stopped:
                self.abort(out.seq_id)

    def stop(self) -> None:
        self.queue.put(STOP)

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)
