"""The engine's core: starts the workers and the two threads, admits requests, and owns the
lifecycle. The public Engine and AsyncEngine are thin fronts on it.

terminate(): stop admitting; the request loop fails what is in flight and broadcasts SHUTDOWN;
join the request loop, then the stream-back thread; reap the workers (they destroy their
process group before they exit); close the sockets; remove the IPC directory. Everything is
released in the reverse order of acquisition, so a half-built engine releases what exists."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time

from tp_engine import wire
from tp_engine.config import EngineConfig
from tp_engine.engine.block_manager import BlockManager
from tp_engine.engine.request import Registry, RequestState, SyncSink
from tp_engine.engine.request_loop import RequestLoop
from tp_engine.engine.resources import Deadline, Resources
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.scheduler import Scheduler, Sequence
from tp_engine.engine.stream_back import StreamBack
from tp_engine.engine.tokenizer import Tokenizer
from tp_engine.engine.torchrun_group import TorchrunGroup
from tp_engine.engine.worker_group import WorkerGroup
from tp_engine.errors import EngineError, EngineTerminatedError, InvalidRequestError
from tp_engine.sampling.grammar import check_grammar

log = logging.getLogger("tp_engine.engine")


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.state = "starting"
        self._lock = threading.Lock()
        self._resources = Resources()
        self._failure: EngineError | None = None
        self._seq_ids = itertools.count()
        self.registry = Registry()
        start = time.perf_counter()
        try:
            self._start()
        except BaseException:
            self.state = "failed"
            self._resources.release_all(Deadline(config.terminate_timeout))
            raise
        self.state = "running"
        log.debug("engine ready in %.3f s", time.perf_counter() - start)

    def _start(self) -> None:
        cfg = self.config
        model = cfg.model_config
        model.check_tensor_parallel(cfg.tensor_parallel_size)
        self.model_config = model

        ipc_dir = wire.private_ipc_dir()
        self._resources.acquired("IPC directory",
                                 lambda _: shutil.rmtree(ipc_dir, ignore_errors=True))
        group_cls = TorchrunGroup if cfg.start_method == "torchrun" else WorkerGroup
        self.group = group = group_cls(cfg, ipc_dir)
        self._resources.acquired("sockets", group.close)
        group.start()
        self._resources.acquired("workers", self._release_workers)
        # built while the workers load their shards
        self.tokenizer = Tokenizer.load(cfg.model)
        self.eos_token_ids = frozenset([*self.tokenizer.eos_token_ids, *model.eos_token_ids])
        group.wait_ready(cfg.startup_timeout)

        self.blocks = BlockManager(group.ready[0].num_kv_blocks, cfg.block_size,
                                   caching=cfg.enable_prefix_caching)
        log.info("KV cache: %d blocks of %d tokens a rank (%s)", self.blocks.num_blocks,
                 cfg.block_size, cfg.kv_cache_sizing)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.max_model_len, cfg.decode_steps, cfg.decode_run_seconds)
        self.stream_back = StreamBack(self.registry, self.abort_seq)
        self.stream_back.start()
        self._resources.acquired("stream-back thread",
                                 lambda d: self.stream_back.join(d.left()))
        self.loop = RequestLoop(group, self.scheduler, self.stream_back, cfg.max_model_len,
                                self._on_failure, cfg.max_restarts, cfg.step_timeout)
        self.loop.start()
        self._resources.acquired("request loop", self._release_loop)

    def _release_loop(self, deadline: Deadline) -> None:
        self.loop.stop()
        if not self.loop.join(deadline.left()):
            log.warning("request loop did not stop in time")

    def _release_workers(self, deadline: Deadline) -> None:
        loop = getattr(self, "loop", None)
        if loop is None or not loop.thread.is_alive():  # the loop owns the socket while alive
            self.group.send_shutdown()
        all_ready = len(self.group.ready) == self.group.size
        self.group.reap(deadline, grace=all_ready)

    def _on_failure(self, error: EngineError) -> None:
        with self._lock:
            self._failure = error
            if self.state == "running":
                self.state = "failed"
        log.error("engine failed: %s", error)

    # --- requests --------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        for token in prompt_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidRequestError(f"prompt token id {token!r} is not in the vocabulary "
                                          f"(0..{vocab - 1})")
        limit = self.config.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens; max_model_len "
                                      f"is {limit}, which leaves no room for output")
        if self.blocks.blocks_for(len(prompt_ids) + 1) > self.blocks.num_blocks:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens, more than the "
                                      f"KV cache holds ({self.blocks.num_blocks} blocks)")

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against the vocabulary, and the
        grammar, which the grammar library compiles (so that rank 0 never meets a bad one)."""
        params.validate()
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"{name}: token ids must be in 0..{vocab - 1}")
        if params.grammar is not None:
            check_grammar(*params.grammar)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink=None,
               prompt: str | None = None, request_id: str | None = None,
               stream: bool = False) -> RequestState:
        """Queue a request of one sample. Raises at once (nothing queued) when it cannot be
        served."""
        if params.samples > 1:
            raise InvalidRequestError("a request of several samples (n, best_of) goes through "
                                      "submit_samples")
        return self.submit_samples(prompt_ids, params, sink, prompt, request_id, stream)[0]

    def submit_samples(self, prompt_ids: list[int], params: SamplingParams, sink=None,
                       prompt: str | None = None, request_id: str | None = None,
                       stream: bool = False) -> list[RequestState]:
        """Queue one request's samples (n, or best_of) together, one sink waking for all.
        `stream`: its consumer shows each token as it comes, so the workers report every step
        of a run of decode steps instead of the run's tokens at its end."""
        made = self._request(prompt_ids, params, sink or SyncSink(), prompt, request_id)
        for _, seq in made:
            seq.streaming = stream
        self._queue(made)
        return [state for state, _ in made]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, str | None]],
                    ) -> list[list[RequestState]]:
        """Queue (prompt ids, params, prompt text) requests together, so the request loop
        admits them in one step: submitted one by one, the first would start alone, a step
        ahead of the rest, and the batch would decode at two lengths (two attention groups).
        Returns each request's samples. Raises at once (nothing queued) when one cannot be
        served."""
        made = [self._request(ids, params, None, prompt) for ids, params, prompt in requests]
        self._queue([pair for pairs in made for pair in pairs])
        return [[state for state, _ in pairs] for pairs in made]

    def _request(self, prompt_ids: list[int], params: SamplingParams, sink,
                 prompt: str | None, request_id: str | None = None,
                 ) -> list[tuple[RequestState, Sequence]]:
        self.check_params(params)
        self.check_prompt(prompt_ids)
        if params.max_tokens is None:  # up to the context
            max_tokens = self.config.max_model_len - len(prompt_ids)
        else:  # 0 (echo only): one token is drawn, for the logits, and not shown
            max_tokens = max(1, params.max_tokens)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                     else self.eos_token_ids)
        made = []
        for index in range(params.samples):
            sample = params.for_sample(index) if params.samples > 1 else params
            seq_id = next(self._seq_ids)
            state = RequestState(seq_id, request_id or str(seq_id), prompt, list(prompt_ids),
                                 sample, self.tokenizer, sink or SyncSink())
            seq = Sequence(seq_id, list(prompt_ids), len(prompt_ids), sample, max_tokens, stops,
                           rank0_state=sample.needs_rank0_state())
            made.append((state, seq))
        return made

    def _queue(self, requests: list[tuple[RequestState, Sequence]]) -> None:
        with self._lock:  # terminate() flips the state under this lock: nothing slips past
            self._check_serving()
            for state, _ in requests:
                self.registry.add(state)
            self.loop.add([seq for _, seq in requests])

    def _check_serving(self) -> None:
        if self.state == "failed" and self._failure is not None:
            raise self._failure
        if self.state != "running":
            raise EngineTerminatedError(f"the engine is {self.state}")

    def abort(self, state: RequestState) -> None:
        """Stop a request: its consumer gets finish_reason "abort", its blocks are freed."""
        if self.registry.remove(state.seq_id) is not None:
            state.finish("abort")
        self.abort_seq(state.seq_id)

    def abort_seq(self, seq_id: int) -> None:
        if self.state == "running":
            self.loop.abort(seq_id)

    def stats(self) -> dict[str, float]:
        """A snapshot for metrics: read without locks, so each figure is at most a step old."""
        blocks = self.blocks
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                    in_flight=len(self.registry), kv_blocks=blocks.num_blocks,
                    kv_blocks_free=blocks.num_free, kv_usage=blocks.usage,
                    preemptions=self.scheduler.num_preemptions, steps=self.loop.steps,
                    restarts=self.loop.restarts,
                    prefix_cache_queries=self.scheduler.prefix_queries,
                    prefix_cache_hits=self.scheduler.prefix_hits,
                    prefix_cache_hit_rate=(self.scheduler.prefix_hits
                                           / max(1, self.scheduler.prefix_queries)),
                    model_seconds=self.loop.model_seconds)

    # --- lifecycle -------------------------------------------------------------------------

    def terminate(self, timeout: float | None = None) -> None:
        with self._lock:
            if self.state in ("terminating", "terminated"):
                return
            self.state = "terminating"
        deadline = Deadline(self.config.terminate_timeout if timeout is None else timeout)
        start = time.perf_counter()
        self._resources.release_all(deadline)
        # if a thread missed its deadline, its consumers are still woken here
        self.registry.fail_all(EngineTerminatedError("engine terminated"))
        self.state = "terminated"
        log.debug("terminated in %.1f ms", (time.perf_counter() - start) * 1e3)
