"""A run of decode steps that a worker computes back to back from one message.

When every sequence of a step decodes and nobody waits to be admitted, the request loop asks
for several steps at once, and the worker feeds each step's sampled tokens straight into the
next. The controller's work (scheduling, the messages both ways, the hand-off to the
stream-back thread) is then paid once per run instead of once per token, and the worker does
no per-step Python over the batch: every step's positions, cache slots and attention groups
are slices of tensors built once, here.

Sequence i runs steps[i] steps (fewer than the others when it reaches max_tokens first). The
sequences come longest run first, so the ones still running at a step are a prefix of the
batch, and a step computes only that prefix, reading only the blocks its positions reach."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tp_engine.model.attention import AttentionMetadata
from tp_engine.model.attention_groups import (
    DecodeGroup,
    causal_mask,
    decode_groups,
    long_tensor,
    tables_tensor,
)

# the masks of a whole run are built at once when they take at most this many elements (8 MB
# of float32: a CPU batch of 64 at 1,000 tokens of context); past it, each step builds its own
MAX_RUN_MASK_ELEMENTS = 2 << 20


@dataclass
class DecodeRun:
    positions: list[torch.Tensor]  # each step's query position of every sequence
    slots: list[torch.Tensor]      # each step's cache slot of every sequence
    running: list[int]             # sequences still running at each step (a prefix)
    ran: torch.Tensor              # [n, steps]: whether sequence i runs step j
    last: torch.Tensor             # [n]: the index of each sequence's last step
    groups: list[DecodeGroup]
    widths: list[list[int]]        # the blocks each group reads at each step (0: none running)
    # each group's mask at each step, [kv_heads * n, 1, context] as the score matmul takes it
    masks: list[list[torch.Tensor] | None]
    block_size: int
    kv_heads: int
    _cuts: dict = field(default_factory=dict)  # (group index, running, width) -> its cut

    @classmethod
    def build(cls, starts: list[int], steps: list[int], block_tables: list[list[int]],
              block_size: int, sliding_window: int | None, kv_heads: int,
              dtype: torch.dtype, device: torch.device | str = "cpu") -> DecodeRun:
        """`steps` must not increase along the batch."""
        bs, n = block_size, len(starts)
        lasts = [s + k - 1 for s, k in zip(starts, steps)]
        tables = tables_tensor(block_tables, max(lasts) // bs + 1)
        groups = decode_groups(list(range(n)), None, starts, block_tables, bs, sliding_window,
                               device, lasts, tables)
        step = torch.arange(max(steps))[:, None]
        count = long_tensor(steps)
        running = step < count  # [steps, n]
        # past its last step a sequence stays at its last position: it is not computed, but
        # its slot must still lie inside its table
        positions = long_tensor(starts) + torch.minimum(step, count - 1)
        slots = tables.gather(1, (positions // bs).T).T * bs + positions % bs
        reach = torch.where(running, positions, -1)
        widths = [((reach if g.rows is None else reach[:, g.rows.cpu()]).amax(dim=1) // bs
                   + 1).tolist() for g in groups]
        positions = positions.to(device)
        # a step costs a dozen small tensor ops: building every step's masks in one go, in
        # the layout the score matmul takes, saves six of them a step
        masks = [_masks(positions if g.rows is None else positions[:, g.rows], w, bs,
                        sliding_window, kv_heads, dtype)
                 if len(steps) * kv_heads * g.tables.numel() * bs <= MAX_RUN_MASK_ELEMENTS
                 else None for g, w in zip(groups, widths)]
        return cls(list(positions.unbind(0)), list(slots.to(device).unbind(0)),
                   running.sum(dim=1).tolist(), running.T.to(device), (count - 1).to(device),
                   groups, widths, masks, bs, kv_heads)

    def __len__(self) -> int:
        return len(self.running)

    def by_sequence(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From each step's tokens ([steps, n]; a sequence's entries past its last step are
        never read): every sequence's tokens, sequence by sequence, and each one's last."""
        per_seq = sampled.T
        return per_seq[self.ran], per_seq.gather(1, self.last[:, None]).squeeze(1)

    def metadata(self, step: int) -> AttentionMetadata:
        n = self.running[step]
        positions, slots = self.positions[step], self.slots[step]
        if n < positions.shape[0]:
            positions, slots = positions[:n], slots[:n]
        decode = []
        for index, (group, widths) in enumerate(zip(self.groups, self.widths)):
            if widths[step]:
                cut, keep = self._cut(index, group, n, widths[step])
                group = cut.at(positions if cut.rows is None else positions[cut.rows])
                masks = self.masks[index]
                if masks is not None:
                    mask = masks[step]
                    if keep is not None:  # some of the group ended: drop their rows
                        context = mask.shape[-1]
                        mask = mask.view(self.kv_heads, -1, context)[:, keep]
                        mask = mask.reshape(-1, 1, context)
                    group.set_bias(mask)
                decode.append(group)
        return AttentionMetadata(positions, slots, self.block_size, decode, [])

    def _cut(self, index: int, group: DecodeGroup, n: int,
             width: int) -> tuple[DecodeGroup, slice | torch.Tensor | None]:
        """`group` cut to its members among the first n sequences and to its first `width`
        blocks, and which of its members those are (None: all); kept, since it serves until
        a sequence ends or a block fills."""
        key = (index, n, width)
        if key not in self._cuts:
            members = group.tables.shape[0]
            if group.rows is None:
                keep = slice(0, n) if n < members else None
                cut = DecodeGroup(group.tables[:n, :width].contiguous(), window=group.window,
                                  shared=min(group.shared, width))
            else:
                kept = group.rows < n
                keep = kept if not bool(kept.all()) else None
                cut = DecodeGroup(group.tables[kept, :width].contiguous(),
                                  rows=group.rows[kept], window=group.window,
                                  shared=min(group.shared, width))
            self._cuts[key] = (cut, keep)
        return self._cuts[key]


def _masks(positions: torch.Tensor, widths: list[int], block_size: int,
           sliding_window: int | None, kv_heads: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each step's mask, [kv_heads * n, 1, context] for the step's width, from each sequence's
    position at every step ([steps, n]); the steps of one width are built together."""
    masks: list[torch.Tensor] = [None] * len(widths)  # type: ignore[list-item]
    for width in set(widths) - {0}:
        at = [i for i, w in enumerate(widths) if w == width]
        mask = causal_mask(positions[at], width * block_size, sliding_window).to(dtype)
        steps, n, context = mask.shape
        mask = mask.unsqueeze(1).expand(steps, kv_heads, n, context)
        for i, one in zip(at, mask.reshape(steps, kv_heads * n, 1, context).unbind(0)):
            masks[i] = one
    return masks
