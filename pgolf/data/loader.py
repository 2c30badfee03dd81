"""Training batches whose order depends on the seed and the step, not on the process count.

The reference's sampler (docs/DESIGN.md §3) cuts every shard into
sequences at a random phase, takes each shard's sequences in random order and
draws shards in proportion to what they have left; but every rank reads its
own shards with its own generator, so the data changes with the GPU count.
Here one pass over all shards (an epoch) is planned globally from
``(seed, epoch)``: the same phases and per-shard orders, and a uniformly random
interleaving of the shards' sequences, which is exactly what drawing a shard in
proportion to its remaining sequences produces. Sequence ``k`` of the run is
then a pure function of ``(seed, k)``; step ``s`` takes the next
``grad_accum_steps`` micro-batches and rank ``r`` of ``W`` the ``r``-th
contiguous slice of them, so the global batch is the same for any ``W`` and a
resumed run needs nothing but the step.

The variants' loaders (``train.loader``) keep that contract. PR #576's sequential
loader reads the shards as one stream, each micro-batch the next
``B * T + 1`` tokens (its own order on any GPU count whose product with the
accumulation steps is 8). PR #1218's coprime-stride loader (docs/VARIANTS.md §6) draws
one step's windows at a time from a generator; here a step's windows are drawn as
its 8-GPU run draws them (mixing bounds for 8 ranks, one draw per step) and
micro-batch ``m`` of the step takes windows ``m::grad_accum_steps``, which is rank
``m``'s share in a run on ``grad_accum_steps`` GPUs (the PR's: 8 GPUs, one
micro-batch each), so any process count sees the same data.

PR #1855's document-packing loader (``packed``, docs/FRONTIER.md) reads the shards in order
with no randomness: each micro-batch is one row of ``B * T`` tokens (plus one target) with the
``cu_seqlens`` of its documents, cut into segments of at most ``T``. Spans are taken in groups
of ``packed_ranks`` (the PR's GPU count): a group starts at a shard's first BOS or right after
the previous group, and a shard whose rest cannot hold a whole group is left for the next. The
PR grouped by its process count, so its data changed with it; here the group is a setting, and
each step takes the same spans on any process count (rank ``r`` of ``W`` gets span
``k W + r`` of its ``k``-th local micro-batch, as in the PR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pgolf.data.packing import build_cu_seqlens
from pgolf.data.shards import BOS_ID, read_shard

MicroBatch = tuple[Tensor, Tensor]  # inputs [B, T], targets [B, T], int64
PackedMicroBatch = tuple[Tensor, Tensor, Tensor]  # inputs [1, L], targets [1, L] int64, cu_seqlens [S] int32


@dataclass(frozen=True)
class EpochPlan:
    """One pass over every shard: the shard and start token of each sequence, in order."""

    shard: np.ndarray  # [N] int32
    start: np.ndarray  # [N] int64


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, epoch]))


def _phases(rng: np.random.Generator, num_tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """A random cut offset per shard, below ``seq_len`` and leaving one full sequence."""
    max_phase = np.minimum(seq_len - 1, np.maximum(0, num_tokens - seq_len - 1))  # [S]
    return rng.integers(max_phase + 1)  # [S]


def _sequence_counts(num_tokens: np.ndarray, phases: np.ndarray, seq_len: int) -> np.ndarray:
    # Each sequence needs seq_len + 1 tokens (inputs and shifted targets).
    return np.maximum(0, (num_tokens - 1 - phases) // seq_len)  # [S]


def epoch_length(num_tokens: np.ndarray, seq_len: int, seed: int, epoch: int) -> int:
    """How many sequences epoch ``epoch`` has (it depends on that epoch's phases)."""
    phases = _phases(_epoch_rng(seed, epoch), num_tokens, seq_len)
    return int(_sequence_counts(num_tokens, phases, seq_len).sum())


def plan_epoch(num_tokens: np.ndarray, seq_len: int, seed: int, epoch: int) -> EpochPlan:
    """The sequence order of one epoch, drawn from ``(seed, epoch)`` alone."""
    rng = _epoch_rng(seed, epoch)
    phases = _phases(rng, num_tokens, seq_len)  # [S]; drawn first, as in epoch_length
    counts = _sequence_counts(num_tokens, phases, seq_len)  # [S]
    shard = rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int32), counts))  # [N]
    start = np.empty(len(shard), dtype=np.int64)  # [N]
    slots_by_shard = np.argsort(shard, kind="stable")  # [N]: shard 0's slots, shard 1's, ...
    offset = 0
    for index, count in enumerate(counts):
        order = rng.permutation(count)  # [count]: this shard's sequences, shuffled
        start[slots_by_shard[offset:offset + count]] = phases[index] + order * seq_len
        offset += count
    return EpochPlan(shard=shard, start=start)


def micro_batch_layout(batch_tokens: int, seq_len: int, grad_accum_steps: int, world_size: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per rank), or a ValueError naming the settings."""
    sequences_per_step, rest = divmod(batch_tokens, seq_len)
    if rest or sequences_per_step % grad_accum_steps:
        raise ValueError(
            f"train_batch_tokens={batch_tokens} must be a multiple of "
            f"grad_accum_steps * train_seq_len = {grad_accum_steps} * {seq_len}")
    if grad_accum_steps % world_size:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be divisible by the "
                         f"process count {world_size}")
    return sequences_per_step // grad_accum_steps, grad_accum_steps // world_size


class ShardSource:
    """What every loader shares: the shards, the batch layout and this rank's place in it."""

    def __init__(self, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                 grad_accum_steps: int, rank: int = 0, world_size: int = 1):
        if not files:
            raise FileNotFoundError("no training shards given")
        self.micro_batch_size, self.local_micro_batches = micro_batch_layout(
            batch_tokens, seq_len, grad_accum_steps, world_size)
        self.files = [Path(f) for f in files]
        self.tokens = [read_shard(f) for f in self.files]  # memory-mapped uint16
        self.num_tokens = np.array([len(t) for t in self.tokens], dtype=np.int64)  # [S]
        self.seq_len, self.seed = seq_len, seed
        self.grad_accum_steps = grad_accum_steps
        self.rank, self.world_size = rank, world_size

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This rank's slice of the global micro-batches of ``step``."""
        first = step * self.grad_accum_steps + self.rank * self.local_micro_batches
        return [self.micro_batch(first + i) for i in range(self.local_micro_batches)]

    def micro_batch(self, index: int) -> MicroBatch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the order depends on besides the step (checked again on resume)."""
        return {
            "loader": type(self).__name__,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "shards": [f.name for f in self.files],
            "num_tokens": self.num_tokens.tolist(),
        }

    def check_state(self, state: dict, source: str) -> None:
        """Refuse to resume on other data or another batch layout than the checkpoint's."""
        mine = self.state_dict()
        changed = sorted(key for key in mine if state.get(key) != mine[key])
        if changed:
            raise ValueError(f"{source}: the training data or batch layout changed since this checkpoint "
                             f"({', '.join(changed)} differ); delete it to start afresh")


def windows_to_batch(windows: np.ndarray) -> MicroBatch:
    windows = torch.from_numpy(windows.astype(np.int64))  # [B, T + 1]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # [B, T], [B, T]


class TrainLoader(ShardSource):
    """The training micro-batches of one rank, for any step, from the train shards."""

    def __init__(self, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                 grad_accum_steps: int, rank: int = 0, world_size: int = 1):
        super().__init__(files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size)
        if epoch_length(self.num_tokens, seq_len, seed, 0) == 0:
            raise ValueError(f"the training shards hold no sequence of {seq_len} + 1 tokens")
        self._epoch_starts = [0]  # global index of each epoch's first sequence, grown on demand
        self._plan_cache: tuple[int, EpochPlan] | None = None

    def micro_batch(self, index: int) -> MicroBatch:
        """Global micro-batch ``index``: sequences ``index * B`` to ``(index + 1) * B - 1``."""
        first = index * self.micro_batch_size
        return windows_to_batch(np.stack([self._window(k) for k in range(first, first + self.micro_batch_size)]))

    def _window(self, k: int) -> np.ndarray:
        epoch, offset = self._locate(k)
        plan = self._plan(epoch)
        start = plan.start[offset]
        return self.tokens[plan.shard[offset]][start:start + self.seq_len + 1].astype(np.int64)  # [T+1]

    def _locate(self, k: int) -> tuple[int, int]:
        while self._epoch_starts[-1] <= k:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(
                self._epoch_starts[-1] + epoch_length(self.num_tokens, self.seq_len, self.seed, epoch))
        epoch = int(np.searchsorted(self._epoch_starts, k, side="right")) - 1
        return epoch, k - self._epoch_starts[epoch]

    def _plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, plan_epoch(self.num_tokens, self.seq_len, self.seed, epoch))
        return self._plan_cache[1]

    def state_dict(self) -> dict:
        state = super().state_dict()
        del state["loader"]  # the record's checkpoints predate the loader choice
        return state


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


LOADERS = {"shuffled": TrainLoader, "sequential": SequentialLoader, "coprime": CoprimeLoader,
           "packed": PackedLoader}


def make_loader(kind: str, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                grad_accum_steps: int, rank: int = 0, world_size: int = 1, packed_ranks: int = 8) -> ShardSource:
    """The ``train.loader`` named ``kind`` (shuffled | sequential | coprime | packed)."""
    if kind not in LOADERS:
        raise ValueError(f"train.loader must be one of {', '.join(LOADERS)}, got {kind!r}")
    if kind == "packed":
        return PackedLoader(files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size, packed_ranks)
    return LOADERS[kind](files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size)
