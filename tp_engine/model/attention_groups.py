"""What one step's attention needs, built once per step from the step's lists and shared by
every layer: positions, cache slots, and the sequences split into groups computed apart.

- Decodes (one new token each) are grouped by context length: a group is padded to its longest
  context, so when lengths differ widely (8 to 300 tokens, say) splitting the batch in two or
  three saves far more gather and matmul work than the few extra ops cost.
- A decode group whose sequences all begin with the same blocks (a shared system prompt or
  few-shot preamble from the prefix cache, the samples of one prompt) reads those blocks once
  for all: their keys face every query of the group in one matmul, and only each sequence's
  own blocks are gathered per sequence. At 700 tokens of context the gather was two thirds
  of a decode step of SmolLM2 (64 sequences, float32).
- Prefills (several new tokens) are grouped by query length the same way, each group one
  padded, masked SDPA: attention costs the square of the padded length, so one 160-token
  prompt beside many 10-token ones would otherwise multiply the work several times.
Plain Python over the lists is used where it beats a dozen small torch ops (~5 us each)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

# a decode group is split only when that saves this many (block x sequence) reads, about the
# cost of the extra ops of one more group in every layer (measured on 2 CPU cores, the tiny
# Llama: a second group costs 0.4 ms a step, a block read 4 us, so splitting one sequence a
# block ahead off a batch of 64 cost 0.1-0.2 ms); a prefill group when it saves this many
# padded query rows
MIN_SAVING_BLOCKS = 96
MIN_SAVING_ROWS = 256


@dataclass
class Blocks:
    """The blocks one group reads: [n, width] block ids, padded with block 0 (masked out)."""
    tables: torch.Tensor
    _rows: torch.Tensor | None = field(default=None, init=False, repr=False)
    _same_blocks: Blocks | None = field(default=None, init=False, repr=False)

    def gather(self, cache: torch.Tensor, kv_heads: int, block_size: int,
               dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every sequence, each [kv_heads, n, width * block_size, dim]: one
        row gather (memcpy per block) for keys and values of every head."""
        rows = cache.view(-1, block_size * dim)
        # the same for every layer, and every step that reads the same blocks: built once
        owner = self._same_blocks or self
        if owner._rows is None:
            per_part = rows.shape[0] // (2 * kv_heads)  # blocks per (key or value, head)
            offsets = torch.arange(2 * kv_heads, device=rows.device).view(-1, 1) * per_part
            owner._rows = (self.tables.view(1, -1) + offsets).view(-1)
        out = rows.index_select(0, owner._rows).view(2, kv_heads, self.tables.shape[0], -1, dim)
        return out[0], out[1]


@dataclass
class DecodeGroup(Blocks):
    positions: torch.Tensor | None = None  # [n]: each query's position (its context - 1)
    rows: torch.Tensor | None = None  # [n]: the group's rows among the step's tokens (None: all)
    window: int | None = None
    shared: int = 0  # leading blocks every member's table holds, all before every query
    _bias3: torch.Tensor | None = field(default=None, init=False, repr=False)
    _parts: tuple[Blocks, Blocks] | None = field(default=None, init=False, repr=False)

    def gather_parts(self, cache: torch.Tensor, kv_heads: int, block_size: int, dim: int,
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                tuple[torch.Tensor, torch.Tensor]]:
        """With shared blocks: their keys and values once, [kv_heads, 1, shared context,
        dim], and each member's own after them, [kv_heads, n, own context, dim]."""
        owner = self._same_blocks or self
        if owner._parts is None:
            owner._parts = (Blocks(self.tables[:1, :self.shared].contiguous()),
                            Blocks(self.tables[:, self.shared:].contiguous()))
        shared, own = owner._parts
        return (shared.gather(cache, kv_heads, block_size, dim),
                own.gather(cache, kv_heads, block_size, dim))

    def bias_for(self, kv_heads: int, dtype: torch.dtype, context: int) -> torch.Tensor:
        """0 where a key may be seen, -inf where not, as [kv_heads * n, 1, context]: the batch
        layout of the score matmul. Built by the first layer, from the positions."""
        if self._bias3 is None:
            bias = causal_mask(self.positions, context, self.window).to(dtype)
            self._bias3 = bias.expand(kv_heads, *bias.shape).reshape(-1, 1, context)
        return self._bias3

    def set_bias(self, bias3: torch.Tensor) -> None:
        """A mask already in bias_for's layout (built for a whole run of decode steps)."""
        self._bias3 = bias3

    def at(self, positions: torch.Tensor) -> DecodeGroup:
        """The same sequences and blocks, queried at other positions (a later decode step)."""
        group = DecodeGroup(self.tables, positions, self.rows, self.window, self.shared)
        group._same_blocks = self._same_blocks or self
        return group


def causal_mask(positions: torch.Tensor, context: int, window: int | None) -> torch.Tensor:
    """[..., context]: 0 where a query at `positions` [...] may see a key, -inf where not."""
    pos = positions[..., None]
    k_pos = torch.arange(context, device=pos.device)
    allowed = k_pos <= pos
    if window is not None:
        allowed &= k_pos > pos - window
    return torch.where(allowed, 0.0, float("-inf"))


@dataclass
class PrefillGroup(Blocks):
    rows: torch.Tensor | None = None         # [tokens]: the group's rows (None: all)
    query_index: torch.Tensor | None = None  # [tokens]: each token's row in the padded [n * max_q]
    mask: torch.Tensor | None = None         # [n, 1, max_q, width * block_size], True: allowed
    max_query_len: int = 0
    starts: torch.Tensor | None = None       # [n]: the tokens before each one's new ones
    query_lens: torch.Tensor | None = None   # [n]: its new tokens
    window: int | None = None


def decode_groups(seqs: list[int], rows: list[int] | None, starts: list[int],
                  tables: list[list[int]], bs: int, window: int | None, device,
                  lasts: list[int] | None = None,
                  seq_tables: torch.Tensor | None = None) -> list[DecodeGroup]:
    """`seqs` index `starts` and `tables`; `rows` are their tokens' rows (None: seqs are rows
    0..n-1 of a decode-only step, in order). `lasts`: the last position each sequence will be
    queried at (a run of decode steps), which sets the blocks read; default `starts`.
    `seq_tables`: the tables of `seqs` as a tensor already, wide enough."""
    lasts = starts if lasts is None else lasts
    widths = [lasts[i] // bs + 1 for i in seqs]
    if seq_tables is None:
        seq_tables = tables_tensor([tables[i] for i in seqs], max(widths))
    positions = long_tensor([starts[i] for i in seqs])
    parts = _split(list(range(len(seqs))), widths, 2, MIN_SAVING_BLOCKS)
    groups = []
    for part in parts:
        width = max(widths[j] for j in part)
        if len(parts) == 1:
            group_tables, group_positions = seq_tables[:, :width], positions
        else:
            members = long_tensor(part)
            group_tables, group_positions = seq_tables[members, :width], positions[members]
        keep_rows = rows is not None or len(parts) > 1
        part_rows = [rows[j] if rows is not None else seqs[j] for j in part] if keep_rows else None
        groups.append(DecodeGroup(
            group_tables.contiguous().to(device), positions=group_positions.to(device),
            rows=None if part_rows is None else long_tensor(part_rows).to(device),
            window=window, shared=shared_blocks(group_tables, group_positions, bs, window)))
    return groups


def shared_blocks(tables: torch.Tensor, positions: torch.Tensor, bs: int,
                  window: int | None) -> int:
    """The leading blocks every row of `tables` holds, when reading them once saves enough:
    only blocks wholly before every query (so none is masked without a sliding window)."""
    n = tables.shape[0]
    limit = min(int(positions.min()) // bs, tables.shape[1]) if n > 1 else 0
    if window is not None or (n - 1) * limit < MIN_SAVING_BLOCKS:
        return 0
    head = tables[:, :limit]
    shared = int((head == head[:1]).all(dim=0).int().cumprod(dim=0).sum())
    return shared if (n - 1) * shared >= MIN_SAVING_BLOCKS else 0


def _split(members: list[int], widths: list[int], depth: int,
           min_saving: int) -> list[list[int]]:
    """Cut the members, sorted by width, where padding each side to its own longest saves the
    most; recurse on both sides while that still saves `min_saving`."""
    if depth == 0 or len(members) < 4:
        return [members]
    order = sorted(members, key=widths.__getitem__)
    n, longest = len(order), widths[order[-1]]
    best, cut = n * longest, 0
    for i in range(1, n):
        cost = i * widths[order[i - 1]] + (n - i) * longest
        if cost < best:
            best, cut = cost, i
    if n * longest - best < min_saving:
        return [members]
    return (_split(order[:cut], widths, depth - 1, min_saving)
            + _split(order[cut:], widths, depth - 1, min_saving))


def tables_tensor(block_tables: list[list[int]], width: int) -> torch.Tensor:
    """The tables cut to the blocks in use and padded with block 0 (masked out anyway)."""
    flat = array("q", bytes(8 * width * len(block_tables)))
    for row, table in enumerate(block_tables):
        at = row * width
        flat[at:at + min(len(table), width)] = array("q", table[:width])
    return torch.frombuffer(flat, dtype=torch.long).view(len(block_tables), width)


def long_tensor(values: list[int]) -> torch.Tensor:
    """torch.tensor(values) for a list of ints, in a fifth of the time."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else \
        torch.zeros(0, dtype=torch.long)


def prefill_groups(seqs: list[int], rows: list[range], mixed: bool, starts: list[int],
                   query_lens: list[int], tables: list[list[int]], bs: int,
                   window: int | None, device, ragged: bool = False) -> list[PrefillGroup]:
    """`seqs` index the step's lists and `rows[j]` are seqs[j]'s token rows; `mixed`: the
    step has decodes too, so the rows are needed even for a single group; `ragged`: one
    group, not split by length."""
    lens = [query_lens[i] for i in seqs]
    members = list(range(len(seqs)))
    parts = [members] if ragged else _split(members, lens, 2, MIN_SAVING_ROWS)
    groups = []
    for part in parts:
        keep_rows = mixed or len(parts) > 1
        part_rows = [r for j in part for r in rows[j]] if keep_rows else None
        groups.append(_prefill_group(part_rows, [starts[seqs[j]] for j in part],
                                     [lens[j] for j in part], [tables[seqs[j]] for j in part],
                                     bs, window, device))
    return groups


def _prefill_group(rows: list[int] | None, starts: list[int], query_lens: list[int],
                   block_tables: list[list[int]], bs: int, window: int | None,
                   device) -> PrefillGroup:
    n, max_q = len(query_lens), max(query_lens)
    width = -(-max(s + q for s, q in zip(starts, query_lens)) // bs)
    qlen_t = torch.tensor(query_lens)
    q_rows = torch.arange(max_q)
    valid_q = q_rows[None, :] < qlen_t[:, None]                          # [n, max_q]
    query_index = (torch.arange(n)[:, None] * max_q + q_rows[None, :])[valid_q]
    start_t = torch.tensor(starts)
    q_pos = start_t[:, None] + q_rows[None, :]                            # [n, max_q]
    k_pos = torch.arange(width * bs)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    # padding rows attend to slot 0 only, so softmax never sees an all-masked row
    mask = torch.where(valid_q[:, :, None], mask, k_pos[None, None, :] == 0)
    return PrefillGroup(tables_tensor(block_tables, width).to(device),
                        rows=None if rows is None else torch.tensor(rows, device=device),
                        query_index=query_index.to(device), mask=mask.unsqueeze(1).to(device),
                        max_query_len=max_q, starts=start_t.to(device),
                        query_lens=qlen_t.to(device), window=window)
