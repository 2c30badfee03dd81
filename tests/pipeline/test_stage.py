"""The stage frame: where a run writes (pipeline or hand-run directory), where it reads, its one-line errors."""

from __future__ import annotations

import errno
from pathlib import Path

from pgolf.pipeline import layout
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
