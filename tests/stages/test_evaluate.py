"""The evaluate stage: the true round trip, its metrics, its switches and its errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.artifact.compress import compress
from pgolf.artifact.format import serialize
from pgolf.artifact.tensors import QuantizedModel, QuantizedTensor, dequantize
from pgolf.atomic import write_bytes
from pgolf.config import CompressConfig, ModelConfig
from pgolf.data.accounting import lookup_stream
from pgolf.data.shards import load_validation_tokens, read_header
from pgolf.data.tokenizer import byte_tables
from pgolf.eval.bpb import eval_plain, eval_sliding
from pgolf.model.files import build_model, save_model
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.lineage import declared_keys, digest, resolved
from pgolf.pipeline.stage import Workspace
from stages import evaluate as stage
from stages import prequant as prequant_stage
from tests.conftest import write_manifest

PIPELINE = Workspace.pipeline()  # the stage as DVC runs it

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
    shutil.copy(shared_dir / "fineweb" / "fineweb10B_sp8192" / "fineweb_train_000000.bin",
                data / "datasets" / "fineweb10B_sp8192")
    write_manifest(data / "datasets" / "fineweb10B_sp8192", 8192, data / "tokenizers" / "fineweb_8192_bpe.model")
    monkeypatch.chdir(tmp_path)
    state = trained_weights()
    save_model(Path(layout.TRAIN_MODEL), MODEL, state)
    write_bytes(Path(layout.COMPRESS_ARTIFACT), compress(serialize(round_to_nearest(state)), CompressConfig(brotli_quality=5)))
    return tmp_path


def params(**evaluate) -> dict:
    base = {"eval_seq_len": SEQ_LEN, "eval_stride": STRIDE, "eval_batch_seqs": BATCH,
            "max_val_tokens": MAX_TOKENS, "device": "cpu"}
    return {"tokenize": {}, "evaluate": base | evaluate}


def scores_of(model: GPT) -> dict[str, float]:
    """Plain and sliding scores of ``model`` (looping on) on the stage's validation tokens."""
    model.looping_active = True
    tokens = load_validation_tokens("data/datasets/fineweb10B_sp8192", SEQ_LEN)[: VAL_TARGETS + 1]  # [1985]
    tables = byte_tables("data/tokenizers/fineweb_8192_bpe.model", 8192)
    plain = eval_plain(model, lookup_stream(tokens, tables), SEQ_LEN, BATCH, CPU)
    sliding = eval_sliding(model, lookup_stream(tokens, tables), SEQ_LEN, STRIDE, BATCH, CPU)
    return {"val_loss": plain.loss, "val_bpb": plain.bpb,
            "sliding_val_loss": sliding.loss, "sliding_val_bpb": sliding.bpb}


def test_artifact_scores_exactly_as_the_weights_before_serialization(workdir):
    stage.run(params(), PIPELINE)
    metrics = json.loads(Path(layout.EVALUATE_METRICS).read_text())
    before = GPT(MODEL)
    before.load_state_dict(dequantize(round_to_nearest(trained_weights())))
    assert metrics["quantized"] == scores_of(before)  # exact: the round trip loses nothing


def test_prequant_scores_the_trained_weights_and_evaluate_adds_the_tax(workdir):
    prequant_stage.run(params(), PIPELINE)
    prequant = json.loads(Path(layout.PREQUANT_METRICS).read_text())
    assert prequant["unquantized"] == scores_of(build_model(Path(layout.TRAIN_MODEL)))
    stage.run(params(), PIPELINE)
    metrics = json.loads(Path(layout.EVALUATE_METRICS).read_text())
    quantized, unquantized = metrics["quantized"], prequant["unquantized"]
    assert metrics["quantization_tax"] == {
        "val_bpb": quantized["val_bpb"] - unquantized["val_bpb"],
        "sliding_val_bpb": quantized["sliding_val_bpb"] - unquantized["sliding_val_bpb"],
    }
    assert quantized["val_bpb"] != unquantized["val_bpb"]
    assert metrics["artifact_bytes"] == Path(layout.COMPRESS_ARTIFACT).stat().st_size
    assert metrics["val_tokens"] == prequant["val_tokens"] == VAL_TARGETS
    # each score says what it covers and what it was computed with: both alike, so one digest
    split = read_header(Path("data/datasets/fineweb10B_sp8192") / "fineweb_val_000000.bin") - 1
    assert (metrics["targets"], metrics["split_targets"]) == (prequant["targets"], prequant["split_targets"]) == (
        VAL_TARGETS, split)
    assert metrics["params_digest"] == prequant["params_digest"] == digest(resolved(declared_keys("evaluate"),
                                                                                    params()))
    assert metrics["val_bytes"] == prequant["val_bytes"] == lookup_stream(
        load_validation_tokens("data/datasets/fineweb10B_sp8192", SEQ_LEN)[: VAL_TARGETS + 1],
        byte_tables("data/tokenizers/fineweb_8192_bpe.model", 8192)).total_bytes()


def test_no_tax_against_scores_that_divided_by_other_bytes(workdir, capsys):
    prequant_stage.run(params(), PIPELINE)
    prequant = json.loads(Path(layout.PREQUANT_METRICS).read_text())
    Path(layout.PREQUANT_METRICS).write_text(json.dumps(prequant | {"val_bytes": prequant["val_bytes"] + 1}))
    stage.run(params(), PIPELINE)
    assert "quantization_tax" not in json.loads(Path(layout.EVALUATE_METRICS).read_text())
    assert f"divided by {prequant['val_bytes'] + 1} validation bytes" in capsys.readouterr().out


def test_each_evaluation_can_be_switched_off(workdir):
    Path(layout.TRAIN_MODEL).unlink()  # the artifact is scored alone
    stage.run(params(eval_sliding=False), PIPELINE)
    metrics = json.loads(Path(layout.EVALUATE_METRICS).read_text())
    assert set(metrics) == {"artifact_bytes", "val_tokens", "val_bytes", "quantized",  # no prequant scores: no tax
                            "params_digest", "targets", "split_targets"}
    assert set(metrics["quantized"]) == {"val_loss", "val_bpb"}
    stage.run(params(eval_plain=False), PIPELINE)
    assert set(json.loads(Path(layout.EVALUATE_METRICS).read_text())["quantized"]) == {
        "sliding_val_loss", "sliding_val_bpb"}
    with pytest.raises(ValueError, match="both false"):
        stage.run(params(eval_plain=False, eval_sliding=False), PIPELINE)


def test_corrupt_artifact_fails_cleanly(workdir, capsys):
    blob = Path(layout.COMPRESS_ARTIFACT).read_bytes()
    Path(layout.COMPRESS_ARTIFACT).write_bytes(blob[: len(blob) // 2])
    assert stage.main(["--params", str(write_params(params()))]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not Path(layout.EVALUATE_METRICS).exists()


def test_missing_inputs_are_named(workdir):
    Path(layout.COMPRESS_ARTIFACT).unlink()
    with pytest.raises(FileNotFoundError, match="run the compress stage"):
        stage.run(params(), PIPELINE)


def write_params(values: dict) -> Path:
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_two_processes_score_as_one(workdir):
    stage.run(params(), PIPELINE)
    single = json.loads(Path(layout.EVALUATE_METRICS).read_text())
    Path(layout.EVALUATE_METRICS).unlink()
    (workdir / "params.yaml").write_text(yaml.safe_dump(params(nproc_per_node=2)))
    # `pgolf evaluate` starts torchrun itself when nproc_per_node > 1 (gloo on the CPU)
    done = subprocess.run([sys.executable, "-m", "pgolf.cli", "evaluate"], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads(Path(layout.EVALUATE_METRICS).read_text())
    for key, value in single["quantized"].items():
        assert double["quantized"][key] == pytest.approx(value, rel=1e-9), key
