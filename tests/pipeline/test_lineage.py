"""Lineage: each stage's record names its params, the files it read and wrote and the chain behind them; mixed
inputs, params that contradict the inputs' and partial params files are refused or named.

A tiny pipeline (an imported model, calibrate, quantize, compress) runs through the stages' own ``main``
in a temporary directory, as DVC runs it, then stages run by hand beside it (``--out runs``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.data.shards import file_sha256
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.lineage import MixedInputs, check_baked, consistent_set, declared_keys, digest, resolved
from stages import calibrate, compress, import_model, quantize
from tests.stages.test_calibrate import CONFIG, write_random_dataset

PARAMS = {
    "tokenize": {"data_dir": "data", "vocab_size": 256},
    "model": dataclasses.asdict(CONFIG),
    "calibrate": {"calibration_batches": 2, "calibration_batch_tokens": 128, "seq_len": 32, "seed": 7, "device": "cpu"},
    "quantize": {"device": "cpu", "passthrough_max_numel": 0},
    "compress": {"compressor": "lzma"},
}


def write_params(path: str, params: dict) -> str:
    Path(path).write_text(yaml.safe_dump(params))
    return path


def reference_model(path: Path, seed: int) -> str:
    """A final_model.pt of CONFIG's shape with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    torch.save(GPT(CONFIG).state_dict(), path)
    return str(path)


@pytest.fixture()
def pipeline(tmp_path, monkeypatch) -> Path:
    """import -> calibrate -> quantize -> compress, as DVC runs them (the pipeline's paths)."""
    monkeypatch.chdir(tmp_path)
    write_random_dataset(CONFIG.vocab_size)
    Path(layout.BUNDLE_CODE_BYTES).parent.mkdir(parents=True)
    Path(layout.BUNDLE_CODE_BYTES).write_text(json.dumps({"code_bytes": 1000}))
    params = write_params("params.yaml", PARAMS)
    assert import_model.main([reference_model(tmp_path / "final_model.pt", 0), "--params", params]) == 0
    for stage in (calibrate, quantize, compress):
        assert stage.main(["--params", params]) == 0, stage.__name__
    return tmp_path


def record(path: str) -> dict:
    return json.loads(Path(path).read_text())


def test_each_record_names_its_params_what_it_read_and_wrote_and_the_chain_behind(pipeline):
    made = record(layout.COMPRESS_PROVENANCE)
    assert made["params_digest"] == digest(resolved(declared_keys("compress"), PARAMS)) == digest(made["params"])
    assert set(made["params"]) == set(declared_keys("compress")) and made["params"]["compress.compressor"] == "lzma"
    lineage = made["lineage"]
    assert lineage["inputs"][layout.QUANTIZE_MODEL] == {"path": layout.QUANTIZE_MODEL,
                                                        "sha256": file_sha256(layout.QUANTIZE_MODEL)}
    assert lineage["outputs"][layout.COMPRESS_ARTIFACT] == file_sha256(layout.COMPRESS_ARTIFACT)
    assert lineage["outputs"][layout.COMPRESS_METRICS] == file_sha256(layout.COMPRESS_METRICS)
    # the chain: the model the Hessians and the quantized weights came from, and the stages that made them
    assert lineage["files"][layout.TRAIN_MODEL] == file_sha256(layout.TRAIN_MODEL)
    assert lineage["files"][layout.CALIBRATE_HESSIANS] == file_sha256(layout.CALIBRATE_HESSIANS)
    assert set(lineage["stages"]) == {"import", "calibrate", "quantize"}
    assert lineage["stages"]["import"]["params"]["model.num_layers"] == 3
    # the metrics say what they were computed with; the same params give the same digest
    assert json.loads(Path(layout.COMPRESS_METRICS).read_text())["params_digest"] == made["params_digest"]
    assert compress.main(["--params", "params.yaml"]) == 0
    assert record(layout.COMPRESS_PROVENANCE)["params_digest"] == made["params_digest"]


def test_a_hand_runs_model_with_the_pipelines_hessians_of_another_is_refused_naming_both(pipeline, monkeypatch,
                                                                                           capsys):
    monkeypatch.delenv("DVC_STAGE")
    other = reference_model(pipeline / "other_model.pt", 1)
    assert import_model.main([other, "--params", "params.yaml", "--out", "runs"]) == 0
    capsys.readouterr()
    assert quantize.main(["--params", "params.yaml", "--out", "runs"]) == 2
    error = capsys.readouterr().err
    mine, theirs = file_sha256(Path("runs") / layout.TRAIN_MODEL)[:12], file_sha256(layout.TRAIN_MODEL)[:12]
    assert f"{layout.CALIBRATE_HESSIANS} is not from the run this quantize's other inputs come from" in error
    assert (f"{layout.TRAIN_MODEL}: {mine} in runs/{layout.TRAIN_MODEL}, {theirs} in "
            f"{layout.CALIBRATE_PROVENANCE}") in error
    assert not (Path("runs") / layout.QUANTIZE_MODEL).exists()
    # the hand run's own Hessians (of its own model) make it one run again
    assert calibrate.main(["--params", "params.yaml", "--out", "runs"]) == 0
    assert quantize.main(["--params", "params.yaml", "--out", "runs"]) == 0


def test_params_that_contradict_the_inputs_model_are_refused_naming_the_keys(pipeline, capsys):
    partial = write_params("partial.yaml", {"model": {"num_layers": 12, "num_kv_heads": 1},
                                            "quantize": {"matrix_clip_sigmas": 13}})
    assert quantize.main(["--params", partial]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pgolf quantize: error: partial.yaml sets model.num_layers=12 (import used 3), but "
                            f"{layout.TRAIN_MODEL} was made otherwise")
    assert "num_kv_heads" not in error  # the same as the model's: no contradiction


def test_a_partial_params_file_is_warned_naming_the_keys_that_took_defaults(pipeline, capsys):
    partial = write_params("partial.yaml", {"quantize": {"matrix_clip_sigmas": 13}, "calibrate": {"seed": 99}})
    assert quantize.main(["--params", partial]) == 0
    error = capsys.readouterr().err
    defaulted = next(line for line in error.splitlines() if line.startswith("pgolf quantize: warning:"))
    named = dict(part.split(": ", 1) for part in defaulted.split("defaults (", 1)[1].split(")")[0].split("; "))
    assert f"partial.yaml leaves {len(declared_keys('quantize')) - 1} of the keys" in defaulted and set(named) == {"compress", "quantize"}
    assert {"method", "passthrough_max_numel"} <= set(named["quantize"].split(", "))
    assert "matrix_clip_sigmas" not in named["quantize"] and "compressor" in named["compress"]  # given: not defaulted
    # a key of an earlier stage the file sets otherwise than the inputs were made with: said, not remade
    assert (f"warning: partial.yaml sets calibrate.seed=99 (calibrate used 7), but {layout.CALIBRATE_HESSIANS} "
            "was made otherwise; this quantize does not remake it") in error


def test_one_runs_set_passes_and_a_file_of_another_run_is_refused_naming_it(pipeline):
    records = {"compress": Path(layout.COMPRESS_PROVENANCE)}
    assert consistent_set(records, Path)["compress"]["stage"] == "compress"
    Path(layout.COMPRESS_METRICS).write_text(json.dumps({"total_bytes": 1}))  # a figure no record wrote
    with pytest.raises(MixedInputs, match=rf"{layout.COMPRESS_METRICS}: \w{{12}} in {layout.COMPRESS_PROVENANCE} "
                                          rf"\(wrote it\), \w{{12}} in {layout.COMPRESS_METRICS} \(present\)"):
        consistent_set(records, Path)


def test_stages_that_ran_with_other_params_than_the_script_bakes_are_named():
    made = {"ttt": {"params_digest": "d", "params": {"ttt.lora_lr": 0.001, "tokenize.data_dir": "data"},
                    "lineage": {"stages": {"quantize": {"params_digest": "e", "params": {"quantize.matrix_clip_sigmas":
                                                                                        12.85}}}}}}
    baked = {"ttt": {"enabled": True, "lora_lr": 0.0001}, "quantize": {"matrix_clip_sigmas": 12.85}}
    with pytest.raises(ValueError, match=r"train_gpt.py does not make these figures: ttt ran with ttt.lora_lr=0.001, "
                                         r"the script bakes 0.0001: run"):
        check_baked(made, baked, Path("train_gpt.py"))
    check_baked(made, baked | {"ttt": {"enabled": True, "lora_lr": 0.001}}, Path("train_gpt.py"))
