"""PR #1855's document-packing loader (``train.loader: packed``, docs/FRONTIER.md).

It reads the shards in order with no randomness: each micro-batch is one row of ``B * T`` tokens
(plus one target) with the ``cu_seqlens`` of its documents, cut into segments of at most ``T``.
Spans are taken in groups of ``packed_ranks`` (the PR's GPU count): a group starts at a shard's
first BOS or right after the previous group, and a shard whose rest cannot hold a whole group is
left for the next. The PR grouped by its process count, so its data changed with it; here the
group is a setting, and each step takes the same spans on any process count (rank ``r`` of ``W``
gets span ``k W + r`` of its ``k``-th local micro-batch, as in the PR).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pgolf.data.loader import ShardSource
from pgolf.data.packing import build_cu_seqlens
from pgolf.data.shards import BOS_ID

PackedMicroBatch = tuple[Tensor, Tensor, Tensor]  # inputs [1, L], targets [1, L] int64, cu_seqlens [S] int32


def first_bos(tokens: np.ndarray, block: int = 1 << 20) -> int | None:
    """The offset of the first BOS in a shard (read block by block: shards are 100 M tokens), or None."""
    for offset in range(0, len(tokens), block):
        found = np.flatnonzero(np.asarray(tokens[offset:offset + block]) == BOS_ID)
        if len(found):
            return offset + int(found[0])
    return None


class PackedLoader(ShardSource):
    """PR #1855's BOS-aligned sequential packing: micro-batch j is span j of the grouped stream."""

    def __init__(self, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                 grad_accum_steps: int, rank: int = 0, world_size: int = 1, packed_ranks: int = 8):
        super().__init__(files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size)
        self.row_tokens = self.micro_batch_size * seq_len  # L: one packed row per micro-batch
        self.packed_ranks = packed_ranks
        self.span = self.row_tokens + 1  # inputs plus the last target
        starts = [first_bos(tokens) for tokens in self.tokens]
        empty = [f.name for f, start in zip(self.files, starts) if start is None]
        if empty:
            raise ValueError(f"the packed loader starts every shard at a BOS (id {BOS_ID}); "
                             f"{', '.join(empty)} holds none")
        self.first_bos = np.array(starts, dtype=np.int64)  # [S]
        group = packed_ranks * self.span
        self.groups = (self.num_tokens - self.first_bos) // group  # [S]: whole groups each shard holds
        if not self.groups.sum():
            raise ValueError(f"no training shard holds {packed_ranks} spans of {self.span} tokens after its "
                             f"first BOS (train_batch_tokens / grad_accum_steps + 1 each)")
        self.group_ends = np.cumsum(self.groups)  # [S]

    def micro_batches(self, step: int) -> list[PackedMicroBatch]:
        """This rank's micro-batches of ``step``: the PR's interleaving of ranks within each group of spans."""
        first = step * self.local_micro_batches
        return [self.micro_batch((first + m) * self.world_size + self.rank) for m in range(self.local_micro_batches)]

    def micro_batch(self, index: int) -> PackedMicroBatch:
        """Span ``index`` of the stream (looping over the shards): one row and its segments."""
        group, member = divmod(index, self.packed_ranks)
        group %= int(self.group_ends[-1])
        shard = int(np.searchsorted(self.group_ends, group, side="right"))
        in_shard = group - (int(self.group_ends[shard]) - int(self.groups[shard]))
        start = int(self.first_bos[shard]) + (in_shard * self.packed_ranks + member) * self.span
        span = torch.from_numpy(np.asarray(self.tokens[shard][start:start + self.span], dtype=np.int64))  # [L + 1]
        doc_starts = (span[:-1] == BOS_ID).nonzero().flatten().tolist()
        cu_seqlens, _ = build_cu_seqlens(doc_starts, self.row_tokens, self.seq_len)
        return span[None, :-1].contiguous(), span[None, 1:].contiguous(), cu_seqlens

    def state_dict(self) -> dict:
        return super().state_dict() | {"packed_ranks": self.packed_ranks}
