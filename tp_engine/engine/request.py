"""A request as its consumer sees it: the output so far, and the sink that wakes the consumer
(a plain queue for threads, an asyncio queue for coroutines). Owned by the stream-back thread,
which detokenizes and cuts stop strings here."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from tp_engine.engine.detokenizer import IncrementalDetokenizer
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: BaseException | None = None


class SyncSink:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Delta] = queue.SimpleQueue()

    def put(self, delta: Delta) -> None:
        self._queue.put(delta)

    def get(self) -> Delta:
        return self._queue.get()


class AsyncSink:
    """Deltas cross from the stream-back thread into the consumer's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()

    def put(self, delta: Delta) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
        except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
            pass

    async def get(self) -> Delta:
        return await self._queue.get()


class RequestState:
    def __init__(self, seq_id: int, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer, sink: SyncSink | AsyncSink):
        self.seq_id = seq_id
        self.params = params
        self.sink = sink
        self.output = RequestOutput(request_id, prompt, prompt_ids)
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._held = ""  # text that may be the start of a stop string
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self.output.finished

    def on_tokens(self, token_ids: list[int], finish_reason: str | None) -> bool:
        """Take new tokens; return True when a stop string ended the request here (the
        caller then aborts its sequence)."""
        with self._lock:
            if self.finished:
                return False
            self.output.token_ids.extend(token_ids)
            text = self._held + self._detok.add(token_ids)
            if finish_reason is not None:
                text += self._detok.flush()
            cut = self._find_stop(text)
            if cut is not None:
                text, finish_reason = text[:cut], "stop"
            elif finish_reason is None and self._hold:
                keep = len(text) - self._hold
                text, self._held = text[:max(0, keep)], text[max(0, keep):]
            else:
                self._held = ""
            self._emit(Delta(text, list(token_ids), finish_reason))
            return cut is not None

    def _find_stop(self, text: str) -> int | None:
        if not self.params.stop:
            return None
        # a stop string may straddle the text already sent and the new text
        window_start = max(0, len(self.output.text) - self._hold)
        window = self.output.text[window_start:] + text
        hits = [window.find(s) for s in self.params.stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return None
        return max(0, min(hits) - (len(self.output.text) - window_start))

    def finish(self, reason: str = "abort", error: BaseException | None = None) -> None:
        """End the request from outside the token stream (abort, failure, termination)."""
        with self._lock:
            if not self.finished:
                self._emit(Delta("", [], reason, error))

    def _emit(self, delta: Delta) -> None:
        self.output.text += delta.text
        if delta.finish_reason is not None:
            self.output.finish_reason = delta.finish_reason
        self.sink.put(delta)


class Registry:
    """The requests in flight, by sequence id. Shared by callers, the stream-back thread and
    terminate(), hence the lock."""

    def __init__(self) -> None:
        self._states: dict[int, RequestState] = {}
        self._lock = threading.Lock()

    def add(self, state: RequestState) -> None:
        with self._lock:
            self._states[state.seq_id] = state

    def get(self, seq_id: int) -> RequestState | None:
        with self._lock:
            return self._states.get(seq_id)

    def remove(self, seq_id: int) -> RequestState | None:
        with self._lock:
            return self._states.pop(seq_id, None)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            states, self._states = list(self._states.values()), {}
        for state in states:
            state.finish("abort", error)

    def __len__(self) -> int:
        return len(self._states)
