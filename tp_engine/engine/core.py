"""The engine's core: starts the workers and the two threads, admits requests, and owns the
lifecycle. The public Engine and AsyncEngine are thin fronts on it.

With data_parallel_size > 1 there are that many worker groups, each served by its own
request loop (engine/replica); the registry, the stream-back thread and the tokenizer are
shared. A group that fails for good fails its own requests; the engine fails with the last.

terminate(): stop admitting; stop the request loops (each broadcasts SHUTDOWN to its group as
it leaves) and join them; fail what is still in flight and join the stream-back thread; reap
every group's workers (they destroy their process group before they exit); close the
sockets; remove the IPC directory. Everything is released in the reverse order of
acquisition, so a half-built engine releases what exists."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time

from tp_engine import wire
from tp_engine.config import EngineConfig
from tp_engine.engine.replica import Replica, choose, replica_stats
from tp_engine.engine.request import Registry, RequestState, SyncSink
from tp_engine.engine.resources import Deadline, Resources
from tp_engine.engine.sampling_params import SamplingParams
from tp_engine.engine.scheduler import Sequence
from tp_engine.engine.stream_back import Failure, StreamBack
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
        self.groups: list[WorkerGroup] = []
        for index in range(cfg.data_parallel_size):  # every group loads at the same time
            group_dir = os.path.join(ipc_dir, str(index))
            os.mkdir(group_dir, 0o700)
            group = group_cls(cfg, group_dir, index)
            self._resources.acquired(f"sockets of group {index}", group.close)
            self.groups.append(group)
            group.start()
        self._resources.acquired("workers", self._release_workers)
        # built while the workers load their shards
        self.tokenizer = Tokenizer.load(cfg.model)
        self.eos_token_ids = frozenset([*self.tokenizer.eos_token_ids, *model.eos_token_ids])
        deadline = Deadline(cfg.startup_timeout)
        for group in self.groups:
            group.wait_ready(deadline.left())

        self.stream_back = StreamBack(self.registry, self.abort_seq)
        self.stream_back.start()
        self._resources.acquired("stream-back thread", self._release_stream_back)
        self.replicas = [Replica.serve(group, cfg, self.stream_back, self._on_failure)
                         for group in self.groups]
        self._resources.acquired("request loops", self._release_loops)
        for replica in self.replicas:
            replica.loop.start()

    def _release_loops(self, deadline: Deadline) -> None:
        for replica in self.replicas:
            replica.loop.stop()
        for replica in self.replicas:
            if not replica.loop.join(deadline.left()):
                log.warning("request loop%s did not stop in time", replica.group.where)

    def _release_stream_back(self, deadline: Deadline) -> None:
        self.stream_back.queue.put(Failure(EngineTerminatedError("engine terminated")))
        self.stream_back.stop()
        self.stream_back.join(deadline.left())

    def _release_workers(self, deadline: Deadline) -> None:
        """SHUTDOWN to every group first, so that they all leave at once; then reap each."""
        replicas = getattr(self, "replicas", None)  # absent when a group failed to start
        for group in self.groups:
            # a live request loop owns its group's socket, and sends SHUTDOWN as it leaves
            if replicas is None or not replicas[group.replica].loop.thread.is_alive():
                group.send_shutdown()
        for group in self.groups:
            group.reap(deadline, grace=len(group.ready) == group.size)

    def _on_failure(self, replica: Replica, error: EngineError) -> None:
        """A replica's group failed for good (its request loop has ended): fail its requests;
        the engine fails with its last replica."""
        with self._lock:  # no request is placed on it from here on
            replica.failure = error
            self.stream_back.queue.put(Failure(error, replica.loop.seq_ids()))
            if all(r.failure is not None for r in self.replicas):
                self._failure = error
                if self.state == "running":
                    self.state = "failed"
        log.error("%s failed: %s", "engine" if replica.group.label is None
                  else f"replica {replica.index}", error)

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
        blocks = min((r.blocks for r in self.replicas), key=lambda b: b.num_blocks)
        if blocks.blocks_for(len(prompt_ids) + 1) > blocks.num_blocks:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens, more than the "
                                      f"KV cache holds ({blocks.num_blocks} blocks)")

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
        self._queue([made])
        return [state for state, _ in made]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams, str | None]],
                    ) -> list[list[RequestState]]:
        """Queue (prompt ids, params, prompt text) requests together, so the request loop
        admits them in one step: submitted one by one, the first would start alone, a step
        ahead of the rest, and the batch would decode at two lengths (two attention groups).
        Returns each request's samples. Raises at once (nothing queued) when one cannot be
        served."""
        made = [self._request(ids, params, None, prompt) for ids, params, prompt in requests]
        self._queue(made)
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

    def _queue(self, requests: list[list[tuple[RequestState, Sequence]]]) -> None:
        """Place each request (its samples together) on a replica, and queue them all."""
        with self._lock:  # terminate() flips the state under this lock: nothing slips past
            self._check_serving()
            placed: dict[int, list[Sequence]] = {}
            for samples in requests:
                replica = choose(self.replicas)
                seqs = [seq for _, seq in samples]
                replica.place(seqs, self.config.max_model_len)
                placed.setdefault(replica.index, []).extend(seqs)
                for state, _ in samples:
                    self.registry.add(state)
            for index, seqs in placed.items():  # each loop admits its share in one step
                self.replicas[index].loop.add(seqs)

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
            for replica in self.replicas:  # only the one holding it has it: the rest ignore it
                replica.loop.abort(seq_id)

    @property
    def restarts(self) -> int:
        return sum(r.loop.restarts for r in getattr(self, "replicas", []))

    @property
    def restarting(self) -> bool:
        return any(r.loop.restarting for r in self.replicas)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for group in self.groups for p in group.procs]

    def stats(self) -> dict[str, float]:
        """A snapshot for metrics, summed over the replicas: read without locks, so each
        figure is at most a step old."""
        return dict(replica_stats(self.replicas), in_flight=len(self.registry),
                    restarts=self.restarts)

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
        self.registry.fail(EngineTerminatedError("engine terminated"))
        self.state = "terminated"
        log.debug("terminated in %.1f ms", (time.perf_counter() - start) * 1e3)
