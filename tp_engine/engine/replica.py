"""One worker group of an engine and what serves it alone: the block manager of its KV cache,
its scheduler and its request loop. An engine holds `data_parallel_size` of them behind one
registry and one stream-back thread. A new request goes to the live replica with the most
free room and stays there: its samples too, so that they share its prompt's blocks.

Free room is a replica's KV blocks less the claims of the sequences it holds, a claim being
the blocks a sequence may take at its full length (prompt and max_tokens). Claims are added
under the engine's lock when a request is placed and released by the request loop when the
sequence ends, so a burst of requests (one `generate` call) spreads at once, before any
scheduler has seen one of them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tp_engine.config import EngineConfig
from tp_engine.engine.block_manager import BlockManager
from tp_engine.engine.request_loop import RequestLoop
from tp_engine.engine.scheduler import Scheduler, Sequence
from tp_engine.engine.stream_back import StreamBack
from tp_engine.engine.worker_group import WorkerGroup
from tp_engine.errors import EngineError

log = logging.getLogger("tp_engine.engine")


@dataclass(eq=False)
class Replica:
    index: int
    group: WorkerGroup
    blocks: BlockManager
    scheduler: Scheduler
    loop: RequestLoop
    placed: int = 0  # the claims of every sequence placed here (under the engine's lock)
    failure: EngineError | None = None  # set when its group failed for good

    @classmethod
    def serve(cls, group: WorkerGroup, config: EngineConfig, stream_back: StreamBack,
              on_failure: Callable[[Replica, EngineError], None]) -> Replica:
        """The replica of a READY group: its block manager, scheduler and request loop (not
        started yet)."""
        blocks = BlockManager(group.ready[0].num_kv_blocks, config.block_size,
                              caching=config.enable_prefix_caching)
        log.info("KV cache: %d blocks of %d tokens a rank%s (%s)", blocks.num_blocks,
                 config.block_size, group.where, config.kv_cache_sizing)
        scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens,
                              config.max_model_len, config.decode_steps,
                              config.decode_run_seconds)
        replica = cls(group.replica, group, blocks, scheduler, None)
        replica.loop = RequestLoop(group, scheduler, stream_back, config.max_model_len,
                                   lambda error: on_failure(replica, error),
                                   config.max_restarts, config.step_timeout)
        return replica

    @property
    def room(self) -> int:
        return self.blocks.num_blocks - (self.placed - self.loop.released)

    def place(self, seqs: list[Sequence], max_model_len: int) -> None:
        for seq in seqs:
            total = min(seq.prompt_len + seq.max_tokens, max_model_len)
            seq.claim = self.blocks.blocks_for(total)
            self.placed += seq.claim


def choose(replicas: list[Replica]) -> Replica | None:
    """The live replica with the most free room (the first of equals); None if none lives."""
    live = [r for r in replicas if r.failure is None]
    return max(live, key=lambda r: r.room) if live else None


def replica_stats(replicas: list[Replica]) -> dict[str, float]:
    """The engine's figures for metrics, summed over its replicas."""
    total = {name: sum(getattr(r.scheduler, name) for r in replicas) for name in
             ("num_preemptions", "prefix_queries", "prefix_hits")}
    blocks = sum(r.blocks.num_blocks for r in replicas)
    free = sum(r.blocks.num_free for r in replicas)
    return dict(running=sum(len(r.scheduler.running) for r in replicas),
                waiting=sum(len(r.scheduler.waiting) for r in replicas),
                kv_blocks=blocks, kv_blocks_free=free, kv_usage=1.0 - free / blocks,
                preemptions=total["num_preemptions"],
                steps=sum(r.loop.steps for r in replicas),
                replicas=len(replicas),
                replicas_failed=sum(r.failure is not None for r in replicas),
                prefix_cache_queries=total["prefix_queries"],
                prefix_cache_hits=total["prefix_hits"],
                prefix_cache_hit_rate=total["prefix_hits"] / max(1, total["prefix_queries"]),
                model_seconds=sum(r.loop.model_seconds for r in replicas))
