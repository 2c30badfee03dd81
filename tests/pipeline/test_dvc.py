"""The researcher's loop through DVC itself, on the micro preset.

Copies the repository into a fresh git repo and runs ``dvc repro`` once (the baseline,
committed); every test starts from that baseline (tracked files reset, DVC's cached outputs
checked out), so each passes alone and in any order. The tests retune with ``dvc exp run
-S`` or edit the code, and read from DVC's own output which stages ran.
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

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPUTE = ("tokenize", "train", "prequant", "calibrate", "quantize", "compress", "evaluate")

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
    """A copy of the checkout as a fresh git repository whose params are the micro preset."""
    if shutil.which("dvc") is None:
        pytest.fail("the dvc executable is not on PATH: install the project with `pip install -e '.[test]'`")
    repo = tmp_path_factory.mktemp("pipeline")
    copy_checkout(repo)
    shutil.copy(repo / "presets" / "micro.yaml", repo / "params.yaml")
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "micro preset"], repo)
    return repo


@pytest.fixture(scope="module")
def baseline_repo(micro_repo) -> tuple[Path, str]:
    """The micro preset run by ``dvc repro`` and committed; its output."""
    output = run(["dvc", "repro"], micro_repo)
    run(["git", "add", "-A"], micro_repo)
    run(["git", "commit", "-qm", "baseline run"], micro_repo)
    return micro_repo, output


@pytest.fixture
def baseline(baseline_repo) -> Path:
    """The baseline, as committed: what earlier tests changed (params, code, outputs) is undone."""
    repo, _ = baseline_repo
    run(["git", "reset", "-q", "--hard"], repo)
    run(["git", "clean", "-fq"], repo)  # untracked files go (not directories: git keeps no empty ones); ignored stay
    shutil.rmtree(repo / "runs", ignore_errors=True)  # hand runs (ignored by git)
    run(["dvc", "checkout", "--force"], repo)
    assert "Running stage" not in run(["dvc", "repro"], repo)  # the baseline is complete and up to date
    return repo


def ran(output: str) -> set[str]:
    """The stages DVC ran (or, with --dry, would run) according to its output."""
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def total_bytes(repo: Path) -> int:
    return json.loads((repo / "out" / "compress" / "metrics.json").read_text())["total_bytes"]


def test_repro_runs_every_stage(baseline_repo):
    repo, output = baseline_repo
    assert set(COMPUTE) | {"bundle", "ttt", "plots", "export"} <= ran(output)
    evaluation = json.loads((repo / "out" / "evaluate" / "metrics.json").read_text())
    assert evaluation["quantized"]["val_bpb"] > 0
    assert (repo / "out" / "plots" / "images" / "train_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_retuning_quantization_reruns_only_what_follows(baseline):
    size_before = total_bytes(baseline)
    retune = run(["dvc", "exp", "run", "-S", "quantize.matrix_clip_sigmas=30"], baseline)
    assert {"quantize", "compress", "evaluate"} <= ran(retune)
    assert not ran(retune) & {"tokenize", "train", "calibrate", "prequant"}  # the unquantized score stays cached
    assert total_bytes(baseline) < size_before
    assert "total_bytes" in run(["dvc", "metrics", "diff"], baseline)
    # experiments keep their metrics in git: `dvc exp show` has both runs' sizes side by side
    table = run(["dvc", "exp", "show", "--csv", "--keep", "total_bytes$|matrix_clip_sigmas", "--drop", ".*"],
                baseline)
    assert str(size_before) in table and str(total_bytes(baseline)) in table


def test_compressor_change_reruns_from_quantize(baseline):
    """quantize.fit_to_size measures sizes with the compressor, so quantize lists the compress keys."""
    output = run(["dvc", "exp", "run", "-S", "compress.compressor=lzma"], baseline)
    assert {"quantize", "compress", "evaluate"} <= ran(output)
    assert not ran(output) & {"tokenize", "train", "calibrate", "prequant"}


def test_eval_stride_change_reruns_the_evaluations_alone(baseline):
    output = run(["dvc", "exp", "run", "-S", "evaluate.eval_stride=32"], baseline)
    assert {"prequant", "evaluate"} <= ran(output)
    assert not ran(output) & {"tokenize", "train", "calibrate", "quantize", "compress"}


def test_a_logging_setting_reruns_nothing(baseline):
    output = run(["dvc", "exp", "run", "-S", "train.train_log_every=3"], baseline)
    assert "Stage 'train' didn't change, skipping" in output
    assert not ran(output)


def append_comment(repo: Path, file: str) -> None:
    with (repo / file).open("a", encoding="utf-8") as handle:
        handle.write("# an edit that changes the file's hash\n")


def add_quantize_key(repo: Path) -> None:
    """A new key in the quantize section of the schema, in params.yaml, and dvc.yaml regenerated."""
    config = repo / "pgolf" / "config.py"
    text = config.read_text(encoding="utf-8")
    anchor = "    allocate_distortion:"
    assert anchor in text
    config.write_text(text.replace(anchor, "    probe_key: int = 0\n" + anchor, 1), encoding="utf-8")
    params = repo / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8").replace("quantize:\n", "quantize:\n  probe_key: 0\n", 1),
                      encoding="utf-8")
    run([sys.executable, "-m", "pgolf.pipeline.deps", "--write"], repo)


EDITS = {
    "gptq": lambda repo: append_comment(repo, "pgolf/quant/gptq.py"),
    "ans coder": lambda repo: append_comment(repo, "pgolf/artifact/ans.py"),
    "a plot": lambda repo: append_comment(repo, "pgolf/pipeline/plots.py"),
    "quantize schema": add_quantize_key,
    "stage frame": lambda repo: append_comment(repo, "pgolf/pipeline/stage.py"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_code_change_after_training_leaves_training_and_calibration_cached(baseline, edit):
    EDITS[edit](baseline)
    output = run(["dvc", "repro", "--dry"], baseline)
    assert not ran(output) & {"tokenize", "train", "calibrate", "prequant"}, output
    expected = {"gptq": {"quantize", "bundle"}, "ans coder": {"quantize", "compress", "evaluate", "bundle"},
                "a plot": {"plots"}, "quantize schema": {"quantize", "bundle"}, "stage frame": set()}[edit]
    assert expected <= ran(output), output


def test_a_change_to_the_training_loop_reruns_training(baseline):
    append_comment(baseline, "pgolf/train/loop.py")
    output = run(["dvc", "repro", "--dry"], baseline)
    assert {"train", "bundle"} <= ran(output)
    assert not ran(output) & {"tokenize"}


def test_the_allocator_runs_as_an_experiment_within_the_limit_and_exp_show_compares(baseline):
    limit = total_bytes(baseline)  # the baseline's submission: the allocator gets exactly its bytes
    output = run(["dvc", "exp", "run", "-S", "quantize.method=allocate", "-S", f"compress.size_limit_bytes={limit}"],
                 baseline)
    assert {"quantize", "compress", "evaluate"} <= ran(output)
    assert not ran(output) & {"tokenize", "train", "calibrate", "prequant"}
    assert total_bytes(baseline) <= limit
    report = json.loads((baseline / "out" / "quantize" / "report.json").read_text())
    assert report["allocation"]["total_bytes"] == total_bytes(baseline)
    table = run(["dvc", "exp", "show", "--csv", "--keep", "quantize.method|sliding_val_bpb", "--drop", ".*"],
                baseline)
    assert "allocate" in table and "fixed" in table


def tracked_outputs(repo: Path) -> dict[str, bytes]:
    """Every file under the pipeline's output and data directories, by path."""
    return {str(path.relative_to(repo)): path.read_bytes()
            for top in ("out", "data") for path in sorted((repo / top).rglob("*")) if path.is_file()}


def test_stages_run_by_hand_never_touch_what_dvc_tracks(baseline):
    before = tracked_outputs(baseline)
    cli = [sys.executable, "-m", "pgolf.cli"]
    run([*cli, "quantize", "--params", "presets/micro.yaml", "--set", "quantize.matrix_clip_sigmas=20"], baseline)
    run([*cli, "compress", "--params", "presets/micro.yaml"], baseline)
    scored = run([*cli, "evaluate", "--params", "presets/micro.yaml", "--set", "evaluate.eval_stride=16"], baseline)
    assert tracked_outputs(baseline) == before
    hand = baseline / "runs" / "out"
    assert str(Path("runs") / "out" / "compress" / "artifact.ptz") in scored  # it scored the hand-made artifact
    assert json.loads((hand / "compress" / "metrics.json").read_text())["total_bytes"] != total_bytes(baseline)
    assert json.loads((hand / "evaluate" / "metrics.json").read_text())["quantized"]["val_bpb"] > 0


def pgolf(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DVC_STAGE"} | {"DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "pgolf.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def newest_experiment_params(repo: Path) -> dict:
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True,
                                      check=True).stdout)
    revs = [rev for base in shown for group in base.get("experiments") or [] for rev in group.get("revs") or []]
    newest = max(revs, key=lambda rev: rev["data"]["timestamp"])
    return newest["data"]["params"]["params.yaml"]["data"]


def test_an_experiment_carries_the_workspace_and_pgolf_exp_says_so(baseline):
    """docs/EXPERIMENTS.md: `--temp` copies the workspace; `pgolf exp run` names what it carries in."""
    run(["dvc", "exp", "run", "-S", "quantize.matrix_clip_sigmas=14"], baseline)  # leaves 14 in params.yaml
    carried = pgolf(["exp", "run", "--temp", "-S", "compress.compressor=lzma"], baseline)
    assert carried.returncode == 0, carried.stderr[-3000:]
    assert "warning: the workspace differs from HEAD (quantize.matrix_clip_sigmas: 12.85 -> 14" in carried.stderr
    params = newest_experiment_params(baseline)
    assert params["quantize"]["matrix_clip_sigmas"] == 14 and params["compress"]["compressor"] == "lzma"  # DVC's way
    refused = pgolf(["exp", "run", "--from-head", "--temp", "-S", "compress.compressor=lzma"], baseline)
    assert refused.returncode == 2 and "quantize.matrix_clip_sigmas: 12.85 -> 14" in refused.stderr
    run(["git", "checkout", "params.yaml"], baseline)  # the documented way back to the baseline
    clean = pgolf(["exp", "run", "--from-head", "--temp", "-S", "compress.compressor=lzma"], baseline)
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr[-3000:]
    params = newest_experiment_params(baseline)
    assert params["quantize"]["matrix_clip_sigmas"] == 12.85 and params["compress"]["compressor"] == "lzma"


def test_pgolf_runs_puts_pipeline_hand_runs_and_experiments_side_by_side(baseline):
    run(["dvc", "exp", "run", "-S", "quantize.matrix_clip_sigmas=30"], baseline)
    run([sys.executable, "-m", "pgolf.cli", "evaluate", "--set", "evaluate.eval_stride=32"], baseline)
    listed = pgolf(["runs", "--exps"], baseline)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("  ")[0]: line for line in listed.stdout.splitlines()[2:]}
    sliding = json.loads((baseline / "out" / "evaluate" / "metrics.json").read_text())["quantized"]["sliding_val_bpb"]
    assert f"{sliding:.5f}" in rows["pipeline (out/)"] and f"{total_bytes(baseline):,}" in rows["pipeline (out/)"]
    assert "evaluate.eval_stride=32" in rows["hand run (runs/)"]  # a hand run says what it was made with
    # each score says how many validation targets it covers and the params digest it was computed with
    hand = json.loads((baseline / "runs" / "out" / "evaluate" / "metrics.json").read_text())
    assert f"{hand['targets']:,} of {hand['split_targets']:,}" in rows["hand run (runs/)"]
    assert hand["params_digest"][:8] in rows["hand run (runs/)"]
    piped = json.loads((baseline / "out" / "evaluate" / "metrics.json").read_text())
    assert piped["params_digest"][:8] in rows["pipeline (out/)"] and hand["params_digest"][:8] not in rows[
        "pipeline (out/)"]
    assert rows["pipeline (out/)"].endswith("one run") and rows["hand run (runs/)"].endswith("one run")
    assert any("quantize.matrix_clip_sigmas=30" in line for line in rows.values())  # the experiment
