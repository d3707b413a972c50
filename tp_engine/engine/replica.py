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

from dataclasses import dataclass

from tp_engine.engine.block_manager import BlockManager
from tp_engine.engine.request_loop import RequestLoop
from tp_engine.engine.scheduler import Scheduler, Sequence
from tp_engine.engine.worker_group import WorkerGroup
from tp_engine.errors import EngineError


@dataclass(eq=False)
class Replica:
    index: int
    group: WorkerGroup
    blocks: BlockManager
    scheduler: Scheduler
    loop: RequestLoop
    placed: int = 0  # the claims of every sequence placed here (under the engine's lock)
    failure: EngineError | None = None  # set when its group failed for good

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
