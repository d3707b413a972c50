"""Continuous batching over the paged KV cache.

Every sequence is a list of token ids (prompt, then output) of which the first `num_computed`
are in the cache. A step gives each scheduled sequence a chunk of its uncomputed tokens: one for
a decode, many for a prefill, so prefills and decodes share a step, and a long prompt is cut to
the step's token budget. When the cache is full, the newest running sequence is preempted: its
blocks are freed and it is recomputed later (its seeded samples repeat exactly).

When every scheduled sequence decodes and none waits, the step becomes a run of decode steps
that the workers compute from one message (see model/decode_run); each sequence's blocks are
reserved for its whole run. A request that arrives meanwhile waits for the runs in flight, so
runs start at 2 steps after an admission and double while no request comes, up to
`decode_steps`: a steady stream of requests keeps them short, a settled batch runs long. A run
is also kept to about `run_seconds` of decode steps (as last measured): with a real model's
steps of tens of milliseconds, a run of 16 would keep a new request waiting for seconds, and
a sequence that stops on EOS would compute seconds of dropped tokens.

The request loop keeps two steps in flight, so the next step is scheduled before the tokens of
the one running are known: a sequence's `pending` tokens (sampled by the steps in flight, not
yet received) count as part of it, and the worker fills in the last of them. `num_computed`
counts what the steps sent so far will have computed.

With prefix caching, a sequence's full blocks are named (BlockManager.register) as soon as a
step that computes them is scheduled: the workers run steps in order, and within a step every
layer writes the step's keys and values before any attention reads them, so a sequence
admitted in the same step (another sample of the same prompt, say) may read them already. A
sequence admitted starts from the longest cached prefix of its full blocks, leaving at least
its last token to compute, for the logits."""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field

from tp_engine import wire
from tp_engine.engine.block_manager import BlockManager, chain_hash
from tp_engine.engine.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    max_tokens: int
    stops: frozenset[int] = frozenset()  # the tokens that end it: its stop tokens, EOS
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    pending: int = 0        # tokens the steps in flight sample for it, not yet received
    pending_index: int = 0  # its sample's index in the last step sent (the worker's reference)
    rank0_state: bool = False   # rank 0 keeps a state for it (penalties, logprobs, grammar)
    prompt_logprobs_to: int = 0  # the positions whose prompt logprobs were asked for
    streaming: bool = False  # a consumer reads it token by token: runs report every step
    needs_setup: bool = True  # (re)admitted: rank 0 builds its state with the next step
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order
    num_registered: int = 0  # its first blocks that are named in the cache
    claim: int = 0  # the KV blocks it may take at its full length (where replicas place it)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def uncomputed(self) -> int:
        return len(self.token_ids) + self.pending - self.num_computed

    def room(self, max_model_len: int) -> int:
        """Tokens it may still be sampled, counting those in flight as sampled."""
        total = len(self.token_ids) + self.pending
        return min(self.max_tokens - (total - self.prompt_len), max_model_len - total)

    def hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """The hashes of its first `num_blocks` full blocks (made once, as tokens come)."""
        hashes = self.block_hashes
        while len(hashes) < num_blocks:
            at = len(hashes) * block_size
            hashes.append(chain_hash(hashes[-1] if hashes else b"",
                                     self.token_ids[at:at + block_size]))
        return hashes[:num_blocks]

    def exhausted(self, max_model_len: int) -> bool:
        """The pending tokens are its last: nothing more to compute for it."""
        return self.pending > 0 and self.room(max_model_len) <= 0


def sequence_setup(seq: Sequence) -> wire.SequenceSetup:
    """What rank 0 keeps for `seq`, from its parameters and its tokens so far."""
    p = seq.params
    bias = p.logit_bias or {}
    grammar = p.grammar
    needs_prompt = p.repetition_penalty != 1 or p.prompt_logprobs is not None
    return wire.SequenceSetup(
        seq.seq_id, float(p.presence_penalty), float(p.frequency_penalty),
        float(p.repetition_penalty), p.min_tokens, list(bias), [float(v) for v in bias.values()],
        sorted(seq.stops) if p.min_tokens else [],
        -1 if p.logprobs is None else p.logprobs,
        -1 if p.prompt_logprobs is None else p.prompt_logprobs,
        list(grammar) if grammar else [],
        array("i", seq.token_ids[:seq.prompt_len] if needs_prompt else []).tobytes(),
        array("i", seq.token_ids[seq.prompt_len:]).tobytes())


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, decode_steps: int = 1, run_seconds: float | None = None):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.decode_steps = decode_steps
        self.run_seconds = run_seconds
        self._run = 1  # the last run's length
        self.step_seconds = 0.0  # a decode step's time in the model, as the workers report
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of the sequences admitted
        self.prefix_hits = 0     # of those, found in the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[int], list[Sequence]]:
        """The next step's (sequence, new tokens) pairs; the decode steps each runs ([]: one
        step); and the sequences that can never fit in the cache (the caller finishes them
        with "length")."""
        budget, batch, too_long = self.token_budget, [], []
        if self.waiting:
            self._run = 1
        preemptions = self.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.uncomputed, budget)
            if n == 0 or seq.exhausted(self.max_model_len):  # ends with the step in flight
                index += 1
                continue
            if not self._make_room(seq, n):
                if not self.running:  # alone with the whole cache, and still too big
                    self.waiting.remove(seq)
                    too_long.append(seq)
                break
            batch.append((seq, n))
            self._register(seq, seq.num_computed + n)
            budget -= n
            index += 1
        # no admissions in a step that had to preempt: the cache is the bottleneck
        while (self.waiting and budget > 0 and preemptions == self.num_preemptions
               and len(self.running) < self.max_num_seqs and not self.waiting[0].pending):
            # (a preempted sequence whose last token is still in flight waits for it)
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n is None:
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            self._register(seq, seq.num_computed + n)
            budget -= n
        return (*self._decode_run(batch), too_long)

    def _decode_run(self, batch: list[tuple[Sequence, int]],
                    ) -> tuple[list[tuple[Sequence, int]], list[int]]:
        """`batch` as a run of decode steps, longest first, with each sequence's steps; or
        `batch` and [] when it cannot be one."""
        if (self.decode_steps == 1 or self.waiting or not batch
                or any(n != 1 or seq.uncomputed != 1 for seq, n in batch)):
            return batch, []
        longest = self.decode_steps
        if self.run_seconds is not None and self.step_seconds > 0:
            longest = max(1, min(longest, int(self.run_seconds / self.step_seconds)))
        self._run = min(2 * self._run, longest)
        steps = [min(self._run, seq.room(self.max_model_len)) for seq, _ in batch]
        for (seq, _), k in zip(batch, steps):
            if not self.blocks.grow(seq.block_table, seq.num_computed + k):
                return batch, []  # blocks already added stay with their sequences
        if max(steps) == 1:
            return batch, []
        order = sorted(range(len(batch)), key=steps.__getitem__, reverse=True)  # stable
        return [batch[i] for i in order], [steps[i] for i in order]

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Give a waiting sequence its cached prefix and the blocks of its first chunk; the
        chunk's tokens, or None if the cache is short. A request for prompt logprobs computes
        its whole prompt (it needs the logits of every position)."""
        bs, known = self.blocks.block_size, len(seq.token_ids)
        cached = []
        if self.blocks.caching and seq.params.prompt_logprobs is None:
            cached = self.blocks.cached_prefix(seq.hashes(bs, (known - 1) // bs))
        n = min(seq.uncomputed - len(cached) * bs, budget)
        if not self.blocks.allocate(seq.block_table, cached, len(cached) * bs + n):
            return None
        seq.num_registered = len(cached)
        seq.num_computed = len(cached) * bs
        seq.needs_setup = True
        self.prefix_queries += known
        self.prefix_hits += seq.num_computed
        return n

    def _register(self, seq: Sequence, computed: int) -> None:
        """Name the full blocks of `seq` that its first `computed` tokens fill (those whose
        tokens are known: not the ones in flight)."""
        full = min(computed, len(seq.token_ids)) // self.blocks.block_size
        if self.blocks.caching and full > seq.num_registered:
            self.blocks.register(seq.block_table, seq.hashes(self.blocks.block_size, full),
                                 seq.num_registered)
            seq.num_registered = full

    def _release(self, seq: Sequence) -> None:
        """Free its blocks, naming first those the steps sent complete."""
        self._register(seq, seq.num_computed)
        self.blocks.free(seq.block_table)
        seq.num_registered = 0

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Grow `seq` by `n` tokens, preempting the newest sequences as needed; False if `seq`
        itself had to go."""
        while not self.blocks.grow(seq.block_table, seq.num_computed + n):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def requeue_all(self) -> None:
        """Every running sequence back to the front of the queue, in order, as preempted
        (a new worker group: nothing of the old cache is kept)."""
        for seq in reversed(self.running):
            self._preempt(seq)
        self.running.clear()
        self.blocks.reset()

    def observe_decode(self, seconds_per_step: float) -> None:
        """A decode step's time as measured (a moving average: one slow step is noise)."""
        previous = self.step_seconds or seconds_per_step
        self.step_seconds = 0.7 * previous + 0.3 * seconds_per_step

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
