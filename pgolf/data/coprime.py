"""PR #1218's coprime-stride loader (``train.loader: coprime``, docs/VARIANTS.md §6).

The PR draws one step's windows at a time from a generator. Here a step's windows are drawn as
its 8-GPU run draws them (mixing bounds for 8 ranks, one draw per step) and micro-batch ``m`` of
the step takes windows ``m::grad_accum_steps``, which is rank ``m``'s share in a run on
``grad_accum_steps`` GPUs (the PR's: 8 GPUs, one micro-batch each), so any process count sees
the same data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pgolf.data.loader import MicroBatch, ShardSource, windows_to_batch

# PR #1218's constants: 8-GPU mixing bounds, progress over 1800 draws, shard weights (remaining)^(0.9 - 0.4 p).
COPRIME_RANKS = 8
COPRIME_RAMP_DRAWS = 1800.0


def fnv_seed(names: list[str]) -> int:
    """PR #1218's generator seed: an FNV-style hash of the shard paths (here their names, see below)."""
    seed = 0
    for name in names:
        for byte in name.encode():
            seed = ((seed ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return seed


class CoprimeLoader(ShardSource):
    """PR #1218's coprime-stride multi-shard sampler, one draw of a step's windows per step.

    Its generator is seeded from the shard names (PR #1218 hashed the paths its glob
    returned, so its order changed with the working directory); ``train.seed`` does
    not enter it, as it did not enter the PR's. The draws are a
    sequence, so asking for an earlier step than the last replays them from the start.
    """

    def __init__(self, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                 grad_accum_steps: int, rank: int = 0, world_size: int = 1):
        super().__init__(files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size)
        self.global_sequences = self.micro_batch_size * grad_accum_steps
        block_counts = (self.num_tokens - 1) // seq_len  # [S]
        self.eligible = np.nonzero(block_counts > 0)[0]  # [E]
        if not len(self.eligible):
            raise ValueError(f"the training shards hold no sequence of {seq_len} + 1 tokens")
        self.base_blocks = block_counts[self.eligible]  # [E]
        self._restart()

    def _restart(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(fnv_seed([f.name for f in self.files])))
        count = len(self.files)
        self.phase, self.blocks, self.next = (np.zeros(count, dtype=np.int64) for _ in range(3))
        self.start, self.stride = np.zeros(count, dtype=np.int64), np.ones(count, dtype=np.int64)
        self.ready = np.zeros(count, dtype=bool)
        self.draws = 0
        self.step_windows: list[tuple[int, int]] = []

    def micro_batch(self, index: int) -> MicroBatch:
        step, slot = divmod(index, self.grad_accum_steps)
        if step < self.draws - 1:  # an earlier step than the last drawn: replay from the start
            self._restart()
        while self.draws <= step:
            self.step_windows = self._draw()
            self.draws += 1
        chosen = self.step_windows[slot::self.grad_accum_steps]  # rank `slot`'s share in the 8-GPU run
        return windows_to_batch(np.stack([
            np.asarray(self.tokens[shard][start:start + self.seq_len + 1]) for shard, start in chosen]))

    def _coprime_stride(self, blocks: int) -> int:
        if blocks <= 1:
            return 1
        while True:
            stride = int(self.rng.integers(1, blocks))
            if math.gcd(stride, blocks) == 1:
                return stride

    def _reset_cursor(self, shard: int) -> None:
        n = int(self.num_tokens[shard])
        max_phase = min(self.seq_len - 1, max(0, n - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        blocks = (n - 1 - phase) // self.seq_len
        self.phase[shard], self.blocks[shard], self.next[shard] = phase, blocks, 0
        self.start[shard] = int(self.rng.integers(blocks)) if blocks > 1 else 0
        self.stride[shard] = self._coprime_stride(blocks)
        self.ready[shard] = True

    def _take(self, shard: int, count: int) -> list[tuple[int, int]]:
        """``count`` windows of ``shard``: block (start + j * stride) mod blocks, every block once per cursor."""
        out = []
        while count > 0:
            if not self.ready[shard] or self.next[shard] >= self.blocks[shard]:
                self._reset_cursor(shard)
            blocks, first = int(self.blocks[shard]), int(self.next[shard])
            take = min(count, blocks - first)
            for j in range(first, first + take):
                block = (int(self.start[shard]) + j * int(self.stride[shard])) % blocks
                out.append((shard, int(self.phase[shard]) + block * self.seq_len))
            self.next[shard] = first + take
            count -= take
        return out

    def _draw(self) -> list[tuple[int, int]]:
        """One step's windows (docs/VARIANTS.md §6): shards drawn by remaining blocks, then interleaved at random."""
        progress = min(self.draws / COPRIME_RAMP_DRAWS, 1.0)
        remaining = np.array([float(max(int(self.blocks[s]) - int(self.next[s]), 1)) if self.ready[s]
                              else float(base) for s, base in zip(self.eligible, self.base_blocks)])  # [E]
        weights = np.power(remaining, 0.90 - 0.40 * progress)
        total = float(weights.sum())
        if not np.isfinite(total) or total <= 0.0:
            weights, total = np.ones(len(self.eligible)), float(len(self.eligible))
        probs = weights / total
        shards, sequences = len(self.eligible), self.global_sequences
        low = min(max(8, COPRIME_RANKS), shards, sequences)
        high = min(max(32, COPRIME_RANKS * 8), shards, sequences)
        mix = max(1, min(int(round(low + progress * (high - low))), shards, sequences))
        picked = self.rng.choice(shards, size=mix, replace=False, p=probs)
        chosen, chosen_probs = self.eligible[picked], probs[picked] / probs[picked].sum()
        counts = np.ones(mix, dtype=np.int64)
        if sequences > mix:
            counts += self.rng.multinomial(sequences - mix, chosen_probs).astype(np.int64)
        order = self.rng.permutation(mix)
        buckets = []
        for shard, count in zip(chosen[order].tolist(), counts[order].tolist()):
            bucket = self._take(int(shard), int(count))
            if len(bucket) > 1:
                bucket = [bucket[int(k)] for k in self.rng.permutation(len(bucket)).tolist()]
            buckets.append(bucket)
        windows: list[tuple[int, int]] = []
        active = [i for i, bucket in enumerate(buckets) if bucket]
        while active:
            still = []
            for position in self.rng.permutation(len(active)).tolist():
                bucket = buckets[active[position]]
                windows.append(bucket.pop())
                if bucket:
                    still.append(active[position])
            active = still
        return windows
