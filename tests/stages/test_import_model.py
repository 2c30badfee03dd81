"""``pgolf import``: a reference final_model.pt becomes the train stage's output."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
import yaml

from pgolf.model.files import build_model, load_model
from pgolf.pipeline import layout
from stages import import_model
from tests.conftest import model_config_from_reference


def write_params(path, model_config) -> None:
    path.write_text(yaml.safe_dump({"model": dataclasses.asdict(model_config)}))


def test_golden_reference_weights_round_trip(tmp_path, monkeypatch, golden):
    cfg = model_config_from_reference(golden["config"])
    reference = tmp_path / "final_model.pt"
    torch.save(golden["state_dict"], reference)
    write_params(tmp_path / "params.yaml", cfg)
    monkeypatch.chdir(tmp_path)
    assert import_model.main([str(reference)]) == 0
    saved_cfg, state = load_model(pathlib.Path(layout.TRAIN_MODEL))
    assert saved_cfg == cfg
    assert state.keys() == golden["state_dict"].keys()
    assert all(torch.equal(state[n], t) for n, t in golden["state_dict"].items())
    model = build_model(pathlib.Path(layout.TRAIN_MODEL))  # the file later stages read
    model.looping_active = True
    with torch.no_grad():
        loss = model(golden["x"], golden["y"]).item()
    assert loss == pytest.approx(float(golden["loss_loop"]), rel=1e-4)


def test_mismatched_weights_are_named_and_nothing_is_written(tmp_path, monkeypatch, golden_tiny, capsys):
    cfg = model_config_from_reference(golden_tiny["config"])
    state = dict(golden_tiny["state_dict"])
    state["blocks.0.attn.c_q.weight"] = state["blocks.0.attn.c_q.weight"][:, :32]
    del state["skip_gates"]
    reference = tmp_path / "final_model.pt"
    torch.save(state, reference)
    write_params(tmp_path / "params.yaml", cfg)
    monkeypatch.chdir(tmp_path)
    assert import_model.main([str(reference)]) == 2
    error = capsys.readouterr().err
    assert "missing skip_gates" in error
    assert "blocks.0.attn.c_q.weight: shape (64, 32) but the model has (64, 64)" in error
    assert not pathlib.Path(layout.TRAIN_MODEL).exists()


def test_pickled_objects_are_refused(tmp_path):
    reference = tmp_path / "final_model.pt"
    torch.save({"path": pathlib.PurePosixPath("an arbitrary object")}, reference)  # needs full unpickling
    with pytest.raises(ValueError, match="not a weights-only torch state dict"):
        import_model.read_reference_state_dict(reference)
    torch.save([torch.zeros(1)], reference)
    with pytest.raises(ValueError, match="expected a state dict"):
        import_model.read_reference_state_dict(reference)
