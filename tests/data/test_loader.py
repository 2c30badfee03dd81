"""The training sampler: same global batches for any process count, seeded, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.loader import TrainLoader, epoch_length, plan_epoch
from pgolf.data.shards import write_shard

SEQ = 16


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for index, size in enumerate([3001, 1003, 517]):
        path = tmp_path / f"fineweb_train_{index:06d}.bin"
        write_shard(path, rng.integers(0, 1000, size))
        paths.append(path)
    return paths


def loader(shards, **kwargs):
    args = dict(seq_len=SEQ, seed=7, batch_tokens=8 * 4 * SEQ, grad_accum_steps=8) | kwargs
    return TrainLoader(shards, **args)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_global_batch_does_not_depend_on_process_count(shards, world_size):
    single = loader(shards)
    ranks = [loader(shards, rank=r, world_size=world_size) for r in range(world_size)]
    for step in (0, 3, 40):  # 40 is past the first epoch (~280 sequences, 32 a step)
        expected = single.micro_batches(step)
        got = [batch for rank in ranks for batch in rank.micro_batches(step)]
        assert len(got) == len(expected) == 8
        for (x1, y1), (x2, y2) in zip(expected, got):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_order_is_a_function_of_seed_and_step(shards):
    a, b = loader(shards), loader(shards)
    b.micro_batches(9)  # touching other steps first changes nothing
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a.micro_batches(5), b.micro_batches(5)))
    other = loader(shards, seed=8)
    assert not torch.equal(a.micro_batches(5)[0][0], other.micro_batches(5)[0][0])
    assert not torch.equal(a.micro_batches(5)[0][0], a.micro_batches(6)[0][0])


def test_sequences_are_shard_windows_with_shifted_targets(shards):
    tokens = [np.fromfile(p, dtype="<u2", offset=1024).astype(np.int64) for p in shards]
    x, y = loader(shards).micro_batch(3)
    assert x.shape == y.shape == (4, SEQ) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row_x, row_y[-1:]])
        assert any(
            np.array_equal(t[s:s + SEQ + 1], window) for t in tokens for s in range(len(t) - SEQ)
        )


def test_an_epoch_takes_every_sequence_once_in_proportion(shards):
    num_tokens = np.array([3001, 1003, 517])
    plan = plan_epoch(num_tokens, SEQ, seed=3, epoch=0)
    assert len(plan.start) == epoch_length(num_tokens, SEQ, seed=3, epoch=0)
    for shard, n in enumerate(num_tokens):
        starts = np.sort(plan.start[plan.shard == shard])
        phase = starts[0]
        assert 0 <= phase < SEQ and starts[-1] + SEQ + 1 <= n
        assert np.array_equal(starts, phase + SEQ * np.arange(len(starts)))  # all of them, once
        assert len(starts) == (n - 1 - phase) // SEQ
    # Shards are drawn in proportion to what they have left: the big shard leads every part.
    first_half = plan.shard[: len(plan.shard) // 2]
    share = np.mean(first_half == 0)
    assert abs(share - np.mean(plan.shard == 0)) < 0.1
    assert not np.array_equal(plan.start, plan_epoch(num_tokens, SEQ, seed=3, epoch=1).start)


def test_state_is_checked_on_resume(shards):
    state = loader(shards).state_dict()
    loader(shards).check_state(state, "ckpt")
    with pytest.raises(ValueError, match="seed"):
        loader(shards, seed=99).check_state(state, "ckpt")


def test_bad_layouts_are_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="multiple of"):
        loader(shards, batch_tokens=8 * 4 * SEQ + 1)
    with pytest.raises(ValueError, match="divisible by the process count 3"):
        loader(shards, world_size=3)
    with pytest.raises(FileNotFoundError):
        loader([])
    short = tmp_path / "short.bin"
    write_shard(short, [1, 2, 3])
    with pytest.raises(ValueError, match="no sequence"):
        loader([short])
