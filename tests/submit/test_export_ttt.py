"""With ``ttt.enabled`` the exported script scores what the ttt stage scores: every TTT method, 1 and 2 processes.

The micro preset runs through ``dvc repro`` with TTT on (``sgd_all``) and exports: the records
folder's ``val_bpb`` is the ttt stage's and says so. For each method, the ttt stage's score
(the pipeline's own for ``sgd_all``; for the others the bundle and ttt stages run by hand with
that method) is compared with the exported script's, run in a folder holding only the
challenge's data layout by ``python`` and by ``torchrun --nproc_per_node=2`` (against the ttt
stage on two processes): ``final_metrics.json``'s ``val_bpb`` is the same number, the log ends
with it, ``pgolf seeds`` reads it as the run's score, and the artifact is the pipeline's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.submit.seeds import read_run
from tests.pipeline.test_dvc import micro_repo, run  # noqa: F401 (micro_repo: a fixture)
from tests.submit.test_export import assert_every_clock, metrics

pytestmark = pytest.mark.slow

PIPELINE_METHOD = "sgd_all"
TTT = {"enabled": True, "max_val_tokens": 8192}  # a few dozen documents: every method's work, in seconds
# each method's settings, scaled to the micro model and this many documents (phased pauses twice)
METHODS = {
    "sgd_all": {},
    "adamw_tail": {},
    "lora_doc": {"lora_rank": 4, "lora_batch_docs": 4, "lora_lr": 0.001},
    "phased": {"lora_rank": 4, "lora_batch_docs": 2, "lora_lr": 0.001, "phase_prefix_docs": 4, "phase_count": 2,
               "phase_chunk_tokens": 256},
}


@pytest.fixture(scope="module")
def ttt_pipeline(micro_repo) -> Path:
    """The micro preset with TTT on, every stage by ``dvc repro``, export included."""
    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    params["ttt"] |= TTT | {"method": PIPELINE_METHOD}
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'export'" in run(["dvc", "repro"], micro_repo)
    return micro_repo


def test_the_records_folder_scores_the_ttt_stage_and_says_so(ttt_pipeline):
    folder = ttt_pipeline / "out" / "export"
    info = json.loads((folder / "submission.json").read_text())
    ttt, evaluated = metrics(ttt_pipeline, "ttt"), metrics(ttt_pipeline, "evaluate")
    assert ttt["enabled"] and (info["val_bpb"], info["val_loss"]) == (round(ttt["val_bpb"], 8),
                                                                        round(ttt["val_loss"], 8))
    assert info["score"]["kind"] == "ttt" and info["score"]["ttt_method"] == PIPELINE_METHOD
    assert info["score"]["sliding_val_bpb"] == evaluated["quantized"]["sliding_val_bpb"] != ttt["val_bpb"]
    readme = (folder / "README.md").read_text()
    assert "is the **TTT** score: score-first test-time training of the artifact (ttt.method=sgd_all)" in readme
    assert f"**{ttt['val_bpb']:.5f}**" in readme and "| **TTT BPB** |" in readme
    rules = json.loads((folder / "compliance.json").read_text())["rules"]
    assert "score-first TTT (ttt.method=sgd_all)" in rules["score_before_update"]["how"]
    assert "test-time training" in rules["eval_under_600s"]["how"]


def test_the_export_refuses_a_ttt_score_made_with_other_settings(ttt_pipeline, tmp_path):
    """The script bakes ttt.lr=0.005; a ttt stage's metrics made with another lr are not its score."""
    env = {key: value for key, value in os.environ.items() if key != "DVC_STAGE"}
    provenance = ttt_pipeline / "out" / "ttt" / "provenance.json"
    record = json.loads(provenance.read_text())
    record["params"]["ttt.lr"] = 0.5
    saved = provenance.read_text()
    provenance.write_text(json.dumps(record))
    try:
        done = subprocess.run([sys.executable, "-m", "pgolf.cli", "export", "--dest", str(tmp_path / "stale")],
                              cwd=ttt_pipeline, env=env, capture_output=True, text=True, timeout=300)
    finally:
        provenance.write_text(saved)
    assert done.returncode == 2
    assert "does not make these figures: ttt ran with ttt.lr=0.5, the script bakes 0.005: run those stages again" \
        in done.stderr


def stage_scores(repo: Path, method: str, work: Path) -> tuple[Path, dict[int, dict]]:
    """The method's train_gpt.py and the ttt stage's metrics on 1 and 2 processes (the pipeline's, for its method)."""
    sets = [item for key, value in (METHODS[method] | {"method": method}).items()
            for item in ("--set", f"ttt.{key}={value}")]
    if method == PIPELINE_METHOD:
        script, one = repo / "out" / "export" / "train_gpt.py", metrics(repo, "ttt")
    else:
        run([sys.executable, "-m", "pgolf.cli", "bundle", *sets, "--out", str(work)], repo)
        run([sys.executable, "-m", "pgolf.cli", "ttt", *sets, "--out", str(work / "one")], repo)
        script, one = work / "out" / "bundle" / "train_gpt.py", json.loads(
            (work / "one" / "out" / "ttt" / "metrics.json").read_text())
    run([sys.executable, "-m", "pgolf.cli", "ttt", *sets, "--set", "ttt.nproc_per_node=2", "--out", str(work / "two")],
        repo)
    return script, {1: one, 2: json.loads((work / "two" / "out" / "ttt" / "metrics.json").read_text())}


def run_script(repo: Path, script: Path, folder: Path, nproc: int) -> str:
    """The script in a folder with nothing but the challenge's data, by python or torchrun; its output."""
    (folder / "data" / "tokenizers").mkdir(parents=True)
    dataset = Path("data") / "datasets" / "fineweb10B_sp1024"
    shutil.copytree(repo / dataset, folder / dataset)
    shutil.copy(repo / "data" / "tokenizers" / "fineweb_1024_bpe.model", folder / "data" / "tokenizers")
    shutil.copy(script, folder / "train_gpt.py")
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_STAGE", "PYTHONPATH")}
    command = [sys.executable, "train_gpt.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder / "train_seed1337.log").write_text(done.stdout)
    return done.stdout


@pytest.mark.parametrize("method", list(METHODS))
def test_the_exported_script_scores_as_the_ttt_stage(ttt_pipeline, method, tmp_path):
    script, stage = stage_scores(ttt_pipeline, method, tmp_path / "stages")
    for nproc in (1, 2):
        folder = tmp_path / f"run_{nproc}"
        log = run_script(ttt_pipeline, script, folder, nproc)
        final = json.loads((folder / "final_metrics.json").read_text())
        expected = stage[nproc]
        assert final["params"]["ttt"]["method"] == method and final["world_size"] == nproc
        assert (folder / "final_model.ptz").read_bytes() == (ttt_pipeline / "out" / "compress" /
                                                             "artifact.ptz").read_bytes()
        for key in ("val_bpb", "val_loss", "tokens", "bytes", "optimizer_steps", "document_steps"):
            assert final["ttt"][key] == expected[key], (method, nproc, key)
        assert (final["val_bpb"], final["val_loss"], final["score"]) == (
            expected["val_bpb"], expected["val_loss"], "quantized_ttt")
        assert final["quantized"] == metrics(ttt_pipeline, "evaluate")["quantized"]  # the sliding score beside it
        assert re.search(rf"^quantized_ttt val_loss:{expected['val_loss']:.8f} val_bpb:{expected['val_bpb']:.8f} "
                         r"eval_time:\d+ms$", log, re.M)
        assert log.rstrip().splitlines()[-1] == (
            f"submission val_loss:{expected['val_loss']:.8f} val_bpb:{expected['val_bpb']:.8f} score:quantized_ttt")
        assert read_run(folder).score.val_bpb == expected["val_bpb"]  # what `pgolf seeds` gathers
        assert_every_clock(final, log, ttt=True)
