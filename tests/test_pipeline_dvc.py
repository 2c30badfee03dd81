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
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "pgolf", "GIT_AUTHOR_EMAIL": "pgolf@localhost",
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
    for stage in ("tokenize", "train", "calibrate", "quantize", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in first
    evaluation = json.loads((micro_repo / "out" / "evaluate" / "metrics.json").read_text())
    assert evaluation["quantized"]["val_bpb"] > 0
    size_before = total_bytes(micro_repo)
    run(["git", "add", "-A"], micro_repo)
    run(["git", "commit", "-qm", "baseline run"], micro_repo)

    retune = run(["dvc", "exp", "run", "-S", "quantize.matrix_clip_sigmas=30"], micro_repo)
    for stage in ("quantize", "compress", "evaluate"):
        assert f"Running stage '{stage}'" in retune
    for stage in ("tokenize", "train", "calibrate"):
        assert f"Running stage '{stage}'" not in retune
    assert total_bytes(micro_repo) < size_before

    diff = run(["dvc", "metrics", "diff"], micro_repo)
    assert "total_bytes" in diff
    # experiments keep their metrics in git: `dvc exp show` has both runs' sizes side by side
    table = run(["dvc", "exp", "show", "--csv", "--keep", "total_bytes$|matrix_clip_sigmas", "--drop", ".*"], micro_repo)
    assert str(size_before) in table and str(total_bytes(micro_repo)) in table


def test_compressor_change_leaves_quantize_cached(micro_repo):
    output = run(["dvc", "exp", "run", "-S", "compress.compressor=lzma"], micro_repo)
    assert "Running stage 'compress'" in output
    assert "Running stage 'quantize'" not in output


def test_eval_stride_change_reruns_evaluate_alone(micro_repo):
    output = run(["dvc", "exp", "run", "-S", "evaluate.eval_stride=32"], micro_repo)
    assert "Running stage 'evaluate'" in output
    for stage in ("tokenize", "train", "calibrate", "quantize", "compress"):
        assert f"Running stage '{stage}'" not in output
