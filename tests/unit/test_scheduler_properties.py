"""Property tests of the scheduler, driven the way the request loop drives it.

The driver is the request loop's own `RequestLoop._step_loop` (two steps in flight; it and
`_build_step`, `_apply`, `_take_inbox`, `_forget` are the real methods) on a RequestLoop made
without its __init__, so without sockets, threads or waker (`Sim`; if the loop's attributes
change, `Sim.__init__` is where to follow). What it talks to is faked:

- the workers (`FakeWorkers`) run each step the moment it is broadcast: the real ones run the
  steps in the order sent, so nothing scheduled later can touch the cache before it. They
  refuse what the real workers refuse (`ModelRunner.check`), fill in placeholders as they do
  (`ModelRunner._token_ids`), and keep a KV cache that records, in each block slot, the
  position and the whole context up to it (what its keys and values depend on), so a block
  shared through the prefix cache is checked to hold exactly what its reader's would;
- a request's sampled tokens are fixed in advance by its "seed" (`Request.draws`), so a
  recomputed sequence draws the same ones again, as a seeded sampler does;
- the clock is the number of steps done (a tick). Requests arrive, and are aborted, at given
  ticks: put in the loop's inbox as `RequestLoop.add` and `abort` do, while a step runs; when
  the loop idles, the clock jumps to the next arrival, and with none left it is stopped;
- stream-back is a list.

The scheduler is the real one, subclassed only to check each decision as it is made
(`CheckedScheduler`)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, deque
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from tp_engine import wire
from tp_engine.engine.block_manager import BlockManager
from tp_engine.engine.request_loop import InFlight, RequestLoop, _Stopping
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.scheduler import Scheduler, Sequence
from tp_engine.worker.model_runner import ModelRunner

VOCAB = 32
MAX_TICKS = 5_000  # steps before a workload counts as stuck


def checked(max_examples: int):
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- the workload ----------------------------------------------------------------------------

@dataclass
class Request:
    seq_id: int
    prompt: list[int]
    draws: list[int]  # the tokens its seeded sampling draws, in order: outputs 0, 1, ...
    max_tokens: int
    stops: frozenset[int] = frozenset()
    arrival: int = 0          # the tick it is submitted at
    abort: int | None = None  # the tick it is aborted at

    def token(self, position: int) -> int:
        """Its token at `position`, prompt then outputs."""
        n = len(self.prompt)
        return self.prompt[position] if position < n else self.draws[position - n]

    def context(self, position: int) -> tuple[int, ...]:
        """Its tokens up to and with `position`: what the KV at that position depends on."""
        return tuple(self.prompt + self.draws)[:position + 1]

    def limit(self, max_model_len: int) -> int:
        """The outputs it may have."""
        return min(self.max_tokens, max_model_len - len(self.prompt))

    def expected(self, max_model_len: int) -> tuple[list[int], str]:
        """Its whole output and finish reason: up to its first stop token, or to the limit."""
        out = self.draws[:self.limit(max_model_len)]
        for i, token in enumerate(out):
            if token in self.stops:
                return out[:i + 1], "stop"
        return out, "length"


@dataclass
class Workload:
    requests: list[Request]
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    decode_steps: int = 1
    run_seconds: float | None = None
    step_times: tuple[float, ...] = (0.001,)  # a decode step's model time, step after step
    prefix_caching: bool = False


def request(seq_id: int, prompt_len: int, max_tokens: int, seed: int = 0, **kw) -> Request:
    rng = random.Random(seed * 7919 + seq_id)
    return Request(seq_id, [rng.randrange(VOCAB) for _ in range(prompt_len)],
                   [rng.randrange(VOCAB) for _ in range(max_tokens)], max_tokens, **kw)


def blocks_needed(req: Request, block_size: int, max_model_len: int) -> int:
    """The most blocks it can ever hold: its tokens at its longest (the last is never
    computed, but a run may reserve for it)."""
    return -(-(len(req.prompt) + req.limit(max_model_len)) // block_size)


@st.composite
def workloads(draw, aborts: bool = True, arrivals: bool = True, fits: bool = True,
              max_requests: int = 8, prefix_caching: bool = False) -> Workload:
    """Random requests over time, aborts among them, and an engine whose cache is barely big
    enough for the longest request (`fits`) or, without `fits`, only for each prompt (as the
    engine requires), so that the cache, not the batch size, bounds what runs. With
    `prefix_caching`, prompts start with one of two shared prefixes, and some are the same
    prompt again (the samples of one request)."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_model_len = draw(st.integers(4, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(max_model_len)] for _ in range(2)]
    requests = []
    for seq_id in range(draw(st.integers(1, max_requests))):
        arrival = draw(st.integers(0, 12)) if arrivals else 0
        abort = None
        if aborts and draw(st.integers(0, 3)) == 0:
            abort = arrival + draw(st.integers(0, 12))
        req = request(
            seq_id, draw(st.integers(1, max_model_len - 1)), draw(st.integers(1, 20)), seed,
            stops=draw(st.frozensets(st.integers(0, VOCAB - 1), max_size=2)),
            arrival=arrival, abort=abort)
        if prefix_caching:
            if requests and draw(st.booleans()):  # another sample of an earlier prompt
                req.prompt = list(requests[draw(st.integers(0, len(requests) - 1))].prompt)
            else:
                shared = draw(st.integers(0, len(req.prompt)))
                req.prompt[:shared] = prefixes[draw(st.integers(0, 1))][:shared]
        requests.append(req)
    if fits:
        least = max(blocks_needed(r, block_size, max_model_len) for r in requests)
    else:
        least = max(-(-(len(r.prompt) + 1) // block_size) for r in requests)
    return Workload(
        requests, num_blocks=least + draw(st.integers(0, least)), block_size=block_size,
        max_num_seqs=draw(st.integers(1, 8)), max_num_batched_tokens=draw(st.integers(1, 64)),
        max_model_len=max_model_len, decode_steps=draw(st.sampled_from([1, 2, 4, 8, 16, 64])),
        prefix_caching=prefix_caching,
        run_seconds=draw(st.sampled_from([None, 0.01, 0.05, 0.1])),
        step_times=tuple(draw(st.lists(st.sampled_from([0.0005, 0.004, 0.02, 0.06]),
                                       min_size=1, max_size=3))))


# --- the checked scheduler -------------------------------------------------------------------

class CheckedScheduler(Scheduler):
    """The real scheduler; every schedule, preemption and finish is checked as it happens."""

    def __init__(self, *args, on_preempt, **kw):
        super().__init__(*args, **kw)
        self.on_preempt = on_preempt
        self.admitted: dict[Sequence, int] = {}  # a running sequence: when it was admitted
        self._stamps = itertools.count()
        self.run = 1     # the run length the docstring promises (the scheduler's _run)
        self.log = []    # per schedule(): whether some waited, those admitted, the decode steps
        self.runs = []   # each run of decode steps formed: its length
        self.preempted = []
        self.too_long = []
        self.skipped = 0  # running sequences passed over: their last tokens in flight
        self.last_batch: list[tuple[Sequence, int]] = []

    def schedule(self):
        waited, preemptions = bool(self.waiting), self.num_preemptions
        self.skipped += sum(seq.exhausted(self.max_model_len) for seq in self.running)
        before = set(self.running)
        batch, steps, too_long = super().schedule()
        self.last_batch = batch
        self.too_long += too_long
        admitted = [seq for seq in self.running if seq not in self.admitted]
        for seq in admitted:
            self.admitted[seq] = next(self._stamps)
        self.log.append((waited, admitted, steps))
        self._check_cache()
        self._check_admission(batch, before, preemptions)
        self._check_batch(batch)
        for seq in too_long:
            # alone with the whole cache, and its tokens are more than it holds
            assert seq not in self.running and seq not in self.waiting and not seq.block_table
            assert self.blocks.num_free == self.blocks.num_blocks
            assert (self.blocks.blocks_for(len(seq.token_ids) + seq.pending)
                    > self.blocks.num_blocks)
        self._check_run(batch, steps, waited)
        return batch, steps, too_long

    def _check_cache(self):
        """Every block is free or held by as many running sequences as its reference count
        says (one at most without prefix caching), a sequence holds its computed tokens; a
        waiting sequence holds none."""
        self.blocks.check()
        held = Counter(b for seq in self.running for b in seq.block_table)
        assert all(len(set(seq.block_table)) == len(seq.block_table) for seq in self.running)
        assert held == Counter({b: r for b, r in enumerate(self.blocks._refs) if r})
        if not self.blocks.caching:
            assert set(held.values()) <= {1}
        assert all(not seq.block_table for seq in self.waiting)
        for seq in self.running:
            assert len(seq.block_table) >= self.blocks.blocks_for(seq.num_computed)

    def _check_admission(self, batch, before, preemptions):
        assert len(self.running) <= self.max_num_seqs
        assert len(set(self.running) | set(self.waiting)) == len(self.running) + len(self.waiting)
        stamps = [self.admitted[seq] for seq in self.running]
        assert stamps == sorted(stamps)  # in order of admission: the newest last
        if self.num_preemptions > preemptions:  # no admissions in a step that had to preempt
            assert set(self.running) <= before

    def _check_batch(self, batch):
        """The token budget; each chunk within what is left of its sequence, and cut short only
        by the budget; never a sequence whose last tokens are in flight."""
        seqs = [seq for seq, _ in batch]
        assert len(set(seqs)) == len(seqs) and set(seqs) <= set(self.running)
        total = sum(n for _, n in batch)
        assert total <= self.token_budget
        for i, (seq, n) in enumerate(batch):
            assert 1 <= n <= seq.uncomputed
            assert not seq.exhausted(self.max_model_len)
            if n < seq.uncomputed:  # cut: the budget is spent, nothing comes after it
                assert i == len(batch) - 1 and total == self.token_budget

    def _check_run(self, batch, steps, waited):
        """A run only when every sequence decodes and none waits; 2 steps after an admission,
        doubling up to decode_steps and to run_seconds of the measured steps; each sequence
        runs that long or to its end, longest first, its blocks reserved for all of it."""
        if waited:
            self.run = 1
        decodes = all(n == 1 and seq.uncomputed == 1 for seq, n in batch)
        if not (self.decode_steps > 1 and batch and decodes and not self.waiting):
            assert steps == []
            return
        longest = self.decode_steps
        if self.run_seconds is not None and self.step_seconds > 0:
            longest = max(1, min(longest, int(self.run_seconds / self.step_seconds)))
        self.run = min(2 * self.run, longest)
        assert self._run == self.run
        want = [min(self.run, seq.room(self.max_model_len)) for seq, _ in batch]
        if not steps:  # every one ends in a step, or the cache is short
            assert max(want) == 1 or any(
                self.blocks.extra_blocks(seq.block_table, seq.num_computed + k)
                > self.blocks.num_free for (seq, _), k in zip(batch, want))
            return
        assert steps == want and steps == sorted(steps, reverse=True) and max(steps) > 1
        assert max(steps) <= self.decode_steps
        if self.run_seconds is not None and self.step_seconds > 0:
            assert max(steps) <= max(1.0, self.run_seconds / self.step_seconds)
        for (seq, _), k in zip(batch, steps):
            assert len(seq.block_table) * self.blocks.block_size >= seq.num_computed + k
        self.runs.append(max(steps))

    def _preempt(self, seq):
        # the newest running sequence: admitted after every one still running
        assert seq not in self.running
        assert all(self.admitted[s] < self.admitted[seq] for s in self.running)
        super()._preempt(seq)
        assert not seq.block_table and seq.num_computed == 0 and self.waiting[0] is seq
        del self.admitted[seq]
        self.preempted.append(seq.seq_id)
        self.on_preempt(seq)

    def finish(self, seq):
        super().finish(seq)
        assert seq not in self.running and seq not in self.waiting and not seq.block_table
        self.admitted.pop(seq, None)


# --- the workers -----------------------------------------------------------------------------

class FakeWorkers:
    """Rank 0's side of each step, as the request loop sees it; see the module docstring."""

    check = ModelRunner.check
    _check_run = ModelRunner._check_run
    _check_states = ModelRunner._check_states
    _token_ids = ModelRunner._token_ids
    sampling = None  # no rank-0 states: the workloads sample plainly

    def __init__(self, w: Workload, requests: dict[int, Request]):
        self.config = SimpleNamespace(max_model_len=w.max_model_len, block_size=w.block_size)
        self.num_blocks, self.vocab_size = w.num_blocks, VOCAB
        self.max_model_len = w.max_model_len
        self.requests = requests
        self.last_sampled: list[int] = []
        self.state_ids: set[int] = set()
        self.cache: dict[tuple[int, int], tuple[int, tuple]] = {}  # (block, slot) -> what
        self.caching = w.prefix_caching
        self.hits: dict[int, list[int]] = {}  # a sequence's cached tokens, at each admission
        self.computed: dict[int, int] = {}  # a sequence's positions computed since admitted
        self.chunks: dict[int, list[tuple[int, int]]] = {}  # its (start, tokens), step by step
        self.step_times = itertools.cycle(w.step_times)

    def run(self, step: wire.Step, batch: list[tuple[Sequence, int]],
            ) -> tuple[list[tuple[Sequence, int]], wire.StepDone]:
        """Compute `step` (built from `batch`): the sequences it samples with their token
        counts, and its StepDone."""
        samples = self.check(step)
        ids = self._token_ids(step)
        bs = self.config.block_size
        runs = step.decode_steps or [1] * len(batch)
        assert step.query_lens == [n for _, n in batch]
        reach = []
        for (seq, n), start, table, end, k in zip(batch, step.starts, step.block_tables,
                                                  self._ends, runs):
            req = self.requests[seq.seq_id]
            # the right tokens, placeholders filled in; each position computed once
            assert list(ids[end - n:end]) == [req.token(p) for p in range(start, start + n)]
            if self.caching and self.computed.get(seq.seq_id, 0) == 0:  # just admitted
                # from a cached prefix of whole blocks, leaving the last token at least
                assert start % bs == 0 and start < len(seq.token_ids)
                self.hits.setdefault(seq.seq_id, []).append(start)
                self.computed[seq.seq_id] = start
            assert start == self.computed.get(seq.seq_id, 0), "a position skipped or redone"
            last = start + n + k - 1
            for p in range(start, last):
                self.cache[table[p // bs], p % bs] = (p, req.context(p))
            self.computed[seq.seq_id] = last
            self.chunks.setdefault(seq.seq_id, []).append((start, n))
            reach.append(last)
        for (seq, _), table, last in zip(batch, step.block_tables, reach):
            # attention reads all it computed, through its table: nobody wrote over it
            req = self.requests[seq.seq_id]
            for p in range(last):
                assert self.cache.get((table[p // bs], p % bs)) == (p, req.context(p))
        tokens, last_tokens, sampled, per_seq = [], [], [], []
        for sample in samples:
            i, out = sample.index, sample.output_index
            seq, k = batch[i][0], runs[i]
            req = self.requests[seq.seq_id]
            # it samples the token after its chunk, never past its limits
            assert out == step.starts[i] + step.query_lens[i] - len(req.prompt)
            assert out + k <= req.limit(self.max_model_len), "sampled past its end"
            drawn = req.draws[out:out + k]
            per_seq.append(drawn)
            tokens += drawn
            last_tokens.append(drawn[-1])
            sampled.append((seq, k))
        self.last_sampled = last_tokens
        steps = max(step.decode_steps, default=1)
        done = wire.StepDone(step.step_id, tokens, steps, steps * next(self.step_times))
        # with report_steps, each step of a run but the last also comes on its own, first
        done.reports = [wire.StepTokens(step.step_id, j, [d[j] for d in per_seq if len(d) > j])
                        for j in range(steps - 1)] if step.report_steps else []
        return sampled, done


# --- the loop --------------------------------------------------------------------------------

class Sim:
    """`RequestLoop._step_loop` over `w`, checked as it goes; `run()` returns when all is done."""

    def __init__(self, w: Workload):
        self.w = w
        self.requests = {r.seq_id: r for r in w.requests}
        # every other sequence streams: its runs report each step (StepTokens)
        self.seqs = {r.seq_id: Sequence(r.seq_id, list(r.prompt), len(r.prompt),
                                        SamplingParams(max_tokens=r.max_tokens, seed=r.seq_id),
                                        r.max_tokens, r.stops, streaming=r.seq_id % 2 == 0)
                     for r in w.requests}
        self.workers = FakeWorkers(w, self.requests)
        self.scheduler = CheckedScheduler(
            BlockManager(w.num_blocks, w.block_size, w.prefix_caching), w.max_num_seqs,
            w.max_num_batched_tokens, w.max_model_len, w.decode_steps, w.run_seconds,
            on_preempt=lambda seq: self.workers.computed.__setitem__(seq.seq_id, 0))
        self.events = deque(sorted(
            [(r.arrival, 0, r.seq_id) for r in w.requests]
            + [(r.abort, 1, r.seq_id) for r in w.requests if r.abort is not None]))
        self.tick = 0
        self.in_flight: deque = deque()  # (step id, [(sequence, tokens sampled)], StepDone)
        self.tokens = {r.seq_id: [] for r in w.requests}
        self.reasons = {r.seq_id: [] for r in w.requests}

        loop = RequestLoop.__new__(RequestLoop)  # no sockets, thread or waker
        loop.group = SimpleNamespace(broadcast=self._broadcast)
        loop.scheduler = self.scheduler
        loop.stream_back = SimpleNamespace(queue=SimpleNamespace(put=self._stream))
        loop.max_model_len = w.max_model_len
        loop.seqs, loop._releases = {}, []
        loop.steps, loop.model_seconds, loop.released = 0, 0.0, 0
        loop._inbox, loop._stopping, loop._step_ids = deque(), False, itertools.count()
        loop._await = self._await
        self.loop = loop

    def run(self) -> Sim:
        try:
            self.loop._step_loop()
        except _Stopping:
            pass
        return self

    def _deliver(self) -> None:
        """The requests submitted and aborted by now, as RequestLoop.add and abort queue them."""
        while self.events and self.events[0][0] <= self.tick:
            _, abort, seq_id = self.events.popleft()
            self.loop._inbox.append(("abort", seq_id) if abort else ("add", self.seqs[seq_id]))

    def _broadcast(self, step: wire.Step) -> None:
        batch = self.scheduler.last_batch  # what this step was built from
        sampled, done = self.workers.run(step, batch)
        for seq, _ in batch:
            assert seq.num_computed == self.workers.computed[seq.seq_id]
        self.in_flight.append((step.step_id, sampled, done))
        assert len(self.in_flight) <= 2
        self._check_pending()

    def _await(self, step: InFlight | None) -> wire.StepDone | None:
        self._check_pending()
        if step is None:  # idle: nothing in flight, nothing to schedule
            assert not (self.in_flight or self.scheduler.waiting or self.scheduler.running), "stuck"
            if not self.events:
                self.loop._stopping = True  # RequestLoop.stop(): the test is over
                return None
            self.tick = max(self.tick, self.events[0][0])
            self._deliver()
            return None
        expected, _, done = self.in_flight.popleft()
        assert expected == step.step_id  # steps complete in the order sent
        for report in done.reports:  # as RequestLoop._await hands them on
            self.loop._step_tokens(step, report)
        self.tick += 1
        assert self.tick < MAX_TICKS, "no progress"
        self._deliver()  # what came while it ran
        return done

    def _check_pending(self) -> None:
        """A sequence's pending tokens are exactly those the steps in flight sample for it."""
        for seq in self.seqs.values():
            assert seq.pending == sum(k for _, sampled, _ in self.in_flight
                                      for s, k in sampled if s is seq)

    def _stream(self, outputs) -> None:
        for seq_id, new, reason, *_ in outputs:
            assert not self.reasons[seq_id], "output after the end"
            self.tokens[seq_id] += new
            if reason is not None:
                self.reasons[seq_id].append(reason)

    def report(self) -> None:
        """What the example exercised (pytest --hypothesis-show-statistics)."""
        s = self.scheduler
        event("preempted" if s.num_preemptions else "no preemption")
        event("runs of decode steps" if s.runs else "no run")
        event("cut short" if s.too_long else "none cut short")
        event("stopped" if any(r == ["stop"] for r in self.reasons.values()) else "none stopped")
        event("aborted" if any(r.abort is not None and not self.reasons[i]
                               for i, r in self.requests.items()) else "none aborted")

    def check_end(self) -> None:
        """Everything done and given back; every request's output exactly what it draws."""
        s = self.scheduler
        too_long = {seq.seq_id for seq in s.too_long}
        s.blocks.check()
        assert s.blocks.num_free == s.blocks.num_blocks and not any(s.blocks._refs)
        for seq_id, req in self.requests.items():
            seq = self.seqs[seq_id]
            assert seq.pending == 0 and not seq.block_table
            tokens, reason = req.expected(self.w.max_model_len)
            got = self.tokens[seq_id]
            assert seq.token_ids == req.prompt + got  # nothing lost, nothing twice
            if seq_id in too_long:  # cut short: the cache cannot hold it
                assert self.reasons[seq_id] == ["length"] and got == tokens[:len(got)]
            elif req.abort is not None and not self.reasons[seq_id]:  # aborted first
                assert got == tokens[:len(got)]
            else:
                assert (got, self.reasons[seq_id]) == (tokens, [reason])


# --- the properties --------------------------------------------------------------------------

@checked(200)
@given(workloads())
def test_random_workloads_all_complete_and_give_every_block_back(w):
    """Arrivals over time, aborts, stop tokens, a tight cache: every decision checked as made
    (CheckedScheduler, FakeWorkers, Sim), and at the end every request has exactly what it
    draws, every block is free, nothing runs or waits."""
    sim = Sim(w).run()
    sim.check_end()
    sim.report()
    assert not sim.scheduler.too_long  # each fits alone: none is ever cut short
    target(float(sim.scheduler.num_preemptions), label="preemptions")


@checked(100)
@given(workloads(fits=False))
def test_a_sequence_the_cache_cannot_hold_ends_with_length(w):
    """With a cache that holds each prompt but not every whole request, a sequence is cut
    short ("length") only when alone with the whole cache it still does not fit."""
    sim = Sim(w).run()
    sim.check_end()
    sim.report()


@checked(60)
@given(n=st.integers(2, 6), prompt_len=st.integers(1, 8), max_tokens=st.integers(8, 20),
       block_size=st.sampled_from([1, 2, 4]), decode_steps=st.sampled_from([1, 4, 16]),
       seed=st.integers(0, 1000))
def test_the_newest_is_preempted_and_recomputed_to_the_same_output(
        n, prompt_len, max_tokens, block_size, decode_steps, seed):
    """A cache that holds just one whole request, all arriving at once: the newest running
    sequences are preempted (checked at each preemption), re-admitted later, and still produce
    exactly their max_tokens outputs; no stop tokens, so none ends early."""
    reqs = [request(i, prompt_len, max_tokens, seed) for i in range(n)]
    least = blocks_needed(reqs[0], block_size, 64)
    w = Workload(reqs, num_blocks=least, block_size=block_size, max_num_seqs=n,
                 max_num_batched_tokens=64, max_model_len=64, decode_steps=decode_steps)
    sim = Sim(w).run()
    sim.check_end()
    sim.report()
    assert all(len(sim.tokens[i]) == max_tokens for i in range(n))
    assert 0 not in sim.scheduler.preempted  # the oldest is never the newest
    def blocks(tokens):
        return -(-tokens // block_size)
    if (n * blocks(prompt_len) <= least  # all admitted at once; and the first cannot finish
            and blocks(prompt_len + max_tokens - 1) + (n - 1) * blocks(prompt_len) > least):
        assert sim.scheduler.num_preemptions > 0


def test_preemption_example():
    """Two requests of 6 + 8 tokens in a cache of 7 blocks of 2: both start, the cache runs
    out, the second is preempted, and it is recomputed after the first ends."""
    reqs = [request(i, 6, 8) for i in range(2)]
    w = Workload(reqs, num_blocks=7, block_size=2, max_num_seqs=4, max_num_batched_tokens=64,
                 max_model_len=64)
    sim = Sim(w).run()
    sim.check_end()
    assert set(sim.scheduler.preempted) == {1}
    assert sim.workers.chunks[1][0] == (0, 6) and (0, 6) not in sim.workers.chunks[1][1:]
    assert any(start == 0 and n > 6 for start, n in sim.workers.chunks[1])  # recomputed
    assert [len(sim.tokens[i]) for i in range(2)] == [8, 8]


@checked(60)
@given(prompt_len=st.integers(2, 60), budget=st.integers(1, 16), block_size=st.integers(1, 8))
def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget(prompt_len, budget, block_size):
    """Alone, a prompt longer than the token budget is cut to it: full chunks, then the rest,
    each position computed once (FakeWorkers), then it decodes."""
    req = request(0, prompt_len, 3)
    w = Workload([req], num_blocks=-(-(prompt_len + 3) // block_size), block_size=block_size,
                 max_num_seqs=1, max_num_batched_tokens=budget, max_model_len=64)
    sim = Sim(w).run()
    sim.check_end()
    chunks = sim.workers.chunks[0]
    full, rest = divmod(prompt_len, budget)
    prefill = [budget] * full + ([rest] if rest else [])
    assert [n for _, n in chunks] == prefill + [1, 1]  # then outputs 0 and 1 fed back
    assert [start for start, _ in chunks] == [sum(prefill[:i]) for i in range(len(prefill))] \
        + [prompt_len, prompt_len + 1]


def doubling(max_tokens: int, decode_steps: int) -> list[int]:
    """The runs a settled batch makes, admitted together with their first output sampled:
    2, 4, 8... up to decode_steps, each cut to the outputs left (a run of 1 is a plain step)."""
    runs, run, sampled = [], 1, 1
    while sampled < max_tokens:
        run = min(2 * run, decode_steps)
        k = min(run, max_tokens - sampled)
        if k > 1:
            runs.append(k)
        sampled += k
    return runs


@checked(60)
@given(n=st.integers(1, 6), decode_steps=st.sampled_from([2, 4, 8, 16, 64]),
       max_tokens=st.integers(2, 120), late=st.none() | st.integers(1, 8))
def test_runs_start_at_2_after_an_admission_and_double_up_to_decode_steps(
        n, decode_steps, max_tokens, late):
    """A settled batch makes runs of 2, 4, 8... steps up to decode_steps, until a request
    arrives (`late`): the first run after its admission is 2 steps again."""
    reqs = [request(i, 3, max_tokens) for i in range(n)]
    if late is not None:
        reqs.append(request(n, 3, 120, arrival=late))
    w = Workload(reqs, num_blocks=len(reqs) * 123, block_size=1, max_num_seqs=len(reqs),
                 max_num_batched_tokens=256, max_model_len=256, decode_steps=decode_steps)
    sim = Sim(w).run()
    sim.check_end()
    if late is None:
        assert sim.scheduler.runs == doubling(max_tokens, decode_steps)
    else:
        log = sim.scheduler.log
        admitted = next(i for i, (_, seqs, _) in enumerate(log) if sim.seqs[n] in seqs)
        assert max(next(steps for _, _, steps in log[admitted:] if steps)) == 2


@checked(40)
@given(step_seconds=st.sampled_from([0.004, 0.011, 0.02, 0.03, 0.2]),
       run_seconds=st.sampled_from([0.01, 0.05, 0.1]))
def test_runs_are_kept_to_run_seconds_of_the_measured_steps(step_seconds, run_seconds):
    """With observe_decode fed each decode step's time, a run never exceeds
    max(1, run_seconds / step_seconds) (checked at every schedule), and a settled batch
    reaches that length; the first two runs come before any decode step is timed."""
    reqs = [request(i, 2, 200) for i in range(3)]
    w = Workload(reqs, num_blocks=64, block_size=16, max_num_seqs=3,
                 max_num_batched_tokens=64, max_model_len=256, decode_steps=64,
                 run_seconds=run_seconds, step_times=(step_seconds,))
    sim = Sim(w).run()
    sim.check_end()
    s = sim.scheduler
    assert math.isclose(s.step_seconds, step_seconds)
    bound = max(1, int(run_seconds / s.step_seconds))
    assert s.runs[:2] == [2, 4] and all(k <= bound for k in s.runs[2:])
    if bound > 1:
        assert s.runs[2:].count(bound) >= 3
    else:  # a step already takes longer than a run may: single steps
        assert s.runs[2:] == []


@pytest.mark.parametrize("max_tokens, decode_steps, chunks", [
    (1, 1, [(0, 2)]),             # the prefill samples its only output
    (3, 4, [(0, 2), (2, 1)]),     # then a run of 2 samples its last two
    (2, 1, [(0, 2), (2, 1)]),
])
def test_a_sequence_whose_last_tokens_are_in_flight_is_not_scheduled(
        max_tokens, decode_steps, chunks):
    """While its last tokens are in flight a sequence is passed over (the loop then waits),
    and no step computes anything for it past them."""
    w = Workload([request(0, 2, max_tokens)], num_blocks=4, block_size=4, max_num_seqs=1,
                 max_num_batched_tokens=64, max_model_len=64, decode_steps=decode_steps)
    sim = Sim(w).run()
    sim.check_end()
    assert sim.workers.chunks[0] == chunks
    assert sim.scheduler.skipped == 1
    assert len(sim.tokens[0]) == max_tokens


@checked(60)
@given(w=workloads(aborts=False, arrivals=False, max_requests=4))
def test_no_step_samples_past_a_sequence_s_end(w):
    """Exhausted sequences are never scheduled (checked at every schedule), no worker samples
    past max_tokens or max_model_len (FakeWorkers), and each request ends with exactly its
    output."""
    sim = Sim(w).run()
    sim.check_end()
    sim.report()


def test_a_preempted_sequence_waits_for_its_token_in_flight():
    """The admission guard, set up by hand: the loop never reaches it (a schedule that
    preempts admits nobody, and the step in flight is applied before the next schedule)."""
    sim = Sim(Workload([request(0, 3, 5)], num_blocks=4, block_size=4, max_num_seqs=2,
                       max_num_batched_tokens=64, max_model_len=64))
    loop, s, seq = sim.loop, sim.scheduler, sim.seqs[0]
    loop.seqs[0] = seq
    s.add(seq)
    batch, steps, _ = s.schedule()
    _, sampled = loop._build_step(batch, steps)
    assert seq.pending == 1
    s.running.remove(seq)  # as _make_room preempts it
    s._preempt(seq)
    assert s.schedule()[0] == []  # its token is still in flight: it waits
    loop._apply(sampled, [7], [])
    assert s.schedule()[0] == [(seq, 4)]  # then all 4 tokens are recomputed


@checked(150)
@given(st.one_of(workloads(prefix_caching=True), workloads(fits=False, prefix_caching=True)))
def test_with_prefix_caching_outputs_and_blocks_are_as_without(w):
    """Shared prefixes and repeated prompts with the cache on, in a cache that fits every
    request or only each prompt (preemption, re-admission from the cache): every shared block
    holds what its reader's own would (FakeWorkers checks each read against the whole
    context), outputs are exactly what each request draws, and every block and count returns
    at the end."""
    sim = Sim(w).run()
    sim.check_end()
    sim.report()
    hits = sum(start for starts in sim.workers.hits.values() for start in starts)
    event("prefix hits" if hits else "no prefix hit")
    assert sim.scheduler.prefix_hits == hits


def test_samples_of_one_prompt_admitted_together_share_its_full_blocks():
    """Three requests with the same 10-token prompt in blocks of 4, in one step: the first
    computes all 10, the others only the last partial block (tokens 8-9), reading blocks 0-1
    of the first; the cache holds no copy of them."""
    reqs = [request(i, 10, 3) for i in range(3)]
    for r in reqs[1:]:
        r.prompt = list(reqs[0].prompt)
    w = Workload(reqs, num_blocks=12, block_size=4, max_num_seqs=4,
                 max_num_batched_tokens=64, max_model_len=64, prefix_caching=True)
    sim = Sim(w)
    for seq in sim.seqs.values():
        sim.scheduler.add(seq)
    batch, _, _ = sim.scheduler.schedule()
    assert [n for _, n in batch] == [10, 2, 2]
    tables = [seq.block_table for seq, _ in batch]
    assert tables[1][:2] == tables[2][:2] == tables[0][:2]
    assert len({t[2] for t in tables}) == 3  # each its own last block
    sim = Sim(w).run()
    sim.check_end()
    assert sim.workers.hits == {0: [0], 1: [8], 2: [8]}
    assert sim.scheduler.prefix_hits == 16 and sim.scheduler.prefix_queries == 30
