"""The request-loop thread: admit, schedule, broadcast a step, collect rank 0's tokens, repeat.

It sleeps in a single poll on the control socket, a waker that callers ring, and the worker
processes' sentinels, so a new request starts at once, an idle engine burns no CPU, and a dead
worker is seen the moment it dies (engine/recovery decides what the death becomes). It alone
uses the control socket while it runs; its last act is to broadcast SHUTDOWN."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from tp_engine import wire
from tp_engine.engine.recovery import Recovery
from tp_engine.engine.scheduler import Scheduler, Sequence, sequence_setup
from tp_engine.engine.stream_back import SeqOutput, StepOutputs, StreamBack
from tp_engine.engine.waker import Waker
from tp_engine.engine.worker_group import WorkerGroup
from tp_engine.errors import EngineError, WorkerDiedError

log = logging.getLogger("tp_engine.request_loop")


class _Stopping(Exception):
    pass


@dataclass
class InFlight:
    """A step sent and not yet done."""
    step_id: int
    sampled: list[tuple[Sequence, int]]  # the sequences it samples, with their token counts
    seqs: list[Sequence]                 # all its sequences, in order
    decodes: bool                        # only decodes: its time sizes the runs
    reported: int = 0                    # steps of its run already streamed (StepTokens)


class RequestLoop:
    def __init__(self, group: WorkerGroup, scheduler: Scheduler, stream_back: StreamBack,
                 max_model_len: int, on_failure: Callable[[EngineError], None],
                 max_restarts: int = 0, step_timeout: float | None = None):
        self.group = group
        self.scheduler = scheduler
        self.stream_back = stream_back
        self.max_model_len = max_model_len
        self.on_failure = on_failure
        self.recovery = Recovery(group, max_restarts, step_timeout)  # what a failure becomes
        self.seqs: dict[int, Sequence] = {}
        self.steps = 0              # steps the workers ran (a run of decode steps counts each)
        self.released = 0           # the claims (Sequence.claim) of the sequences it finished
        self.model_seconds = 0.0    # and rank 0's time in the model for them
        self._inbox: deque = deque()
        self._releases: list[int] = []  # finished sequences whose rank-0 state can go
        self._stopping = False
        self._waker = Waker()
        self._step_ids = itertools.count()
        self._poller = zmq.Poller()
        self._poller.register(group.router, zmq.POLLIN)
        self._poller.register(self._waker.fileno(), zmq.POLLIN)
        for sentinel in group.sentinels:
            self._poller.register(sentinel, zmq.POLLIN)
        self.thread = threading.Thread(target=self._run, name="tp-engine-request-loop",
                                       daemon=True)

    # --- called from other threads ---------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def add(self, seqs: list[Sequence]) -> None:
        self._inbox.extend([("add", seq) for seq in seqs])  # at once: admitted together
        self._waker.wake()

    def abort(self, seq_id: int) -> None:
        self._inbox.append(("abort", seq_id))
        self._waker.wake()

    def stop(self) -> None:
        self._stopping = True
        self._waker.wake()

    def seq_ids(self) -> list[int]:
        """The sequences it holds, those still in its inbox included: once its thread has
        ended and nothing more is added, those whose requests its failure fails."""
        return [*self.seqs, *(item.seq_id for kind, item in list(self._inbox) if kind == "add")]

    def join(self, timeout: float) -> bool:
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        self._waker.close()  # only now: a closed descriptor's number can be reused
        return True

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._step_loop()
        except _Stopping:
            pass
        except EngineError as e:  # the engine fails this loop's requests (on_failure)
            self.on_failure(e)
        except Exception as e:  # a bug here must still fail requests, not strand them
            log.exception("request loop crashed")
            self.on_failure(EngineError(f"request loop crashed: {type(e).__name__}: {e}"))
        finally:
            self.group.send_shutdown()

    def _step_loop(self) -> None:
        """Serve; when a worker dies, restart the group and serve on (see _restart)."""
        while True:
            try:
                return self._serve()
            except WorkerDiedError as error:
                self._restart(error)

    @property
    def restarts(self) -> int:
        return self.recovery.restarts

    @property
    def restarting(self) -> bool:
        return self.recovery.restarting

    def _restart(self, error: WorkerDiedError) -> None:
        """A fresh worker group, and every sequence recomputed from its tokens as after a
        preemption: the steps in flight are dropped (their tokens were never applied, and are
        drawn again, the same for greedy and seeded sampling), rank 0 rebuilds each state
        from the tokens."""
        if not self.recovery.can_restart:
            raise error
        began = time.perf_counter()
        for sentinel in self.group.sentinels:  # closed with their processes
            self._poller.unregister(sentinel)
        for seq in self.seqs.values():
            seq.pending = 0
        self.scheduler.requeue_all()
        self._releases.clear()  # the new group has no states to drop
        self.recovery.restart(error, lambda: self._stopping)
        for sentinel in self.group.sentinels:
            self._poller.register(sentinel, zmq.POLLIN)
        log.warning("worker group restarted in %.2f s; %d requests recomputed",
                    time.perf_counter() - began, len(self.seqs))

    def _serve(self) -> None:
        """Keep two steps in flight: while the workers compute one, the next is scheduled,
        built and already queued in their sockets, so the workers never wait for this thread
        (its scheduling, the messages, the stream-back handoff all overlap the forward). The
        next step's tokens that the running step samples travel as placeholders the workers
        fill in. The price: a sequence that stops (EOS, stop token) computes the tokens of the
        step (or run of decode steps) already queued behind, which are dropped."""
        in_flight: deque[InFlight] = deque()
        while True:
            self._take_inbox()
            while len(in_flight) < 2:
                batch, decode_steps, too_long = self.scheduler.schedule()
                if too_long:
                    for seq in too_long:
                        self._forget(seq)
                    self.stream_back.queue.put([SeqOutput(s.seq_id, [], "length")
                                                for s in too_long])
                if not batch:
                    break
                step, sampled = self._build_step(batch, decode_steps)
                self.group.broadcast(step)
                in_flight.append(InFlight(step.step_id, sampled, [seq for seq, _ in batch],
                                          all(n == 1 for _, n in batch)))
            if not in_flight:
                self._await(None)  # idle: sleep until a request, an abort or a death
                continue
            step = in_flight.popleft()
            done = self._await(step)
            self.steps += done.steps
            self.model_seconds += done.model_seconds
            if step.decodes:  # what sizes the runs of decode steps
                self.scheduler.observe_decode(done.model_seconds / done.steps)
            outputs = self._prompt_logprobs(step.seqs, done.prompt_logprobs)
            outputs += self._apply(step.sampled, done.token_ids, done.logprobs, step.reported)
            if outputs:
                self.stream_back.queue.put(outputs)

    def _take_inbox(self) -> None:
        if self._stopping:
            raise _Stopping
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self.seqs[item.seq_id] = item
                self.scheduler.add(item)
            elif item in self.seqs:
                self._forget(self.seqs[item])

    def _forget(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.seqs.pop(seq.seq_id, None) is not None:
            self.released += seq.claim
        if seq.rank0_state:
            self._releases.append(seq.seq_id)

    def _build_step(self, batch: list[tuple[Sequence, int]], decode_steps: list[int],
                    ) -> tuple[wire.Step, list[tuple[Sequence, int]]]:
        """The Step for `batch`, advancing each sequence as if the step had run; and the
        sequences it samples, in sample order, each with the number of tokens it samples (its
        decode steps). A token still being sampled by the step in flight goes as the
        placeholder -1 - i: "the last token of sample i of the previous step"."""
        starts, lens, tables, samples, sampled = [], [], [], [], []
        setups, logit_rows = [], []
        tokens = array("i")
        steps = decode_steps or itertools.repeat(1)
        for index, ((seq, n), k) in enumerate(zip(batch, steps)):
            start = seq.num_computed
            starts.append(start)
            lens.append(n)
            tables.append(seq.block_table)
            tokens.extend(seq.token_ids[start:start + n])
            known = len(seq.token_ids)
            if start + n > known:  # the pending token (at most one) ends this chunk
                tokens.append(-1 - seq.pending_index)
            seq.num_computed = start + n + k - 1
            if seq.rank0_state:
                if seq.needs_setup:  # (re)started: rank 0 builds its state from its output
                    setups.append(sequence_setup(seq))
                    seq.needs_setup = False
                if (seq.params.prompt_logprobs is not None  # and not made yet
                        and seq.prompt_logprobs_to <= start < seq.prompt_len - 1):
                    logit_rows.append([index, seq.seq_id])
                    seq.prompt_logprobs_to = start + n
            if start + n == known + seq.pending:  # all computed: sample the next token(s)
                p = seq.params
                seq.pending_index = len(samples)
                samples.append(wire.Sample(index, float(p.temperature), float(p.top_p),
                                           p.top_k, -1 if p.seed is None else p.seed,
                                           known + seq.pending - seq.prompt_len,
                                           float(p.min_p),
                                           seq.seq_id if seq.rank0_state else -1))
                seq.pending += k
                sampled.append((seq, k))
        releases, self._releases = self._releases, []
        report = bool(decode_steps) and any(seq.streaming for seq, _ in batch)
        step = wire.Step(next(self._step_ids), starts, lens, tokens.tobytes(), tables, samples,
                         decode_steps, setups, releases, logit_rows, report)
        return step, sampled

    def _await(self, step: InFlight | None) -> wire.StepDone | None:
        """Sleep until `step` is done (or, with None, until anything happens); hand on the
        tokens of its steps that come while it runs."""
        step_id = step.step_id if step is not None else None
        # the step is the oldest in flight from here: its time is its own
        timeout = self.recovery.step_timeout
        hung_at = None if step is None or timeout is None else time.monotonic() + timeout
        while True:
            wait = None if hung_at is None else max(0, int((hung_at - time.monotonic()) * 1000))
            events = dict(self._poller.poll(wait))
            if not events and hung_at is not None and time.monotonic() >= hung_at:
                raise self.recovery.hung(step_id)
            fired = [s for s in self.group.sentinels if s in events]
            if fired:
                raise self.group.died(fired[0])
            if self._waker.fileno() in events:
                self._waker.drain()
                if self._stopping:
                    raise _Stopping
            while self.group.router.poll(0):
                msg = self.group.recv()
                if isinstance(msg, wire.StepDone) and msg.step_id == step_id:
                    return msg
                if isinstance(msg, wire.StepTokens) and msg.step_id == step_id:
                    self._step_tokens(step, msg)
                if isinstance(msg, wire.StepFailed):
                    raise self.recovery.step_failure(msg)
            if step_id is None:
                return None

    def _step_tokens(self, step: InFlight, msg: wire.StepTokens) -> None:
        """One step of a run, streamed as it is made: sequence i's token is the i-th."""
        if msg.index != step.reported or len(msg.token_ids) > len(step.sampled):
            log.warning("dropped a StepTokens out of order (step %d, %d)", msg.step_id,
                        msg.index)
            return
        step.reported += 1
        outputs: StepOutputs = []
        for i, token in enumerate(msg.token_ids):
            seq = step.sampled[i][0]
            seq.pending -= 1
            out = self._take(seq, [token], msg.logprobs[i:i + 1] if msg.logprobs else None)
            if out is not None:
                outputs.append(out)
        if outputs:
            self.stream_back.queue.put(outputs)

    def _apply(self, sampled: list[tuple[Sequence, int]], tokens: list[int],
               logprobs: list, reported: int = 0) -> StepOutputs:
        """A step's tokens; in a run, each sequence's first `reported` were taken already
        (StepTokens)."""
        outputs: StepOutputs = []
        offset = 0
        for seq, k in sampled:
            skip = min(reported, k)
            new = tokens[offset + skip:offset + k]
            lps = logprobs[offset + skip:offset + k] if logprobs else None
            offset += k
            seq.pending -= k - skip
            out = self._take(seq, new, lps)
            if out is not None:
                outputs.append(out)
        return outputs

    def _take(self, seq: Sequence, new: list[int], lps: list | None) -> SeqOutput | None:
        """A sequence's new tokens: ended by a stop token or its length (and forgotten),
        or None when it finished or was aborted while they were made (they are dropped)."""
        if self.seqs.get(seq.seq_id) is not seq:
            return None
        reason = None
        if not seq.stops.isdisjoint(new):  # the tokens after a stop token are dropped
            new = new[:next(i for i, t in enumerate(new, 1) if t in seq.stops)]
            reason = "stop"
        seq.token_ids.extend(new)
        # a run never goes past max_tokens or max_model_len: only its last token can end it
        if reason is None and (seq.num_output >= seq.max_tokens
                               or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._forget(seq)
        return SeqOutput(seq.seq_id, new, reason, lps[:len(new)] if lps else None)

    def _prompt_logprobs(self, seqs: list[Sequence], made: list) -> StepOutputs:
        """The prompt logprobs a step made, for the sequences still there."""
        return [SeqOutput(seqs[index].seq_id, [], None, prompt_logprobs=entries)
                for index, entries in made if self.seqs.get(seqs[index].seq_id)]

