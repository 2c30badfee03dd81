"""The quantize stage: model + Hessians -> quantized.bin, report, plots; size targeting; bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pgolf.artifact.compress import compress
from pgolf.artifact.format import deserialize
from pgolf.artifact.tensors import QuantizedTensor
from pgolf.atomic import write_json
from pgolf.config import CompressConfig, ModelConfig
from pgolf.model.files import save_model
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace
from pgolf.quant.calibrate import collect_hessians, save_hessians
from stages import quantize as stage

PIPELINE = Workspace.pipeline()  # the stage as DVC runs it

CODE_BYTES = 54_321  # what the bundle stage counted: the exported train_gpt.py's length


@pytest.fixture()
def workdir(tmp_path, monkeypatch, golden_tiny, golden_model_config) -> Path:
    monkeypatch.chdir(tmp_path)
    save_model(Path(layout.TRAIN_MODEL), golden_model_config, golden_tiny["state_dict"])
    save_hessians(Path(layout.CALIBRATE_HESSIANS), {name: entry["H"] for name, entry in golden_tiny["gptq"].items()})
    return tmp_path


def test_writes_the_reference_codes_a_report_and_plots(workdir, golden_tiny):
    stage.run({"quantize": {"passthrough_max_numel": 0}}, PIPELINE)
    qm = deserialize(Path(layout.QUANTIZE_MODEL).read_bytes())
    for name, entry in golden_tiny["gptq"].items():
        tensor = qm.tensors[name]
        assert isinstance(tensor, QuantizedTensor)
        assert (tensor.q != entry["q"]).float().mean() <= 1e-3 and torch.equal(tensor.scale, entry["scale"])
    report = json.loads(Path(layout.QUANTIZE_REPORT).read_text())
    assert report["totals"]["quantized_tensors"] == len(golden_tiny["gptq"])
    assert report["totals"]["serialized_bytes"] == Path(layout.QUANTIZE_MODEL).stat().st_size
    assert {row["name"] for row in report["tensors"]} == set(golden_tiny["state_dict"])
    with open(Path(layout.QUANTIZE_PLOTS) / "tensors.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(golden_tiny["state_dict"])
    assert (Path(layout.QUANTIZE_PLOTS) / "tensor_errors.png").read_bytes()[:4] == b"\x89PNG"
    assert not (Path(layout.QUANTIZE_PLOTS) / "fit_search.csv").exists()


def test_record_threshold_keeps_the_tiny_matrices_in_fp16(workdir, golden_tiny):
    stage.run({}, PIPELINE)
    qm = deserialize(Path(layout.QUANTIZE_MODEL).read_bytes())
    assert isinstance(qm.tensors["tok_emb.weight"], QuantizedTensor)  # 524,288 elements
    assert qm.tensors["blocks.0.mlp.fc.weight"].dtype == torch.float16  # 16,384 elements


def model_with_hessians(seed: int = 0) -> tuple[GPT, dict[str, torch.Tensor]]:
    """A random 2-layer model of width 128 whose matrices exceed the fp16 threshold when set to 0, and its Hessians."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=512, num_layers=2, model_dim=128, embedding_dim=128, num_heads=4,
                            num_kv_heads=2, rope_dims=8, xsa_last_n=2, num_loops=0, loop_start=0, loop_end=0))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batches = [torch.randint(0, 512, (2, 64)) for _ in range(2)]
    return model, collect_hessians(model, batches, "cpu", show_progress=False)


@pytest.fixture()
def small_workdir(tmp_path, monkeypatch) -> Path:
    """The random model of ``model_with_hessians`` as the train and calibrate stages' outputs."""
    monkeypatch.chdir(tmp_path)
    model, hessians = model_with_hessians()
    save_model(Path(layout.TRAIN_MODEL), model.config, model.state_dict())
    save_hessians(Path(layout.CALIBRATE_HESSIANS), hessians)
    write_json(Path(layout.BUNDLE_CODE_BYTES), {"code_bytes": CODE_BYTES})
    return tmp_path


def test_fit_to_size_picks_a_clip_that_fits_and_plots_the_search(small_workdir):
    compress_settings = {"brotli_quality": 5}
    quantize_settings = {"passthrough_max_numel": 0, "fit_margin_bytes": 1_500, "fit_tolerance": 0.2}
    code = CODE_BYTES
    stage.run({"quantize": quantize_settings | {"matrix_clip_sigmas": 30.0}}, PIPELINE)
    limit = len(compress(Path(layout.QUANTIZE_MODEL).read_bytes(), CompressConfig(**compress_settings))) + code + 2_000
    stage.run({
        "quantize": quantize_settings | {"fit_to_size": True, "matrix_clip_sigmas": 8.0},
        "compress": compress_settings | {"size_limit_bytes": limit},
    }, PIPELINE)
    fit = json.loads(Path(layout.QUANTIZE_REPORT).read_text())["fit"]
    assert fit["size_limit_bytes"] == limit and 8.0 < fit["matrix_clip_sigmas"] < 30.0
    raw = Path(layout.QUANTIZE_MODEL).read_bytes()  # the written model is the one that fits
    assert len(compress(raw, CompressConfig(**compress_settings))) + code == fit["total_bytes"] <= limit
    with open(Path(layout.QUANTIZE_PLOTS) / "fit_search.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == fit["evaluations"] >= 3 and rows[0]["fits"] == "False"  # 8.0 was over the limit
    assert (Path(layout.QUANTIZE_PLOTS) / "fit_search.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_to_size_reports_an_impossible_limit(small_workdir, capsys):
    argv = ["--set", "quantize.fit_to_size=true", "--set", "compress.size_limit_bytes=1000",
            "--set", "compress.brotli_quality=1",
            "--set", "quantize.fit_max_clip_sigmas=20"]
    (small_workdir / "params.yaml").write_text("quantize: {passthrough_max_numel: 0}\n")
    assert stage.main(argv) == 2
    err = capsys.readouterr().err
    assert "even fit_max_clip_sigmas=20 gives" in err and "over the limit of 1,000" in err
    assert not Path(layout.QUANTIZE_MODEL).exists()


def test_bad_or_mismatched_hessians_are_clear_errors(workdir, capsys, golden_tiny):
    (workdir / "params.yaml").write_text("quantize: {}\n")
    hessians = {name: entry["H"] for name, entry in golden_tiny["gptq"].items() if name != "tok_emb.weight"}
    save_hessians(Path(layout.CALIBRATE_HESSIANS), hessians)
    assert stage.main([]) == 2
    assert "out/calibrate/hessians.pt against out/train/model.pt" in capsys.readouterr().err
    save_hessians(Path(layout.CALIBRATE_HESSIANS), hessians | {"tok_emb.weight": torch.eye(32)})
    assert stage.main([]) == 2
    assert "tok_emb.weight: Hessian shape (32, 32), expected (64, 64)" in capsys.readouterr().err
    Path(layout.CALIBRATE_HESSIANS).write_bytes(b"\x00garbage")
    assert stage.main([]) == 2
    assert "hessians.pt: not a readable Hessians file" in capsys.readouterr().err
    assert not Path(layout.QUANTIZE_MODEL).exists() and not Path(layout.QUANTIZE_REPORT).exists()
