"""The calibrate stage: trained model + training shards -> Hessians file, and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import CalibrateConfig, ModelConfig, section
from pgolf.data.shards import dataset_path, shard_name, write_shard
from pgolf.data.tokenizer import tokenizer_file
from pgolf.model.files import build_model, save_model
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace
from pgolf.quant.calibrate import calibration_batches, collect_hessians
from pgolf.quant.hessians import load_hessians
from stages import calibrate as stage
from tests.conftest import write_manifest

PIPELINE = Workspace.pipeline()  # the stage as DVC runs it

CONFIG = ModelConfig(vocab_size=256, num_layers=3, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                     rope_dims=8, xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1)
PARAMS = {
    "calibrate": {"calibration_batches": 3, "calibration_batch_tokens": 128, "seq_len": 32, "seed": 7, "device": "cpu"},
    "tokenize": {"data_dir": "data"},
}


def write_random_dataset(vocab_size: int) -> None:
    """Random train and validation shards under ``data/``, a stand-in tokenizer and their manifest."""
    shards = dataset_path("data", vocab_size)
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(2):
        write_shard(shards / shard_name("train", index), rng.integers(0, vocab_size, 1_000, dtype=np.uint16))
    write_shard(shards / shard_name("val", 0), rng.integers(0, vocab_size, 100, dtype=np.uint16))
    tokenizer = tokenizer_file("data", vocab_size)
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_bytes(b"stands in for the tokenizer: calibration reads only its hash from the manifest")
    write_manifest(shards, vocab_size, tokenizer)


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_model(Path(layout.TRAIN_MODEL), CONFIG, GPT(CONFIG).state_dict())
    write_random_dataset(CONFIG.vocab_size)
    return tmp_path


def test_writes_the_hessians_of_the_drawn_batches(workdir):
    stage.run(PARAMS, PIPELINE)
    hessians = load_hessians(Path(layout.CALIBRATE_HESSIANS))
    model = build_model(Path(layout.TRAIN_MODEL))
    files = sorted(dataset_path("data", CONFIG.vocab_size).glob("fineweb_train_*.bin"))
    cfg = section(PARAMS, "calibrate", CalibrateConfig)
    batches = calibration_batches(files, cfg)
    assert len(batches) == 3 and batches[0].shape == (4, 32)
    expected = collect_hessians(model, batches, "cpu", show_progress=False)
    assert hessians.keys() == expected.keys()
    assert {"tok_emb.weight", "blocks.1.attn.c_q.weight", "blocks.2.mlp.proj.weight"} <= hessians.keys()
    for name in expected:
        torch.testing.assert_close(hessians[name], expected[name])


def test_bad_settings_and_missing_inputs_are_named(workdir, capsys):
    (workdir / "params.yaml").write_text("tokenize: {}\ncalibrate: {calibration_batch_tokens: 100, seq_len: 32, device: cpu}\n")
    assert stage.main([]) == 2
    assert "calibrate.calibration_batch_tokens: 100 is not allowed: must be a multiple of seq_len (32)" in (
        capsys.readouterr().err
    )
    (workdir / "params.yaml").write_text("tokenize: {}\ncalibrate: {calibration_batch_tokens: 96, seq_len: 32, device: cpu}\n")
    Path(layout.TRAIN_MODEL).unlink()
    assert stage.main([]) == 2
    assert "out/train/model.pt: model file not found" in capsys.readouterr().err
    assert not Path(layout.CALIBRATE_HESSIANS).exists()
