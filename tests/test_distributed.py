"""N processes under torchrun train the same model as one process accumulating the same batch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pgolf.config import ModelConfig, TrainConfig
from pgolf.data.shards import write_shard
from pgolf.distributed import any_rank, init_distributed, under_torchrun
from pgolf.model.files import load_model
from tests.conftest import write_manifest

MODEL = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                    rope_dims=8, rope_train_seq_len=16, xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1)
TRAIN = TrainConfig(iterations=4, max_wallclock_seconds=0, warmup_steps=1, train_batch_tokens=4 * 4 * 16,
                    train_seq_len=16, grad_accum_steps=4, muon_momentum_warmup_steps=2, device="cpu",
                    compile=False, train_log_every=1)


def test_single_process_context_without_torchrun():
    ctx = init_distributed("cpu", environ={})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert any_rank(True, ctx) and not any_rank(False, ctx)
    assert under_torchrun({"RANK": "0", "WORLD_SIZE": "2"}) and not under_torchrun({})


def run_stage(workdir, nproc: int) -> subprocess.CompletedProcess:
    params = {"tokenize": {}, "model": dataclasses.asdict(MODEL),
              "train": dataclasses.asdict(dataclasses.replace(TRAIN, nproc_per_node=nproc))}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "stages.train"]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    tokens = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0))
    # one validation document that is not in the training data (training refuses a leak)
    val = torch.cat([torch.tensor([1]), torch.randint(2, 64, (199,), generator=torch.Generator().manual_seed(1))])
    for nproc in (1, 2):
        dataset = tmp_path / str(nproc) / "data" / "datasets" / "fineweb10B_sp64"
        dataset.mkdir(parents=True)
        write_shard(dataset / "fineweb_train_000000.bin", tokens)
        write_shard(dataset / "fineweb_val_000000.bin", val)
        tokenizer = tmp_path / str(nproc) / "data" / "tokenizers" / "fineweb_64_bpe.model"
        tokenizer.parent.mkdir(parents=True)
        tokenizer.write_bytes(b"stands in for the tokenizer: training reads only its hash from the manifest")
        write_manifest(dataset, 64, tokenizer)
        done = run_stage(tmp_path / str(nproc), nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "2" / "out" / "train" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == TRAIN.iterations
    _, single = load_model(tmp_path / "1" / "out" / "train" / "model.pt")
    _, double = load_model(tmp_path / "2" / "out" / "train" / "model.pt")
    # Same data, same order; only the float summation order of the gradients differs.
    for name, weights in single.items():
        torch.testing.assert_close(double[name], weights, rtol=1e-4, atol=1e-5, msg=name)
