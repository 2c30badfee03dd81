"""PR #576's sequential loader (``train.loader: sequential``): the training shards read as one stream.

Each micro-batch is the next ``B * T + 1`` tokens of the shards taken in order (looping), so the
order is the PR's own on any GPU count whose product with the accumulation steps is 8, and, as
every loader (:mod:`pgolf.data.loader`), a pure function of the step on any process count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pgolf.data.loader import MicroBatch, ShardSource


class SequentialLoader(ShardSource):
    """PR #576's loader: the shards as one stream (looping), micro-batch g its (g+1)-th run of B*T+1 tokens."""

    def __init__(self, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                 grad_accum_steps: int, rank: int = 0, world_size: int = 1):
        super().__init__(files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size)
        self.shard_ends = np.cumsum(self.num_tokens)  # [S]: stream offset where each shard ends
        self.span = self.micro_batch_size * seq_len + 1  # each micro-batch's tokens, inputs plus one target

    def micro_batch(self, index: int) -> MicroBatch:
        tokens = self._take(index * self.span, self.span)  # [B*T + 1]
        return tokens[:-1].view(-1, self.seq_len).contiguous(), tokens[1:].view(-1, self.seq_len).contiguous()

    def _take(self, position: int, count: int) -> Tensor:
        """``count`` tokens of the looping stream from ``position`` on, across shard ends."""
        total = int(self.shard_ends[-1])
        pieces, position = [], position % total
        while count > 0:
            shard = int(np.searchsorted(self.shard_ends, position, side="right"))
            offset = position - (int(self.shard_ends[shard]) - int(self.num_tokens[shard]))
            piece = self.tokens[shard][offset:offset + count]
            pieces.append(np.asarray(piece, dtype=np.int64))
            count -= len(piece)
            position = (position + len(piece)) % total
        return torch.from_numpy(np.concatenate(pieces))
