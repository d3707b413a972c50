"""A worker's model: its shard of the weights, its KV cache, and one forward step."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tp_engine.config import EngineConfig
from tp_engine.model.attention import AttentionMetadata
from tp_engine.model.loader import DTYPES, load_model
from tp_engine.model.parallel import TensorParallel
from tp_engine.model.sampler import Sampler
from tp_engine.wire import Step
from tp_engine.worker.distributed import current_device


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallel, dtype: str):
        self.config, self.tp = config, tp
        self.device = current_device(config.device)
        self.dtype = DTYPES[dtype]
        self.model = load_model(config.model, tp, self.dtype, self.device, config.max_model_len)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.vocab_size = self.model.config.vocab_size
        self.window = self.model.config.sliding_window
        self.num_blocks = self._agree_on_blocks()
        attn = self.model.model.layers[0].self_attn
        slots = self.num_blocks * config.block_size
        self.caches = [torch.zeros(2, slots, attn.num_kv_heads, attn.head_dim, dtype=self.dtype,
                                   device=self.device)
                       for _ in range(self.model.config.num_layers)]
        self.sampler = Sampler(config.seed, self.device) if tp.rank == 0 else None

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
        else:
            budget = cfg.kv_cache_memory_gb * (1 << 30)
        # never more than every sequence at full length could use, plus a spare
        enough = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size) + 1
        blocks = torch.tensor([min(int(budget // self._bytes_per_block()), enough)],
                              device=self.device)
        if self.tp.size > 1:
            dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
        if int(blocks) < 2:
            raise MemoryError(f"rank {self.tp.rank}: no room for a KV cache "
                              f"({self._bytes_per_block()} bytes a block)")
        return int(blocks)

    def check(self, step: Step) -> None:
        """Refuse a step that would index out of range. Every rank checks the same message the
        same way, so all of them refuse it before any collective starts."""
        n = len(step.starts)
        if not (n == len(step.query_lens) == len(step.block_tables)) or n == 0:
            raise ValueError("step: starts, query_lens and block_tables differ in length")
        if len(step.token_ids) != 4 * sum(step.query_lens) or min(step.query_lens) < 1:
            raise ValueError("step: token bytes do not match query_lens")
        if max(s + q for s, q in zip(step.starts, step.query_lens)) > self.config.max_model_len:
            raise ValueError("step: a sequence runs past max_model_len")
        for table, start, qlen in zip(step.block_tables, step.starts, step.query_lens):
            if len(table) * self.config.block_size < start + qlen or min(start, qlen) < 0:
                raise ValueError("step: a block table is too short for its tokens")
            if table and (min(table) < 0 or max(table) >= self.num_blocks):
                raise ValueError("step: a block id is out of range")
        if any(not 0 <= s[0] < n for s in step.samples):
            raise ValueError("step: a sample names no sequence")

    @torch.inference_mode()
    def step(self, step: Step) -> list[int] | None:
        self.check(step)
        ids = torch.frombuffer(bytearray(step.token_ids), dtype=torch.int32)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError("step: a token id is outside the vocabulary")
        meta = AttentionMetadata.build(step.starts, step.query_lens, step.block_tables,
                                       self.config.block_size, self.window, self.device)
        hidden = self.model(ids.to(self.device, torch.long), meta.positions, self.caches, meta)
        if not step.samples:
            return None
        ends = torch.tensor(step.query_lens).cumsum(0) - 1
        rows = ends[[s[0] for s in step.samples]].to(self.device)
        logits = self.model.compute_logits(hidden[rows])
        return self.sampler(logits, step.samples) if self.sampler is not None else None
