"""The researcher's loop through DVC itself, on the micro preset.

Copies the repository into a fresh git repo, runs ``dvc repro``, then retunes
quantization with ``dvc exp run -S`` and checks from DVC's own output that
training and calibration were not run again and that the artifact changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command as a user would (outside any DVC stage); its output, failing on a non-zero exit."""
    env = {key: value for key, value in os.environ.items() if key != "DVC_STAGE"}
    env |= {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "pgolf", "GIT_AUTHOR_EMAIL": "pgolf@localhost",
            "GIT_COMMITTER_NAME": "pgolf", "GIT_COMMITTER_EMAIL": "pgolf@localhost"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory) -> Path:
    if shutil.which("dvc") is None:
        pytest.fail("the dvc executable is not on PATH: install the project with `pip install -e '.[test]'`")
    repo = tmp_path_factory.mktemp("pipeline")
    copy_checkout(repo)
    shutil.copy(repo / "presets" / "micro.yaml", repo / "params.yaml")
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "micro preset"], repo)
    return repo


def total_bytes(repo: Path) -> int:
    return json.loads((repo / "out" / "compress" / "metrics.json").read_text())["total_bytes"]


def test_repro_then_retune_quantization_reruns_only_what_follows(micro_repo):
    first = run(["dvc", "repro"], micro_repo)
    for stage in ("tokenize", "train", "prequant", "calibrate", "quantize", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in first
    evaluation = json.loads((micro_repo / "out" / "evaluate" / "metrics.json").read_text())
    assert evaluation["quantized"]["val_bpb"] > 0
    size_before = total_bytes(micro_repo)
    run(["git", "add", "-A"], micro_repo)
    run(["git", "commit", "-qm", "baseline run"], micro_repo)

    retune = run(["dvc", "exp", "run", "-S", "quantize.matrix_clip_sigmas=30"], micro_repo)
    for stage in ("quantize", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in retune
    for stage in ("tokenize", "train", "calibrate", "prequant"):  # the unquantized score stays cached
        assert f"Running stage '{stage}'" not in retune
    assert total_bytes(micro_repo) < size_before

    diff = run(["dvc", "metrics", "diff"], micro_repo)
    assert "total_bytes" in diff
    # experiments keep their metrics in git: `dvc exp show` has both runs' sizes side by side
    table = run(["dvc", "exp", "show", "--csv", "--keep", "total_bytes$|matrix_clip_sigmas", "--drop", ".*"], micro_repo)
    assert str(size_before) in table and str(total_bytes(micro_repo)) in table


def test_compressor_change_reruns_from_quantize(micro_repo):
    """quantize.fit_to_size measures sizes with the compressor, so quantize lists the compress keys."""
    output = run(["dvc", "exp", "run", "-S", "compress.compressor=lzma"], micro_repo)
    for stage in ("quantize", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in output
    for stage in ("tokenize", "train", "calibrate", "prequant"):
        assert f"Running stage '{stage}'" not in output


def test_eval_stride_change_reruns_the_evaluations_alone(micro_repo):
    output = run(["dvc", "exp", "run", "-S", "evaluate.eval_stride=32"], micro_repo)
    for stage in ("prequant", "evaluate"):
        assert f"Running stage '{stage}'" in output
    for stage in ("tokenize", "train", "calibrate", "quantize", "compress"):
        assert f"Running stage '{stage}'" not in output


def test_a_logging_setting_reruns_nothing(micro_repo):
    output = run(["dvc", "exp", "run", "-S", "train.train_log_every=3"], micro_repo)
    assert "Stage 'train' didn't change, skipping" in output
    assert "Running stage" not in output


def test_the_allocator_runs_as_an_experiment_within_the_limit_and_exp_show_compares(micro_repo):
    limit = total_bytes(micro_repo)  # the last run's submission: the allocator gets exactly its bytes
    output = run(["dvc", "exp", "run", "-S", "quantize.method=allocate", "-S", f"compress.size_limit_bytes={limit}"],
                 micro_repo)
    for stage in ("quantize", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in output
    for stage in ("tokenize", "train", "calibrate", "prequant"):
        assert f"Running stage '{stage}'" not in output
    assert total_bytes(micro_repo) <= limit
    report = json.loads((micro_repo / "out" / "quantize" / "report.json").read_text())
    assert report["allocation"]["total_bytes"] == total_bytes(micro_repo)
    table = run(["dvc", "exp", "show", "--csv", "--keep", "quantize.method|sliding_val_bpb", "--drop", ".*"],
                micro_repo)
    assert "allocate" in table and "fixed" in table


def tracked_outputs(repo: Path) -> dict[str, bytes]:
    """Every file under the pipeline's output and data directories, by path."""
    return {str(path.relative_to(repo)): path.read_bytes()
            for top in ("out", "data") for path in sorted((repo / top).rglob("*")) if path.is_file()}


def test_stages_run_by_hand_never_touch_what_dvc_tracks(micro_repo):
    before = tracked_outputs(micro_repo)
    cli = [sys.executable, "-m", "pgolf.cli"]
    run([*cli, "quantize", "--params", "presets/micro.yaml", "--set", "quantize.matrix_clip_sigmas=20"], micro_repo)
    run([*cli, "compress", "--params", "presets/micro.yaml"], micro_repo)
    scored = run([*cli, "evaluate", "--params", "presets/micro.yaml", "--set", "evaluate.eval_stride=16"], micro_repo)
    assert tracked_outputs(micro_repo) == before
    hand = micro_repo / "runs" / "out"
    assert str(Path("runs") / "out" / "compress" / "artifact.ptz") in scored  # it scored the hand-made artifact
    assert json.loads((hand / "compress" / "metrics.json").read_text())["total_bytes"] != total_bytes(micro_repo)
    assert json.loads((hand / "evaluate" / "metrics.json").read_text())["quantized"]["val_bpb"] > 0
