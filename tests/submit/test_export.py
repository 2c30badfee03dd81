"""From pipeline to submission: the exported train_gpt.py reproduces the pipeline's artifact and scores.

Runs the micro preset through ``dvc repro`` in a copy of the checkout (the export stage
included), then runs the exported ``train_gpt.py`` with ``python`` in an empty folder that
holds only the challenge's data layout, and compares artifact bytes, metrics and code
bytes with the pipeline's; the run logs every phase's clock and its fingerprint, and the
records folder says which clock each budget uses and carries the fingerprint.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from pgolf.artifact.size import SizeLimitError, pack_artifact
from pgolf.clocks import PHASES, clock_line
from pgolf.config import CompressConfig
from pgolf.data.shards import file_sha256
from pgolf.submit.bundle import read_bundle, shipped_files
from tests.pipeline.test_dvc import micro_repo, pgolf, run  # noqa: F401 (micro_repo: a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(micro_repo) -> Path:
    """The micro preset run through every stage by ``dvc repro``, export included."""
    assert "Running stage 'export'" in run(["dvc", "repro"], micro_repo)
    return micro_repo


@pytest.fixture(scope="module")
def submission_run(pipeline, tmp_path_factory) -> tuple[Path, str]:
    """The exported script run by ``python train_gpt.py`` in a folder with nothing but the data."""
    folder = tmp_path_factory.mktemp("submission")
    (folder / "data" / "tokenizers").mkdir(parents=True)
    shutil.copytree(pipeline / "data" / "datasets" / "fineweb10B_sp1024", folder / "data" / "datasets" / "fineweb10B_sp1024")
    shutil.copy(pipeline / "data" / "tokenizers" / "fineweb_1024_bpe.model", folder / "data" / "tokenizers")
    shutil.copy(pipeline / "out" / "export" / "train_gpt.py", folder)
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_STAGE", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-X", "importtime", "train_gpt.py"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, result.stdout + result.stderr


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "out" / stage / "metrics.json").read_text())


def assert_every_clock(final: dict, log: str, ttt: bool) -> None:
    """Every phase of pgolf.clocks (TTT's only with TTT) in final_metrics.json and as its log line, same figure."""
    expected = set(PHASES) - (set() if ttt else {"ttt"})
    assert set(final["clocks"]) == expected
    for name, seconds in final["clocks"].items():
        assert f"{clock_line(name, seconds)}\n" in log, name
    clocks = final["clocks"]
    assert final["training_phase_s"] == clocks["training_phase"] >= clocks["training_loop"] + clocks["calibration"]
    assert final["evaluation_phase_s"] == clocks["evaluation_phase"] >= clocks["decompression"] + clocks["eval_sliding"]
    assert clocks["whole_process"] > clocks["training_phase"] + clocks["evaluation_phase"] + clocks["startup"]


def test_the_exported_script_makes_the_pipelines_artifact_and_scores(pipeline, submission_run):
    folder, log = submission_run
    assert (folder / "final_model.ptz").read_bytes() == (pipeline / "out" / "compress" / "artifact.ptz").read_bytes()
    final = json.loads((folder / "final_metrics.json").read_text())
    assert final["quantized"] == metrics(pipeline, "evaluate")["quantized"]
    assert final["unquantized"]["val_bpb"] == metrics(pipeline, "prequant")["unquantized"]["val_bpb"]
    assert final["train"]["train_loss"] == metrics(pipeline, "train")["train_loss"]
    sliding = final["quantized"]["sliding_val_bpb"]
    assert re.search(rf"^quantized_sliding_window val_loss:\S+ val_bpb:{sliding:.8f} eval_time:\d+ms$", log, re.M)
    assert re.search(rf"^quantized val_loss:\S+ val_bpb:{final['quantized']['val_bpb']:.8f} ", log, re.M)
    assert f"Total submission size quantized+brotli: {final['total_bytes']} bytes" in log
    # without TTT the submission's score is the sliding one, and the log's last score line says so
    assert (final["val_bpb"], final["val_loss"], final["score"]) == (
        sliding, final["quantized"]["sliding_val_loss"], "quantized_sliding_window")
    assert re.search(rf"^submission val_loss:{final['val_loss']:.8f} val_bpb:{sliding:.8f} "
                     r"score:quantized_sliding_window$", log, re.M)


def test_the_exported_scripts_run_logs_every_clock_and_its_fingerprint(pipeline, submission_run):
    folder, log = submission_run
    final = json.loads((folder / "final_metrics.json").read_text())
    assert_every_clock(final, log, ttt=False)
    data, env = final["fingerprint"]["data"], final["fingerprint"]["environment"]
    dataset = folder / "data" / "datasets" / "fineweb10B_sp1024"
    assert f"train_shards: {len(list(dataset.glob('fineweb_train_*.bin')))}\n" in log
    assert f"val_tokens: {final['val_tokens']}\n" in log and data["val_tokens"] == final["val_tokens"]
    assert data["tokenizer_sha256"] == file_sha256(folder / "data" / "tokenizers" / "fineweb_1024_bpe.model")
    assert data["manifest_sha256"] == file_sha256(dataset / "manifest.json")
    assert data["docs_sha256"] == json.loads((dataset / "manifest.json").read_text())["input"]["sha256"]
    assert f"byte_accounting: lookup tables val_bytes: {final['val_bytes']}\n" in log
    assert env["torch"] in log and env["coder"] in log and env["attention"]["causal"] in log


def test_code_bytes_are_the_exported_scripts_bytes(pipeline, submission_run):
    folder, _ = submission_run
    script = (pipeline / "out" / "export" / "train_gpt.py").read_bytes()
    assert script == (pipeline / "out" / "bundle" / "train_gpt.py").read_bytes()
    counted = metrics(pipeline, "compress")
    assert counted["code_bytes"] == len(script) == json.loads((folder / "final_metrics.json").read_text())["code_bytes"]
    info = json.loads((pipeline / "out" / "export" / "submission.json").read_text())
    assert info["bytes_code"] == len(script) and info["bytes_total"] == counted["total_bytes"]
    # the bundle is exactly what the runner runs on these params, read from the code, nothing listed by hand
    bundle = read_bundle(script.decode())
    assert bundle["files"] == shipped_files(["pgolf/submit/runner.py"], bundle["params"], pipeline)


def test_the_gate_refuses_script_plus_model_over_the_limit(pipeline):
    raw = (pipeline / "out" / "quantize" / "quantized.bin").read_bytes()
    code = len((pipeline / "out" / "export" / "train_gpt.py").read_bytes())
    artifact = metrics(pipeline, "compress")["artifact_bytes"]
    assert len(pack_artifact(raw, CompressConfig(size_limit_bytes=artifact + code), code)) == artifact
    with pytest.raises(SizeLimitError, match=f"{code:,} code = {artifact + code:,} bytes, over the limit"):
        pack_artifact(raw, CompressConfig(size_limit_bytes=artifact + code - 1), code)


def test_requirements_name_every_distribution_the_script_loads(pipeline, submission_run):
    _, log = submission_run
    folder = pipeline / "out" / "export"
    listed = {line.split("#")[0].strip().lower() for line in (folder / "requirements.txt").read_text().splitlines()}
    loaded = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", log, re.M)}
    bundle = read_bundle((folder / "train_gpt.py").read_text())["files"]
    nodes = [node for source in bundle.values() for node in ast.walk(ast.parse(source))]  # minified: a,b on one line
    imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    providers = metadata.packages_distributions()
    needed = {providers[name][0].lower() for name in loaded & imported if name in providers and name != "pgolf"}
    assert needed == listed - {""}, f"loaded by the bundle: {sorted(needed)}; requirements.txt: {sorted(listed)}"


def test_the_folder_has_what_merged_records_have(pipeline):
    folder = pipeline / "out" / "export"
    assert {"train_gpt.py", "submission.json", "README.md", "requirements.txt", "compliance.json", "logs"} <= {
        p.name for p in folder.iterdir()}
    info = json.loads((folder / "submission.json").read_text())
    assert info["track"] == "10min_16mb" and info["seeds"] == [1337]
    assert info["val_bpb"] == round(metrics(pipeline, "evaluate")["quantized"]["sliding_val_bpb"], 8)
    assert info["score"]["kind"] == "sliding" and "no test-time training" in info["score"]["what"]
    assert "is the **sliding-window** score" in (folder / "README.md").read_text()
    report = json.loads((folder / "compliance.json").read_text())
    assert report["rules"]["artifact_under_16mb"]["value"] == info["bytes_total"] <= 16_000_000
    assert report["rules"]["train_under_600s"]["status"] == "not measured"  # a CPU pipeline: not the declared H100s
    assert report["rules"]["no_network"]["status"] == "pass"
    # which clock each budget is judged by, and what each counts
    budgets = report["clocks"]["budgets"]
    assert (budgets["training"]["clock"], budgets["evaluation"]["clock"]) == ("training_phase", "evaluation_phase")
    assert {"training_loop", "calibration", "quantization", "compression"} <= set(budgets["training"]["counts"])
    assert {"decompression", "eval_sliding", "ttt"} <= set(budgets["evaluation"]["counts"])
    assert {"data_checks", "prequant_eval"} <= set(report["clocks"]["counted_by_neither"])
    assert "clock training_phase = training_setup + training_loop + calibration" in report["rules"][
        "train_under_600s"]["how"]
    assert "clock evaluation_phase = decompression + " in report["rules"]["eval_under_600s"]["how"]
    assert f"**{info['val_bpb']:.5f}**" in (folder / "README.md").read_text()
    assert (folder / "logs" / "train_provenance.json").is_file()


def test_submission_json_carries_the_pipelines_fingerprint(pipeline):
    info = json.loads((pipeline / "out" / "export" / "submission.json").read_text())
    fingerprint = info["fingerprint"]
    data, env = fingerprint["data"], fingerprint["environment"]
    dataset = pipeline / "data" / "datasets" / "fineweb10B_sp1024"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert "out/evaluate/provenance.json" in fingerprint["source"]
    assert data["dataset"] == "fineweb10B_sp1024" and data["manifest_sha256"] == file_sha256(dataset / "manifest.json")
    assert data["docs_sha256"] == manifest["input"]["sha256"]  # the embedded corpus's documents
    assert data["train_shards"] == metrics(pipeline, "tokenize")["train_files"]
    assert data["val_tokens"] == metrics(pipeline, "evaluate")["val_tokens"]
    assert data["val_bytes"] == metrics(pipeline, "evaluate")["val_bytes"]
    assert data["byte_accounting"] == "lookup tables"
    assert data["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    assert env["torch"] == info["pytorch_version"] and env["cuda"] == torch.version.cuda
    assert env["cudnn"] is None and env["gpu_count"] == 0 and env["attention"]["causal"].startswith("sdpa")
    assert env["system_binaries"] == {} and info["hardware"] == "8xH100 80GB SXM"


def test_export_with_measured_times_reads_the_scripts_run(pipeline, submission_run, tmp_path):
    folder, _ = submission_run
    env = {key: value for key, value in os.environ.items() if key != "DVC_STAGE"}
    dest = tmp_path / "records" / "2026-12-01_micro"
    subprocess.run([sys.executable, "-m", "pgolf.cli", "export", "--params", "presets/micro.yaml", "--dest", str(dest),
                    "--measured", str(folder)], cwd=pipeline, env=env, check=True, capture_output=True, timeout=300)
    report = json.loads((dest / "compliance.json").read_text())
    rule = report["rules"]["train_under_600s"]
    assert rule["status"] == "not measured" and "measured" in rule["how"] and "1xcpu" in rule["how"]
    assert (dest / "logs" / "final_metrics.json").is_file()
    final = json.loads((folder / "final_metrics.json").read_text())
    clocks = report["clocks"]
    assert clocks["budgets"]["training"]["measured_s"] == final["clocks"]["training_phase"]
    assert clocks["budgets"]["training"]["counts"]["calibration"]["measured_s"] == final["clocks"]["calibration"]
    assert clocks["measured_on"] == "1xcpu" and clocks["on_declared_hardware"] is False
    assert f"calibration {final['clocks']['calibration']:.1f} s" in report["rules"]["calibration_within_reserve"]["how"]
    info = json.loads((dest / "submission.json").read_text())
    assert info["fingerprint"]["data"] == final["fingerprint"]["data"]  # the measured run's, not the pipeline's
    assert info["fingerprint"]["environment"]["coder"] == final["fingerprint"]["environment"]["coder"]
    assert "final_metrics.json" in info["fingerprint"]["source"]


def test_torchrun_with_two_processes_makes_the_same_artifact(pipeline, submission_run, tmp_path):
    """As the organisers run it (torchrun --standalone), here with 2 CPU processes over gloo."""
    folder, _ = submission_run
    shutil.copytree(folder / "data", tmp_path / "data")
    shutil.copy(folder / "train_gpt.py", tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_STAGE", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "final_model.ptz").read_bytes() == (pipeline / "out" / "compress" / "artifact.ptz").read_bytes()
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["quantized"] == metrics(pipeline, "evaluate")["quantized"]


CLI = [sys.executable, "-m", "pgolf.cli"]


def exported(folder: Path) -> tuple[dict, str]:
    return json.loads((folder / "submission.json").read_text()), (folder / "README.md").read_text()


def test_hand_runs_with_other_params_leave_the_export_to_the_pipelines_figures(pipeline, tmp_path):
    """The issue's sequence: hand runs with other params, then `pgolf export`: the pipeline's figures, saying so;
    naming the hand run is refused, naming what its stages ran with and, once mixed, the files of two runs."""
    hand = "runs_other_params"
    run([*CLI, "quantize", "--set", "quantize.matrix_clip_sigmas=20", "--out", hand], pipeline)
    run([*CLI, "compress", "--out", hand], pipeline)
    run([*CLI, "evaluate", "--params", "presets/micro.yaml", "--set", "evaluate.eval_stride=32", "--out", hand],
        pipeline)
    run([*CLI, "export", "--dest", str(tmp_path / "default")], pipeline)
    info, readme = exported(tmp_path / "default")
    evaluated = metrics(pipeline, "evaluate")
    assert info["val_bpb"] == round(evaluated["quantized"]["sliding_val_bpb"], 8)
    assert info["bytes_total"] == metrics(pipeline, "compress")["total_bytes"]
    figures = info["provenance"]["figures"]
    assert info["provenance"]["source"] == "the pipeline's outputs (out/)"
    assert figures["evaluate"] | {"figure": ""} == {
        "figure": "", "file": "out/evaluate/metrics.json", "params_digest": evaluated["params_digest"],
        "targets": evaluated["targets"], "split_targets": evaluated["split_targets"]}
    assert (f"| Post-quant and sliding BPB | `out/evaluate/metrics.json` | `{evaluated['params_digest'][:12]}` | "
            f"{evaluated['targets']:,} of {evaluated['split_targets']:,} |") in readme
    assert "Every figure comes from the pipeline's outputs (out/)" in readme
    # the hand run named: its stages ran with other params than the script (the pipeline's bundle) bakes
    refused = pgolf(["export", "--from", hand, "--dest", str(tmp_path / "hand")], pipeline)
    assert refused.returncode == 2 and not (tmp_path / "hand").exists()
    assert "quantize ran with quantize.matrix_clip_sigmas=20.0, the script bakes 12.85" in refused.stderr
    assert "evaluate ran with evaluate.eval_stride=32, the script bakes 16" in refused.stderr
    # its artifact remade, not scored again: its evaluate figure is another artifact's
    run([*CLI, "quantize", "--set", "quantize.matrix_clip_sigmas=25", "--out", hand], pipeline)
    run([*CLI, "compress", "--out", hand], pipeline)
    mixed = pgolf(["export", "--from", hand, "--dest", str(tmp_path / "hand")], pipeline)
    assert mixed.returncode == 2 and "these outputs come from different runs" in mixed.stderr
    assert re.search(rf"out/compress/artifact.ptz: \w{{12}} in {hand}/out/compress/provenance.json \(wrote it\), "
                     rf"\w{{12}} in {hand}/out/evaluate/provenance.json \(read it\)", mixed.stderr), mixed.stderr
    listed = pgolf(["runs", hand], pipeline).stdout.splitlines()  # `pgolf runs` says so too
    assert listed[-1].startswith(f"hand run ({hand}/)") and listed[-1].endswith("mixed")
    assert next(line for line in listed if line.startswith("pipeline (out/)")).endswith("one run")


def test_a_named_hand_run_exports_its_own_consistent_set(pipeline, tmp_path):
    hand, retune = "runs_clip20", ["--set", "quantize.matrix_clip_sigmas=20"]
    for stage in ("bundle", "quantize", "compress", "evaluate"):
        run([*CLI, stage, *retune, "--out", hand], pipeline)
    run([*CLI, "export", "--from", hand, "--dest", str(tmp_path / "folder")], pipeline)
    info, readme = exported(tmp_path / "folder")
    own = json.loads((pipeline / hand / "out" / "evaluate" / "metrics.json").read_text())
    assert info["val_bpb"] == round(own["quantized"]["sliding_val_bpb"], 8)
    assert info["bytes_total"] == json.loads((pipeline / hand / "out" / "compress" / "metrics.json").read_text())[
        "total_bytes"] != metrics(pipeline, "compress")["total_bytes"]
    assert (tmp_path / "folder" / "train_gpt.py").read_bytes() == (
        pipeline / hand / "out" / "bundle" / "train_gpt.py").read_bytes()
    source = (f"the hand-run directory {hand}/ (its own bundle, compress, evaluate; the pipeline's prequant, "
              "train)")
    assert info["provenance"]["source"] == source and f"Every figure comes from {source}" in readme
    assert info["provenance"]["figures"]["evaluate"]["file"] == f"{hand}/out/evaluate/metrics.json"
    assert info["provenance"]["figures"]["prequant"]["params_digest"] == own["params_digest"]  # scored alike


def test_params_that_contradict_the_data_the_inputs_were_made_from_are_refused_naming_the_keys(pipeline):
    """A partial file whose tokenize: key differs from the data's: refused before scoring, naming the key; the
    keys the file leaves to the defaults are named too."""
    (pipeline / "partial.yaml").write_text("tokenize: {num_val_docs: 50}\nevaluate: {max_val_tokens: 4096}\n")
    refused = pgolf(["evaluate", "--params", "partial.yaml", "--out", "runs_partial"], pipeline)
    assert refused.returncode == 2
    assert "pgolf evaluate: warning: partial.yaml leaves" in refused.stderr and "eval_stride" in refused.stderr
    assert ("partial.yaml sets tokenize.num_val_docs=50 (tokenize used 100), but out/compress/artifact.ptz was made "
            "otherwise: this evaluate would not compute what its params say") in refused.stderr
    assert not (pipeline / "runs_partial" / "out" / "evaluate").exists()
