"""The plots stage: every stage's plot data rendered as PNG, and nothing drawn where a stage wrote none."""

from __future__ import annotations

import json
from pathlib import Path

from pgolf.atomic import stage_outputs
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace
from stages import plots


def rendered(image: str) -> bytes:
    """The plots stage run on what the stages wrote; the PNG it drew as ``image``."""
    plots.run({}, Workspace.pipeline())
    return (Path(layout.PLOTS_IMAGES) / image).read_bytes()


def test_without_plot_data_it_draws_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plots.run({}, Workspace.pipeline())
    assert list(Path(layout.PLOTS_IMAGES).iterdir()) == []
    assert "no plot data yet" in capsys.readouterr().out
    assert json.loads(Path(layout.PLOTS_PROVENANCE).read_text())["stage"] == "plots"


def test_the_training_plot_draws_the_validation_curve_when_there_is_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with stage_outputs() as out:
        out.write_csv(layout.TRAIN_CURVE, [{"step": s, "train_loss": 5 - s / 10, "lr_scale": 1.0} for s in range(1, 9)])
    without = rendered("train_loss.png")
    with stage_outputs() as out:
        out.write_csv(layout.TRAIN_VAL_CURVE, [{"step": s, "val_loss": 5.5 - s / 20} for s in (4, 8)])
    with_validation = rendered("train_loss.png")
    assert without[:4] == with_validation[:4] == b"\x89PNG" and without != with_validation
