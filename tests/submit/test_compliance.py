"""The records folder's claims from given figures: which score is the submission's, which clock each budget uses,
the declared hardware, the calibration reserve, and the ttt stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgolf.config import ExportConfig
from pgolf.fingerprint import environment
from pgolf.submit.bundle import read_bundle, script_json, script_text
from pgolf.submit.export import (
    RunRecord,
    baked_params,
    compliance,
    lrzip_needs,
    on_declared_hardware,
    ttt_record,
    write_records_folder,
)
from pgolf.submit.sections import script_params
from tests.submit.test_bundle import preset_configs
from tests.submit.test_seeds import DATA_FINGERPRINT, exported_script

QUANTIZED = {"val_bpb": 1.61, "val_loss": 4.02, "sliding_val_bpb": 1.60, "sliding_val_loss": 4.0}
TTT_METRICS = {"enabled": True, "method": "lora_doc", "val_bpb": 1.55, "val_loss": 3.9, "tokens": 4096,
               "compliance": {"score_before_update": {"holds": True, "how": "a chunk is scored before its step",
                                                      "test": "tests/eval/test_ttt.py::test_step_counts"}}}
H100 = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 8}


def measured_run(gpu: dict, training_s: float = 590.0, calibration_s: float = 11.0) -> dict:
    """final_metrics.json's figures the rules read, of a run on ``gpu``."""
    clocks = {"training_loop": 575.0, "calibration": calibration_s, "quantization": 3.0, "training_phase": training_s,
              "decompression": 1.5, "eval_sliding": 80.0, "ttt": 300.0, "evaluation_phase": 385.0}
    return {"clocks": clocks, "hardware": f"{gpu['gpu_count']}x{gpu['gpu']}", "device": gpu["device"],
            "calibration_reserve": {"calibration_s": calibration_s, "gptq_reserve_seconds": 12.0,
                                    "overran": calibration_s > 12.0, "training_data_read_until_s": 575 + calibration_s,
                                    "max_wallclock_seconds": 600.0, "past_wallclock": 575 + calibration_s > 600},
            "fingerprint": {"data": DATA_FINGERPRINT, "environment": environment(torch.device("cpu"), 8) | gpu}}


def record(tmp_path: Path, ttt: bool, measured: dict | None = None) -> RunRecord:
    script = exported_script(tmp_path / "script", ttt={"enabled": ttt, "method": "lora_doc"}).read_text()
    return RunRecord(script=script, compress={"code_bytes": len(script.encode()), "artifact_bytes": 15_000_000,
                                              "limit": 16_000_000},
                     evaluate={"quantized": QUANTIZED}, prequant={"unquantized": {"val_bpb": 1.58}},
                     train={"steps": 4900}, measured=measured, ttt=TTT_METRICS if ttt else None)


def test_a_ttt_script_claims_the_ttt_score_and_says_so(tmp_path):
    dest = tmp_path / "folder"
    info = write_records_folder(dest, record(tmp_path, ttt=True), ExportConfig(name="t", date="2026-12-01"), {})
    assert (info["val_bpb"], info["val_loss"]) == (1.55, 3.9) and info["seed_results"]["1337"]["val_bpb"] == 1.55
    assert info["score"] | {"what": ""} == {"kind": "ttt", "plain_val_bpb": 1.61, "sliding_val_bpb": 1.60,
                                            "ttt_method": "lora_doc", "ttt_val_bpb": 1.55, "what": ""}
    readme = (dest / "README.md").read_text()
    assert "| Pre-quant BPB | Post-quant BPB | Sliding BPB | **TTT BPB** |" in readme
    assert "| 1.58000 | 1.61000 | 1.60000 | **1.55000** |" in readme and "is the **TTT** score" in readme
    rule = json.loads((dest / "compliance.json").read_text())["rules"]["score_before_update"]
    assert rule["status"] == "pass" and "score-first TTT (ttt.method=lora_doc): a chunk is scored" in rule["how"]


def test_without_ttt_the_sliding_score_is_claimed(tmp_path):
    info = write_records_folder(tmp_path / "folder", record(tmp_path, ttt=False), ExportConfig(), {})
    assert info["val_bpb"] == 1.60 and info["score"]["kind"] == "sliding" and "ttt_val_bpb" not in info["score"]
    readme = (tmp_path / "folder" / "README.md").read_text()
    assert "| **Sliding BPB** | Artifact |" in readme and "is the **sliding-window** score" in readme
    assert "Not recorded" in readme and info["fingerprint"] is None  # no stage recorded one, no run was given


def test_each_budget_is_judged_by_its_clock_on_the_declared_hardware(tmp_path):
    declared = ExportConfig(hardware="8xH100 80GB SXM")
    report = compliance(record(tmp_path, ttt=True, measured=measured_run(H100)), declared)
    train, evaluation = report["rules"]["train_under_600s"], report["rules"]["eval_under_600s"]
    assert (train["status"], train["value"], evaluation["status"], evaluation["value"]) == ("pass", 590.0, "pass",
                                                                                            385.0)
    assert "clock training_phase = training_setup + training_loop + calibration + quantization + serialization + " \
           "compression" in train["how"] and "calibration 11.0 s" in train["how"]
    assert "clock evaluation_phase = decompression + eval_plain + eval_sliding + ttt" in evaluation["how"]
    assert "ttt 300.0 s" in evaluation["how"] and "test-time training" in evaluation["how"]
    clocks = report["clocks"]
    assert clocks["on_declared_hardware"] and clocks["budgets"]["evaluation"]["counts"]["ttt"]["measured_s"] == 300.0
    assert "startup" in clocks["counted_by_neither"] and "startup" not in clocks["budgets"]["training"]["counts"]
    assert report["rules"]["calibration_within_reserve"]["status"] == "pass"

    slow = compliance(record(tmp_path, ttt=True, measured=measured_run(H100, training_s=601.0, calibration_s=14.0)),
                      declared)["rules"]
    assert slow["train_under_600s"]["status"] == "fail" and slow["calibration_within_reserve"]["status"] == "fail"
    assert "training data read until 589.0 s" in slow["calibration_within_reserve"]["how"]

    elsewhere = compliance(record(tmp_path, ttt=True, measured=measured_run(
        {"device": "cuda", "gpu": "NVIDIA H200", "gpu_count": 1})), declared)["rules"]["train_under_600s"]
    assert elsewhere["status"] == "not measured" and elsewhere["value"] is None
    assert "measured 590.0 s on 1xNVIDIA H200" in elsewhere["how"] and "not the declared 8xH100 80GB SXM" in \
        elsewhere["how"]


@pytest.mark.parametrize(("declared", "gpu", "same"), [
    ("8xH100 80GB SXM", H100, True), ("8xH100 80GB SXM", H100 | {"gpu_count": 4}, False),
    ("8xH100", H100 | {"gpu": "NVIDIA A100-SXM4-80GB"}, False), ("8xH100", {"device": "cpu", "gpu": None,
                                                                           "gpu_count": 0}, False)])
def test_the_declared_hardware_is_a_gpu_count_and_model(declared, gpu, same):
    assert on_declared_hardware(declared, measured_run(gpu)) is same


def test_a_ttt_script_takes_the_ttt_stages_score_only_when_it_test_time_trained(tmp_path):
    """(That the ttt stage ran with the baked ttt: settings is the lineage's check: tests/pipeline/test_lineage.py.)"""
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(TTT_METRICS))
    baked = {"enabled": True, "method": "lora_doc", "lora_lr": 0.0001}
    assert ttt_record(baked, metrics) == TTT_METRICS
    assert ttt_record({"enabled": False}, tmp_path / "absent.json") is None  # no TTT: not read
    metrics.write_text(json.dumps({"enabled": False, "method": "sgd_all"}))
    with pytest.raises(ValueError, match="the ttt stage did not test-time train, but the script bakes ttt.enabled"):
        ttt_record(baked, metrics)


@pytest.mark.parametrize(("compressor", "compress_code", "code_compressor", "named"), [
    ("brotli", True, "brotli", []),
    ("pergroup", True, "brotli", ["compress.compressor: pergroup"]),
    ("brotli", True, "lrzip", ["compress.code_compressor: lrzip"]),
    ("brotli", False, "lrzip", []),  # the code ships as text: nothing to decode
    ("pergroup", True, "lrzip", ["compress.compressor: pergroup", "compress.code_compressor: lrzip"]),
])
def test_the_readme_asks_for_lrzip_exactly_when_the_artifact_or_the_script_needs_it(compressor, compress_code,
                                                                                     code_compressor, named):
    line = lrzip_needs({"compressor": compressor, "compress_code": compress_code, "code_compressor": code_compressor})
    assert ("apt-get install lrzip" in line) == bool(named)
    assert all(key in line for key in named)


def test_a_script_that_bakes_only_its_changed_params_reads_as_every_key():
    """``compress.bake_params: changed`` leaves the defaults out of the script; export reads every key from it, as
    its runner fills them in (and so holds the stages' params to the defaults too)."""
    configs = preset_configs("record", "compress.bake_params=changed", "evaluate.eval_stride=32")
    script = script_text(["pgolf/submit/runner.py"], script_params(configs), compressor=None)
    carried = read_bundle(script)["params"]
    assert carried["evaluate"] == {"eval_stride": 32, "nproc_per_node": 8} and carried["ttt"] == {}
    assert baked_params(script) == json.loads(script_json(configs.baked()))
