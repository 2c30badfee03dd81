"""The stage frame: where a run writes (pipeline or hand-run directory), where it reads, its one-line errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

from pgolf.pipeline import layout, stage
from pgolf.pipeline.stage import Workspace, one_line, run_stage, workspace


def test_dvc_runs_write_the_pipeline_paths_and_hand_runs_their_own_directory():
    assert workspace("runs", {"DVC_STAGE": "train"}) == Workspace.pipeline()
    hand = workspace("runs", {})
    assert hand.output(layout.TRAIN_MODEL) == Path("runs") / layout.TRAIN_MODEL
    assert Workspace.pipeline().output(layout.TRAIN_MODEL) == Path(layout.TRAIN_MODEL)


def test_a_hand_run_reads_its_own_outputs_first_then_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hand = Workspace(Path("runs"))
    assert hand.input(layout.QUANTIZE_MODEL) == Path(layout.QUANTIZE_MODEL)  # nothing of its own yet
    own = hand.output(layout.QUANTIZE_MODEL)
    own.parent.mkdir(parents=True)
    own.write_bytes(b"made by hand")
    assert hand.input(layout.QUANTIZE_MODEL) == own


def test_os_errors_become_one_line_with_the_path():
    error = OSError(errno.ENOSPC, "No space left on device", "out/train/model.pt")
    assert one_line(error) == "out/train/model.pt: No space left on device"
    assert one_line(ValueError("first\nsecond")) == "first second"


def test_a_stage_without_its_params_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    assert run_stage("compress", lambda params, ws: ran.append(ws), ["--params", "nope.yaml"]) == 2
    assert not ran
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pgolf compress: error:") and "nope.yaml" in err[0]


def test_hand_runs_get_the_out_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE")
    Path("params.yaml").write_text("compress: {}\n")
    seen = []
    assert run_stage("compress", lambda params, ws: seen.append(ws), ["--out", "mine"]) == 0
    assert seen == [Workspace(Path("mine"))]


HOLDING_RUN = """
import sys, time
from pathlib import Path
from pgolf.pipeline.stage import run_stage

def hold(params, ws):
    Path("started").write_text("")
    while not Path("release").exists():
        time.sleep(0.02)
    (ws.root / "done").write_text("first")

sys.exit(run_stage("compress", hold, ["--out", "mine"]))
"""


def test_a_second_run_of_a_stage_in_one_workspace_refuses_naming_the_lock(tmp_path, monkeypatch, capsys):
    """The first run holds the workspace's lock of the stage; the second stops before any work, naming the lock and
    its holder; another workspace, or the same once the first ended (however it ended), is free."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE")
    Path("params.yaml").write_text("compress: {}\n")
    first = subprocess.Popen([sys.executable, "-c", HOLDING_RUN], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        deadline = time.monotonic() + 60
        while not Path("started").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.02)
        ran = []
        assert run_stage("compress", lambda params, ws: ran.append(ws), ["--out", "mine"]) == 2
        assert not ran
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"pgolf compress: error: {Path('mine') / layout.LOCKS_DIR / 'compress.lock'}: locked by "
                       f"`pgolf compress` (pid {first.pid}): another run of compress is writing this workspace; wait "
                       "for it, or give this one another --out"]
        assert run_stage("compress", lambda params, ws: ran.append(ws), ["--out", "other"]) == 0
        Path("release").write_text("")
        assert first.wait(60) == 0
    finally:
        first.kill()
    assert Path("mine/done").read_text() == "first"
    assert run_stage("compress", lambda params, ws: ran.append(ws), ["--out", "mine"]) == 0
    assert ran == [Workspace(Path("other")), Workspace(Path("mine"))]


def test_a_reader_recovers_an_output_whose_commit_was_interrupted(tmp_path, monkeypatch):
    """Workspace.input recovers first: a directory stranded aside by a killed replacement is back in place."""
    monkeypatch.chdir(tmp_path)
    plots = Path("runs") / layout.QUANTIZE_PLOTS
    aside = plots.with_name(f".{plots.name}.old-999999999")  # a process that cannot exist
    aside.mkdir(parents=True)
    (aside / "tensors.csv").write_text("old\n")
    assert Workspace(Path("runs")).input(layout.QUANTIZE_PLOTS) == plots
    assert (plots / "tensors.csv").read_text() == "old\n" and not aside.exists()


def test_a_stage_relaunched_under_torchrun_names_the_users_params_file_not_the_launchers_copy(tmp_path, monkeypatch):
    """The launcher hands its processes a resolved copy of the params under .pgolf/; their warnings and
    lineage records name the file the user gave (``params.source``), not that copy."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE")
    Path("mine.yaml").write_text("compress: {}\n")
    launched = []
    monkeypatch.setattr(stage, "launch_torchrun", lambda module, args, nproc, env: launched.append((args, env)) or 0)
    assert run_stage("compress", lambda params, ws: None, ["--params", "mine.yaml", "--out", "o"], None, lambda p: 2) == 0
    (args, env), = launched
    copy = args[args.index("--params") + 1]
    assert copy != "mine.yaml" and Path(copy).is_file() and env[stage.PARAMS_SOURCE] == "mine.yaml"
    for name in ("RANK", "WORLD_SIZE", stage.LOCK_HELD, stage.PARAMS_SOURCE):  # what each relaunched process sees
        monkeypatch.setenv(name, {"RANK": "0", "WORLD_SIZE": "2"}.get(name, env.get(name, "")))
    sources = []
    assert run_stage("compress", lambda params, ws: sources.append((params.source, ws.begin("compress", params).lineage.source)), args) == 0
    assert sources == [("mine.yaml", "mine.yaml")]
