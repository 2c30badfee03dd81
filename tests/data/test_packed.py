"""PR #1855's document-packing loader and cu_seqlens against the batches its own code drew.

``golden_frontier_tiny.pt`` (README "Frontier record"): the record's ``DocumentPackingLoader`` on
11 shards of 1,500 tokens, one process (``loader.world1``: 10 micro-batches of 512 tokens) and two
(``loader.world2``: 6 per rank), and ``_build_cu_seqlens`` on fixed inputs. All exact.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.config import ConfigError, TrainConfig
from pgolf.data.loader import make_loader
from pgolf.data.packed import PackedLoader
from pgolf.data.packing import build_cu_seqlens, row_cu_seqlens
from pgolf.data.shards import write_shard
from tests.conftest import SHARED_DIR, _load, _require

GOLDEN = SHARED_DIR / "golden" / "golden_frontier_tiny.pt"


@pytest.fixture(scope="module")
def golden() -> dict:
    return _load(_require(GOLDEN))["loader"]


@pytest.fixture
def shards(golden, tmp_path) -> list:
    files = []
    for name, tokens in zip(golden["train_shard_names"], golden["train_shards"]):
        write_shard(tmp_path / name, tokens.numpy())
        files.append(tmp_path / name)
    return files


def record_loader(files, golden: dict, world: str, rank: int = 0) -> PackedLoader:
    """The record's layout: 4,096 tokens a step, 8 micro-batches over all ranks, segments of 128."""
    args = golden[f"{world}_args"]
    world_size = args.get("world_size", 1)
    return make_loader("packed", files, 128, 0, args["global_tokens"], 8, rank, world_size, packed_ranks=world_size)


def assert_batch(batch, expected: dict) -> None:
    inputs, targets, cu_seqlens = batch
    assert torch.equal(inputs, expected["x"].long())
    assert torch.equal(targets, expected["y"].long())
    assert torch.equal(cu_seqlens, expected["cu_seqlens"])


def test_one_process_batches_are_the_records(golden, shards):
    loader = record_loader(shards, golden, "world1")
    batches = [b for step in range(2) for b in loader.micro_batches(step)][:10]  # 8 micro-batches a step
    for batch, expected in zip(batches, golden["world1"], strict=True):
        assert_batch(batch, expected)


def test_two_process_batches_are_the_records(golden, shards):
    for rank, expected_batches in enumerate(golden["world2"]):
        loader = record_loader(shards, golden, "world2", rank)
        batches = [b for step in range(2) for b in loader.micro_batches(step)][:6]  # 4 micro-batches a step
        for batch, expected in zip(batches, expected_batches, strict=True):
            assert_batch(batch, expected)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_step_holds_the_same_spans_on_any_process_count(shards, world_size):
    """packed_ranks fixes the grouping, so the step's rows are the same set whatever the process count."""
    def step_rows(world: int, step: int) -> list[list[int]]:
        loaders = [make_loader("packed", shards, 128, 0, 4096, 8, rank, world, packed_ranks=2) for rank in range(world)]
        return sorted(x[0].tolist() for loader in loaders for x, _, _ in loader.micro_batches(step))

    for step in range(3):
        assert step_rows(world_size, step) == step_rows(8, step)


def test_the_stream_is_the_same_for_every_seed(shards):
    one, other = (make_loader("packed", shards, 128, seed, 4096, 8, packed_ranks=1) for seed in (0, 1234))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one.micro_batches(3), other.micro_batches(3)))


def test_build_cu_seqlens_is_the_records(golden):
    for case in golden["build_cu_seqlens"]:
        cu_seqlens, longest = build_cu_seqlens(list(case["bos_pos"]), case["total_len"], case["max_doc_len"],
                                               case["bucket_size"])
        assert torch.equal(cu_seqlens, case["cu_seqlens"]) and longest == case["max_seqlen"]


def test_spec_example_segments():
    """PR #1855's packing: BOS at {0, 100, 5000} in 8,192 tokens, segments of at most 2,048, 64 entries."""
    row = torch.full((8192,), 7)
    row[[0, 100, 5000]] = 1
    cu_seqlens = row_cu_seqlens(row, 2048)
    assert cu_seqlens[:7].tolist() == [0, 100, 2148, 4196, 5000, 7048, 8192]
    assert cu_seqlens.numel() == 64 and set(cu_seqlens[7:].tolist()) == {8192}


def test_a_shard_without_a_bos_is_refused(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [5] * 3000)
    with pytest.raises(ValueError, match="fineweb_train_000000.bin holds none"):
        make_loader("packed", [tmp_path / "fineweb_train_000000.bin"], 128, 0, 4096, 8)


def test_packed_is_a_loader_choice():
    assert TrainConfig(loader="packed").packed_ranks == 8
    with pytest.raises(ConfigError, match="packed_ranks"):
        TrainConfig(loader="packed", packed_ranks=0)
