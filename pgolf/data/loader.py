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

The variants' loaders (``train.loader``) keep that contract, each in its own module, which
:func:`make_loader` imports only when it is chosen (so a submission's script ships its own loader
alone): PR #576's sequential stream (:mod:`pgolf.data.sequential`), PR #1218's coprime-stride
sampler (:mod:`pgolf.data.coprime`) and PR #1855's document packing (:mod:`pgolf.data.packed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pgolf.data.shards import read_shard

MicroBatch = tuple[Tensor, Tensor]  # inputs [B, T], targets [B, T], int64


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


LOADER_KINDS = ("shuffled", "sequential", "coprime", "packed")  # train.loader's values


def loader_class(kind: str) -> type[ShardSource]:
    """The loader ``train.loader`` names; a variant's module is imported here, only when it is the one chosen."""
    if kind == "shuffled":
        return TrainLoader
    if kind == "sequential":
        from pgolf.data.sequential import SequentialLoader
        return SequentialLoader
    if kind == "coprime":
        from pgolf.data.coprime import CoprimeLoader
        return CoprimeLoader
    if kind == "packed":
        from pgolf.data.packed import PackedLoader
        return PackedLoader
    raise ValueError(f"train.loader must be one of {', '.join(LOADER_KINDS)}, got {kind!r}")


def make_loader(kind: str, files: list[Path], seq_len: int, seed: int, batch_tokens: int,
                grad_accum_steps: int, rank: int = 0, world_size: int = 1, packed_ranks: int = 8) -> ShardSource:
    """The ``train.loader`` named ``kind`` (shuffled | sequential | coprime | packed)."""
    grouping = {"packed_ranks": packed_ranks} if kind == "packed" else {}
    return loader_class(kind)(files, seq_len, seed, batch_tokens, grad_accum_steps, rank, world_size, **grouping)
