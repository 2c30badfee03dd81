"""The evaluate stage: the true round trip, its metrics, its switches and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.atomic import write_bytes
from pgolf.checkpoint import build_model, save_model
from pgolf.codec import QuantizedModel, QuantizedTensor, compress, dequantize, serialize
from pgolf.config import CompressConfig, ModelConfig
from pgolf.evaluate import eval_plain, eval_sliding
from pgolf.model import GPT
from pgolf.shards import load_validation_tokens
from pgolf.tokenizer import byte_tables
from stages import evaluate as stage

CPU = torch.device("cpu")
SEQ_LEN, STRIDE, BATCH, MAX_TOKENS = 64, 16, 16, 2048
VAL_TARGETS = (MAX_TOKENS - 1) // SEQ_LEN * SEQ_LEN  # 1984: max_val_tokens cut to whole windows
MODEL = ModelConfig(num_layers=2, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                    rope_train_seq_len=64, xsa_last_n=2, num_loops=1, loop_start=0, loop_end=1)


def trained_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(MODEL)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))  # no zero-initialised projections
    return model.state_dict()


def round_to_nearest(state: dict[str, torch.Tensor]) -> QuantizedModel:
    """A plain round-to-nearest int6/int8 quantization (GPTQ is not what this test is about)."""
    tensors: dict[str, QuantizedTensor | torch.Tensor] = {}
    for name, weight in state.items():
        if weight.dim() != 2 or weight.numel() <= 1024:
            tensors[name] = weight.half()
            continue
        bits = 8 if name == "tok_emb.weight" else 6
        qmax = 2 ** (bits - 1) - 1
        scale = (weight.abs().amax(dim=1) / qmax).clamp_min(1e-8).half()  # [rows]
        q = (weight / scale.float()[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
        tensors[name] = QuantizedTensor(q, scale, bits, 0.0)
    return QuantizedModel(model_config=MODEL, tensors=tensors)


@pytest.fixture()
def workdir(tmp_path, monkeypatch, shared_dir) -> Path:
    data = tmp_path / "data"
    (data / "datasets" / "fineweb10B_sp8192").mkdir(parents=True)
    (data / "tokenizers").mkdir()
    shutil.copy(shared_dir / "fineweb" / "fineweb10B_sp8192" / "fineweb_val_000000.bin",
                data / "datasets" / "fineweb10B_sp8192")
    shutil.copy(shared_dir / "tokenizers" / "fineweb_8192_bpe.model", data / "tokenizers")
    monkeypatch.chdir(tmp_path)
    state = trained_weights()
    save_model(stage.TRAINED_MODEL_PATH, MODEL, state)
    write_bytes(stage.ARTIFACT_PATH, compress(serialize(round_to_nearest(state)), CompressConfig(brotli_quality=5)))
    return tmp_path


def params(**evaluate) -> dict:
    base = {"eval_seq_len": SEQ_LEN, "eval_stride": STRIDE, "eval_batch_seqs": BATCH,
            "max_val_tokens": MAX_TOKENS, "device": "cpu"}
    return {"evaluate": base | evaluate}


def scores_of(model: GPT) -> dict[str, float]:
    """Plain and sliding scores of ``model`` (looping on) on the stage's validation tokens."""
    model.looping_active = True
    tokens = load_validation_tokens("data/datasets/fineweb10B_sp8192", SEQ_LEN)[: VAL_TARGETS + 1]  # [1985]
    tables = byte_tables("data/tokenizers/fineweb_8192_bpe.model", 8192)
    plain = eval_plain(model, tokens, tables, SEQ_LEN, BATCH, CPU)
    sliding = eval_sliding(model, tokens, tables, SEQ_LEN, STRIDE, BATCH, CPU)
    return {"val_loss": plain.loss, "val_bpb": plain.bpb,
            "sliding_val_loss": sliding.loss, "sliding_val_bpb": sliding.bpb}


def test_artifact_scores_exactly_as_the_weights_before_serialization(workdir):
    stage.run(params())
    metrics = json.loads(stage.METRICS_PATH.read_text())
    before = GPT(MODEL)
    before.load_state_dict(dequantize(round_to_nearest(trained_weights())))
    assert metrics["quantized"] == scores_of(before)  # exact: the round trip loses nothing


def test_metrics_hold_both_models_the_tax_and_the_size(workdir):
    stage.run(params())
    metrics = json.loads(stage.METRICS_PATH.read_text())
    assert metrics["unquantized"] == scores_of(build_model(stage.TRAINED_MODEL_PATH))
    quantized, unquantized = metrics["quantized"], metrics["unquantized"]
    assert metrics["quantization_tax"] == {
        "val_bpb": quantized["val_bpb"] - unquantized["val_bpb"],
        "sliding_val_bpb": quantized["sliding_val_bpb"] - unquantized["sliding_val_bpb"],
    }
    assert quantized["val_bpb"] != unquantized["val_bpb"]
    assert metrics["artifact_bytes"] == stage.ARTIFACT_PATH.stat().st_size
    assert metrics["val_tokens"] == VAL_TARGETS


def test_each_evaluation_can_be_switched_off(workdir):
    stage.TRAINED_MODEL_PATH.unlink()  # not needed when the unquantized model is not scored
    stage.run(params(eval_sliding=False, eval_unquantized=False))
    metrics = json.loads(stage.METRICS_PATH.read_text())
    assert set(metrics) == {"artifact_bytes", "val_tokens", "quantized"}
    assert set(metrics["quantized"]) == {"val_loss", "val_bpb"}
    stage.run(params(eval_plain=False, eval_unquantized=False))
    assert set(json.loads(stage.METRICS_PATH.read_text())["quantized"]) == {
        "sliding_val_loss", "sliding_val_bpb"}
    with pytest.raises(ValueError, match="both false"):
        stage.run(params(eval_plain=False, eval_sliding=False))


def test_corrupt_artifact_fails_cleanly(workdir, capsys):
    blob = stage.ARTIFACT_PATH.read_bytes()
    stage.ARTIFACT_PATH.write_bytes(blob[: len(blob) // 2])
    assert stage.main(["--params", str(write_params(params()))]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not stage.METRICS_PATH.exists()


def test_missing_inputs_are_named(workdir):
    stage.ARTIFACT_PATH.unlink()
    with pytest.raises(FileNotFoundError, match="run the compress stage"):
        stage.run(params())


def test_unquantized_model_of_another_shape_is_refused(workdir):
    other = dataclasses.replace(MODEL, num_layers=3, xsa_last_n=3)
    save_model(stage.TRAINED_MODEL_PATH, other, GPT(other).state_dict())
    with pytest.raises(ValueError, match="different model configs"):
        stage.run(params(eval_sliding=False))


def write_params(values: dict) -> Path:
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_two_processes_score_as_one(workdir):
    stage.run(params())
    single = json.loads(stage.METRICS_PATH.read_text())
    stage.METRICS_PATH.unlink()
    (workdir / "params.yaml").write_text(yaml.safe_dump(params(nproc_per_node=2)))
    # `pgolf evaluate` starts torchrun itself when nproc_per_node > 1 (gloo on the CPU)
    done = subprocess.run([sys.executable, "-m", "pgolf.cli", "evaluate"], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads(stage.METRICS_PATH.read_text())
    for model in ("quantized", "unquantized"):
        for key, value in single[model].items():
            assert double[model][key] == pytest.approx(value, rel=1e-9), f"{model}.{key}"
