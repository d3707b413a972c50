"""A worker's model: its shard of the weights, its KV cache, and one forward step."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import operator
import os
import sys
import time
from array import array
from collections.abc import Callable

import torch
import torch.distributed as dist

from tp_engine.config import MAX_DECODE_STEPS, EngineConfig
from tp_engine.kernels import paged_decode, paged_prefill
from tp_engine.model.attention import AttentionMetadata
from tp_engine.model.decode_run import DecodeRun
from tp_engine.model.loader import DTYPES, load_model
from tp_engine.model.parallel import TensorParallel
from tp_engine.sampling.rank0 import RankZeroSampling
from tp_engine.wire import Sample, SequenceSetup, Step
from tp_engine.worker.distributed import current_device
from tp_engine.worker.interrupted import Interrupted

STOP_CHECK_S = 0.01  # how often a run of decode steps asks whether SHUTDOWN came
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: rows of logits made at once (a vocabulary each)
# a CPU KV cache sized from free memory: this share of it over the ranks, within these bounds
KV_FREE_SHARE, KV_FLOOR_GB, KV_CAP_GB = 0.25, 0.25, 4.0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return None


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    A step's activations and gathered keys are a few MB each: above glibc's mmap threshold, so
    by default each is a fresh mmap whose pages fault in one by one (and is unmapped again on
    free). That cost more than the attention itself: a decode step of 96 sequences took 40 ms
    instead of 16. With a fixed high mmap threshold and no trimming the same memory is reused
    step after step. Process-wide, hence called in the worker only."""
    if (libc := _glibc()) is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 1 << 30)


def return_freed_memory() -> None:
    """Hand the memory freed while loading (the plain weights a packed layer dropped) back to
    the kernel once: with trimming off it would stay in the worker's RSS."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def zeros_in_huge_pages(shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """torch.zeros for the KV cache: on CPU an anonymous mmap, advised into 2 MB pages.

    Attention gathers blocks from all over the cache: with 4 kB pages nearly every block is a
    TLB miss, and a decode step spent a third of its time in the gather (Linux THP in
    "madvise" mode gives huge pages only to memory that asks). The kernel zero-fills an
    anonymous mapping page by page on first touch, so start-up no longer writes the whole
    cache (0.25 GB per worker by default) before reporting ready."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = max(1, dtype.itemsize * int(torch.Size(shape).numel()))
    # private: a shared anonymous mapping is shmem, which THP leaves in 4 kB pages
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only; mere advice, so failure is harmless
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    # the tensor keeps the mapping alive
    return torch.frombuffer(memory, dtype=dtype, count=nbytes // dtype.itemsize).view(shape)


def cpu_kv_budget(ranks: int, free: int | None = None) -> int:
    """The bytes of a CPU worker's KV cache when `kv_cache_memory_gb` is not given: a share
    of the memory free at start (`free` bytes; read from /proc/meminfo when None), between a
    floor and a cap. The cache is an anonymous mapping whose pages the kernel supplies on
    first touch, so an unused part costs none."""
    if free is None:
        try:
            with open("/proc/meminfo") as f:
                free_kb = next(int(line.split()[1]) for line in f
                               if line.startswith("MemAvailable"))
            free = free_kb * 1024
        except (OSError, StopIteration, ValueError, IndexError):
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = KV_FREE_SHARE * free / ranks
    return int(min(max(share, KV_FLOOR_GB * (1 << 30)), KV_CAP_GB * (1 << 30)))


def _in_vocabulary(ids: array, vocab: int) -> bool:
    return not ids or (min(ids) >= 0 and max(ids) < vocab)  # builtins: microseconds


def _tokenizer(config: EngineConfig):
    """The checkpoint's tokenizer, which rank 0 loads only for its first grammar."""
    from tp_engine.engine.tokenizer import Tokenizer

    return Tokenizer.load(config.model)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallel, dtype: str):
        keep_freed_memory()
        self.config, self.tp = config, tp
        self.device = current_device(config.device)
        self.dtype = DTYPES[dtype]
        self.model = load_model(config.model, tp, self.dtype, self.device, config.max_model_len,
                                config.model_config)
        return_freed_memory()
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.vocab_size = self.model.config.vocab_size
        self.window = self.model.config.sliding_window
        self.num_blocks = self._agree_on_blocks()
        attn = self.model.model.layers[0].self_attn
        self.kv_heads = attn.num_kv_heads  # per rank, in the cache
        self.score_heads = attn.score_heads  # per rank, as attention reads them: the masks'
        slots = self.num_blocks * config.block_size
        # each layer's buffer: keys then values, [2, kv_heads, slots, head_dim]
        shape = (2, self.kv_heads, slots, attn.head_dim)
        self.caches = [zeros_in_huge_pages(shape, self.dtype, self.device)
                       for _ in range(self.model.config.num_layers)]
        # the kernels are built (or found) now, not in the first step
        paged_decode.available(self.caches[0])
        self.prefill_kernel = paged_prefill.available(self.caches[0], attn.head_dim)
        self.sampling = None  # rank 0's: sequence states, sampler, logprobs
        if tp.rank == 0:
            self.sampling = RankZeroSampling(config.seed, self.device, self.vocab_size,
                                             lambda: _tokenizer(config))
        self.state_ids: set[int] = set()  # the sequences rank 0 keeps a state for (all ranks)
        self.logprobs: list = []          # the last step's, for StepDone (rank 0)
        self.prompt_logprobs: list = []
        self.last_sampled: list[int] = []  # the previous step's tokens, on every rank
        self.model_seconds = 0.0  # of the last step or run: forward, LM head, sampling
        self._ends: list[int] = []

    def _bytes_per_block(self) -> int:
        attn = self.model.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * self.config.block_size * self.model.config.num_layers

    def _agree_on_blocks(self) -> int:
        """Every rank must hold the same number of blocks: the smallest any rank can afford."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            budget = free * cfg.gpu_memory_utilization
        elif cfg.kv_cache_memory_gb is not None:
            budget = cfg.kv_cache_memory_gb * (1 << 30)
        else:
            budget = cpu_kv_budget(int(os.environ.get("LOCAL_WORLD_SIZE", cfg.num_workers)))
        # never more than every sequence at full length could use, plus a spare
        enough = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size) + 1
        blocks = torch.tensor([min(int(budget // self._bytes_per_block()), enough)],
                              device=self.device)
        self.tp.all_reduce(blocks, op=dist.ReduceOp.MIN)
        if int(blocks) < 2:
            raise MemoryError(f"rank {self.tp.rank}: no room for a KV cache "
                              f"({self._bytes_per_block()} bytes a block)")
        return int(blocks)

    def check(self, step: Step) -> list[Sample]:
        """Refuse a step that would index out of range; its samples by name. Every rank checks
        the same message the same way, so all of them refuse it before any collective starts.
        Builtins over the lists (map, min, max) keep it to microseconds."""
        starts, qlens, tables = step.starts, step.query_lens, step.block_tables
        n = len(starts)
        if not (n == len(qlens) == len(tables)) or n == 0:
            raise ValueError("step: starts, query_lens and block_tables differ in length")
        if len(step.token_ids) != 4 * sum(qlens) or min(qlens) < 1:
            raise ValueError("step: token bytes do not match query_lens")
        samples = step.named_samples()
        if any(not 0 <= s.index < n for s in samples):
            raise ValueError("step: a sample names no sequence")
        setups = self._check_states(step, samples, n)
        if step.decode_steps:
            self._check_run(step, samples)
        # a run of decode steps reaches decode_steps[i] positions past starts[i]
        ends = list(map(operator.add, starts, step.decode_steps or qlens))
        if max(ends) > self.config.max_model_len:
            raise ValueError("step: a sequence runs past max_model_len")
        bs = self.config.block_size
        if min(starts) < 0 or any(len(t) * bs < e for t, e in zip(tables, ends)):
            raise ValueError("step: a block table is too short for its tokens")
        used = [t for t in tables if t]
        if used and (min(map(min, used)) < 0 or max(map(max, used)) >= self.num_blocks):
            raise ValueError("step: a block id is out of range")
        self.state_ids.difference_update(step.releases)
        self.state_ids.update(s.seq_id for s in setups)
        if self.sampling is not None:
            self.sampling.update(step.releases, setups)
        return samples

    def _check_states(self, step: Step, samples: list[Sample], n: int) -> list[SequenceSetup]:
        """The step's sequence setups, checked as every rank can (so that none starts a step
        rank 0 would refuse)."""
        setups = step.named_setups()
        vocab = self.vocab_size
        for s in setups:
            ints = [s.seq_id, s.min_tokens, s.logprobs, s.prompt_logprobs, *s.bias_ids,
                    *s.stop_ids]
            if (not all(type(v) is int for v in ints)
                    or not all(isinstance(v, (int, float)) for v in
                               (s.presence_penalty, s.frequency_penalty, s.repetition_penalty,
                                *s.bias_values))
                    or len(s.bias_ids) != len(s.bias_values)
                    or not all(0 <= t < vocab for t in (*s.bias_ids, *s.stop_ids))
                    or not isinstance(s.prompt, bytes) or not isinstance(s.output, bytes)
                    or len(s.prompt) % 4 or len(s.output) % 4
                    or not _in_vocabulary(array("i", s.prompt + s.output), vocab)
                    or not (s.grammar == [] or (len(s.grammar) == 2
                                                and all(isinstance(g, str) for g in s.grammar)))):
                raise ValueError("step: a sequence setup is malformed")
        if not all(type(r) is int for r in step.releases):
            raise ValueError("step: releases must be sequence ids")
        live = (self.state_ids - set(step.releases)) | {s.seq_id for s in setups}
        if any(s.state >= 0 and s.state not in live for s in samples):
            raise ValueError("step: a sample names a sequence state that was not set up")
        if any(not (isinstance(r, list) and len(r) == 2 and type(r[0]) is int
                    and 0 <= r[0] < n and r[1] in live) for r in step.logit_rows):
            raise ValueError("step: logit_rows must be [sequence index, state id] pairs")
        return setups

    def _check_run(self, step: Step, samples: list[Sample]) -> None:
        runs = step.decode_steps
        if len(runs) != len(step.starts) or len(samples) != len(runs):
            raise ValueError("step: decode_steps needs one count and one sample per sequence")
        if max(step.query_lens) != 1 or any(s.index != i for i, s in enumerate(samples)):
            raise ValueError("step: a run of decode steps must decode and sample in order")
        if min(runs) < 1 or max(runs) > MAX_DECODE_STEPS:
            raise ValueError(f"step: decode_steps must be 1 to {MAX_DECODE_STEPS}")
        if any(a < b for a, b in zip(runs, runs[1:])):
            raise ValueError("step: decode_steps must not increase along the batch")

    @torch.inference_mode()
    def step(self, step: Step, stop_asked: Callable[[], bool] = lambda: False,
             report: Callable[[int, list[int], list], None] | None = None) -> list[int] | None:
        """Run `step`; rank 0 returns the sampled tokens. A run of decode steps asks
        `stop_asked` (rank 0's answer counts) between two steps, and raises Interrupted; with
        `report_steps`, rank 0 calls `report(index, tokens, logprobs)` after each step of the
        run but the last."""
        samples = self.check(step)
        ids = self._token_ids(step)
        if step.decode_steps:
            if not (step.report_steps and self.sampling is not None):
                report = None
            return self._decode_run(step, samples, ids, stop_asked, report)
        meta = AttentionMetadata.build(step.starts, step.query_lens, step.block_tables,
                                       self.config.block_size, self.window, self.device,
                                       ragged_prefill=self.prefill_kernel)
        ids_t = torch.frombuffer(ids, dtype=torch.int32).to(self.device, torch.long)
        began = time.perf_counter()
        hidden = self.model(ids_t, meta.positions, self.caches, meta)
        self.logprobs, self.prompt_logprobs = [], []
        if step.logit_rows:
            self._prompt_logprobs(step, hidden)
        if not samples:
            self.model_seconds = time.perf_counter() - began
            self.last_sampled = []
            return None
        rows = [self._ends[s.index] - 1 for s in samples]
        if rows != list(range(hidden.shape[0])):  # a decode step samples every row: no copy
            hidden = hidden[torch.tensor(rows, device=self.device)]
        logits = self.model.compute_logits(hidden)
        tokens = None
        if self.sampling is not None:
            tokens, entries = self.sampling.sample(logits, samples)
            self.logprobs = entries or []
        self.model_seconds = time.perf_counter() - began
        self.last_sampled = self._share(tokens, len(samples))[0].tolist()
        return self.last_sampled if self.sampling is not None else None

    def _prompt_logprobs(self, step: Step, hidden: torch.Tensor) -> None:
        """The logits of every new token of the sequences in logit_rows (every rank takes
        part: the LM head's gather is collective), a few hundred rows at a time; rank 0 keeps
        the prompt tokens' logprobs."""
        for index, seq_id in step.logit_rows:
            end = self._ends[index]
            begin = end - step.query_lens[index]
            entries = []
            for at in range(begin, end, PROMPT_LOGITS_ROWS):
                logits = self.model.compute_logits(hidden[at:min(end, at + PROMPT_LOGITS_ROWS)])
                if self.sampling is not None:
                    position = step.starts[index] + at - begin
                    entries += self.sampling.prompt_logprobs(seq_id, position, logits)
            if self.sampling is not None:
                self.prompt_logprobs.append([index, entries])

    def _decode_run(self, step: Step, samples: list[Sample], ids: array,
                    stop_asked: Callable[[], bool],
                    report: Callable[[int, list[int], list], None] | None) -> list[int] | None:
        """Several decode steps, each one's sampled tokens the next one's input. Returns each
        sequence's tokens, sequence by sequence (rank 0; None elsewhere)."""
        run = DecodeRun.build(step.starts, step.decode_steps, step.block_tables,
                              self.config.block_size, self.window, self.score_heads, self.dtype,
                              self.device)
        tokens = torch.frombuffer(ids, dtype=torch.int32).to(self.device, torch.long)
        drawn = any(s.temperature > 0 for s in samples)
        # each step's tokens, kept on the device: one copy out at the end of the run
        sampled = torch.empty(len(run), len(step.starts), dtype=torch.long, device=self.device)
        run_logprobs: list = []  # each step's, when a sequence asked for them
        self.model_seconds = 0.0
        ask_at = time.perf_counter()  # when to ask next whether SHUTDOWN came
        for i in range(len(run)):
            meta = run.metadata(i)
            for group in meta.decode:  # any masks not built yet, outside the model's time
                group.bias_for(self.score_heads, self.dtype,
                               group.tables.shape[1] * run.block_size)
            specs = samples[:run.running[i]]
            if self.sampling is not None and i and drawn:  # a draw's output index moves on
                specs = [s._replace(output_index=s.output_index + i) for s in specs]
            began = time.perf_counter()
            hidden = self.model(tokens, meta.positions, self.caches, meta)
            logits = self.model.compute_logits(hidden)
            new = None
            if self.sampling is not None:
                new, entries = self.sampling.sample(logits, specs)
                run_logprobs.append(entries)
            self.model_seconds += time.perf_counter() - began
            if report is not None and i + 1 < len(run):  # the run's last goes with StepDone
                report(i, new.tolist(), entries or [])
            # asking the socket costs about a hundredth of a batch-64 step: ask every 10 ms
            stop = False
            if self.tp.rank == 0 and i + 1 < len(run) and time.perf_counter() >= ask_at:
                ask_at = time.perf_counter() + STOP_CHECK_S
                stop = stop_asked()
            tokens, stop = self._share(new, run.running[i], stop)
            if stop:
                raise Interrupted
            sampled[i, :tokens.shape[0]] = tokens
            if i + 1 < len(run) and run.running[i + 1] < len(tokens):  # some end here
                tokens = tokens[:run.running[i + 1]]
        flat, last = run.by_sequence(sampled)
        self.last_sampled = last.tolist()
        self.logprobs, self.prompt_logprobs = [], []
        if any(entries is not None for entries in run_logprobs):
            self.logprobs = [run_logprobs[j][i] if run_logprobs[j] is not None else None
                             for i, k in enumerate(step.decode_steps) for j in range(k)]
        return flat.tolist() if self.sampling is not None else None

    def _token_ids(self, step: Step) -> array:
        """The step's token ids, the placeholders filled in: the request loop sends the next
        step before this one's tokens are back, so a token sampled by the previous step goes
        as -1 - i, "its sample i", always the last token of a sequence's chunk."""
        ids = array("i", step.token_ids)  # a writable copy torch can share
        self._ends = list(itertools.accumulate(step.query_lens))  # each sequence's last row + 1
        if min(ids) < 0:
            previous = self.last_sampled
            for end in self._ends:
                ref = -1 - ids[end - 1]
                if 0 <= ref < len(previous):
                    ids[end - 1] = previous[ref]
        if not _in_vocabulary(ids, self.vocab_size):
            raise ValueError("step: a token id is outside the vocabulary")
        return ids

    def _share(self, tokens: torch.Tensor | None, count: int,
               stop: bool = False) -> tuple[torch.Tensor, bool]:
        """Every rank needs the sampled tokens, to fill in the next step's placeholders and as
        the next input of a run of decode steps, and rank 0's `stop`: rank 0 broadcasts them
        (a few bytes) when there are other ranks."""
        if self.tp.size == 1:
            return tokens, stop
        if tokens is None:
            shared = torch.zeros(count + 1, dtype=torch.long, device=self.device)
        else:
            flag = torch.tensor([int(stop)], dtype=torch.long, device=tokens.device)
            shared = torch.cat([tokens, flag]).to(self.device)
        self.tp.broadcast_from_first(shared)
        return shared[:-1], bool(shared[-1])
