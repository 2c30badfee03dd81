"""The compress stage: artifact, size gate, code bytes, metrics and per-tensor sizes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.artifact.compress import decompress
from pgolf.artifact.format import serialize
from pgolf.artifact.tensors import QuantizedModel, QuantizedTensor
from pgolf.atomic import write_bytes, write_json
from pgolf.config import ModelConfig
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace
from stages import compress as stage

PIPELINE = Workspace.pipeline()  # the stage as DVC runs it

CODE_BYTES = 54_321  # what the bundle stage counted: the exported train_gpt.py's length


def quantized_model() -> QuantizedModel:
    generator = torch.Generator().manual_seed(0)
    q = (torch.randn(64, 48, generator=generator) * 2.4).round().clamp(-31, 31).to(torch.int8)
    return QuantizedModel(
        model_config=ModelConfig(vocab_size=64, num_layers=1, model_dim=48, rope_dims=6, num_loops=0),
        tensors={
            "blocks.0.mlp.fc.weight": QuantizedTensor(q, torch.rand(64, generator=generator).half(), 6, 12.85),
            "blocks.0.attn_scale": torch.ones(48, dtype=torch.float16),
        },
    )


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_bytes(Path(layout.QUANTIZE_MODEL), serialize(quantized_model()))
    write_json(Path(layout.BUNDLE_CODE_BYTES), {"code_bytes": CODE_BYTES})
    return tmp_path


def params(**compress) -> dict:
    return {"compress": {"brotli_quality": 5} | compress}


def code_size() -> int:
    """The code bytes the compress stage adds: the bundle stage's count, read from its output."""
    return CODE_BYTES


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_writes_a_loadable_artifact_and_its_metrics(workdir, compressor):
    stage.run(params(compressor=compressor), PIPELINE)
    blob = Path(layout.COMPRESS_ARTIFACT).read_bytes()
    assert decompress(blob) == Path(layout.QUANTIZE_MODEL).read_bytes()
    metrics = json.loads(Path(layout.COMPRESS_METRICS).read_text())
    assert metrics["artifact_bytes"] == len(blob)
    assert metrics["code_bytes"] == code_size()
    assert metrics["total_bytes"] == len(blob) + code_size()
    assert metrics["headroom"] == 16_000_000 - metrics["total_bytes"]


def test_writes_per_tensor_sizes_for_dvc_plots(workdir):
    stage.run(params(), PIPELINE)
    with open(Path(layout.COMPRESS_SIZES), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["tensor"] for row in rows] == list(quantized_model().tensors)
    fc = rows[0]
    assert (fc["kind"], fc["bits"], fc["numel"]) == ("quantized", "6", str(64 * 48))
    assert 0 < int(fc["compressed_bytes"]) < 64 * 48
    assert Path(layout.COMPRESS_SIZES_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_size_gate_fails_with_size_limit_and_overshoot_and_writes_nothing(workdir):
    limit = code_size() + 100
    with pytest.raises(ValueError, match=r"over the limit of [\d,]+ by [\d,]+ bytes") as failure:
        stage.run(params(size_limit_bytes=limit), PIPELINE)
    assert f"{limit:,}" in str(failure.value) and f"{code_size():,} code" in str(failure.value)
    assert not Path(layout.COMPRESS_ARTIFACT).exists()
    assert not Path(layout.COMPRESS_METRICS).exists()
    assert not list(Path("out/compress").glob(".*tmp*"))


def test_size_gate_through_the_command_line(workdir, capsys):
    Path("params.yaml").write_text(yaml.safe_dump(params(size_limit_bytes=1000)))
    assert stage.main(["--params", "params.yaml"]) == 2
    assert "submission too large" in capsys.readouterr().err
    assert not Path(layout.COMPRESS_ARTIFACT).exists()


def test_missing_code_bytes_are_named(workdir):
    Path(layout.BUNDLE_CODE_BYTES).unlink()
    with pytest.raises(FileNotFoundError, match=r"code_bytes.json: not found \(run the bundle stage first\)"):
        stage.run(params(), PIPELINE)


def test_missing_or_corrupt_input_is_a_clear_error(workdir):
    Path(layout.QUANTIZE_MODEL).write_bytes(b"garbage that is not a model")
    with pytest.raises(ValueError, match="not a serialized pgolf model"):
        stage.run(params(), PIPELINE)
    Path(layout.QUANTIZE_MODEL).unlink()
    with pytest.raises(FileNotFoundError, match="run the quantize stage"):
        stage.run(params(), PIPELINE)
    assert not Path(layout.COMPRESS_ARTIFACT).exists()
