"""PR #576's sequential and PR #1218's coprime-stride loaders against their own code's batches, on any process count.

The golden batches (tools/make_golden_variants.py) are the PRs' DistributedTokenLoader
on ten small shards: #576 on one process with 8 micro-batches a step, #1218 as
its record ran (8 ranks, one micro-batch each). Ids must match exactly.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.config import ConfigError, TrainConfig, load_params
from pgolf.data.coprime import CoprimeLoader
from pgolf.data.loader import make_loader
from pgolf.data.sequential import SequentialLoader
from pgolf.data.shards import write_shard
from tests.quant.test_variant_parity import golden


def shard_dir(tmp_path, name: str):
    loader = golden(name)["loader"]
    files = []
    for shard_name, tokens in loader["shards"].items():
        write_shard(tmp_path / shard_name, tokens.numpy())
        files.append(tmp_path / shard_name)
    return loader, files


def step_inputs(kind: str, files, loader: dict, world_size: int, steps: int) -> torch.Tensor:
    """[steps, micro-batches, rows, T]: every rank's micro-batches of every step, in rank order."""
    ranks = [make_loader(kind, files, loader["seq_len"], 0, loader["batch_tokens"], 8, rank, world_size)
             for rank in range(world_size)]
    return torch.stack([torch.stack([x for r in ranks for x, _ in r.micro_batches(step)]) for step in range(steps)])


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_sequential_loader_is_pr576s_on_any_process_count(tmp_path, world_size):
    loader, files = shard_dir(tmp_path, "pr576")
    expected = loader["inputs"][:, 0]  # [steps, 8 * rows, T]: one process, 8 micro-batches
    steps = expected.size(0)
    actual = step_inputs("sequential", files, loader, world_size, steps)  # [steps, 8, rows, T]
    assert torch.equal(actual.flatten(1, 2), expected)


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_coprime_loader_is_pr1218s_eight_gpu_run_on_any_process_count(tmp_path, world_size):
    loader, files = shard_dir(tmp_path, "pr1218")
    expected = loader["inputs"]  # [steps, 8 ranks, rows, T]
    actual = step_inputs("coprime", files, loader, world_size, expected.size(0))
    assert torch.equal(actual, expected)


def test_coprime_loader_replays_an_earlier_step(tmp_path):
    loader, files = shard_dir(tmp_path, "pr1218")
    source = CoprimeLoader(files, loader["seq_len"], 0, loader["batch_tokens"], 8)
    later = [x for x, _ in source.micro_batches(2)]
    first = [x for x, _ in source.micro_batches(0)]  # behind the cursor: replayed from the start
    assert all(torch.equal(a, b) for a, b in zip(later, [x for x, _ in source.micro_batches(2)]))
    assert torch.equal(torch.stack(first), loader["inputs"][0])


def test_sequential_targets_are_inputs_shifted(tmp_path):
    loader, files = shard_dir(tmp_path, "pr576")
    x, y = SequentialLoader(files, loader["seq_len"], 0, loader["batch_tokens"], 8).micro_batch(3)
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def test_unknown_loader_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="loader: 'random' is not a choice: must be one of shuffled, coprime"):
        TrainConfig(loader="random")
    params = tmp_path / "params.yaml"
    params.write_text("train: {loader: random}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train.loader: 'random' is not a choice"):
        load_params(params)
