"""Calibration Hessians: parity with the reference, the file format and its errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from pgolf.model.gpt import GPT
from pgolf.quant.calibrate import collect_hessians
from pgolf.quant.hessians import load_hessians, save_hessians


@pytest.fixture(scope="module")
def golden_hessians(golden, golden_config):
    model = GPT(golden_config)
    model.load_state_dict(golden["state_dict"])
    return collect_hessians(model, golden["calib_batches"], "cpu", show_progress=False), model


def test_hessians_match_the_reference(golden, golden_hessians):
    hessians, _ = golden_hessians  # the same tolerance for both sets
    assert set(golden["gptq"]) <= set(hessians)
    for name, entry in golden["gptq"].items():
        assert hessians[name].dtype == torch.float32
        torch.testing.assert_close(hessians[name], entry["H"], rtol=1e-5, atol=1e-5 * entry["H"].abs().max().item())


def test_collection_leaves_the_model_as_it_was(golden_hessians):
    _, model = golden_hessians  # parity above already covers looping: the golden ran looped
    assert not model.looping_active and model.training
    assert not any(module._forward_hooks for module in model.modules())


def test_file_round_trip_and_bad_files(tmp_path):
    hessians = {"blocks.0.mlp.fc.weight": torch.eye(4), "tok_emb.weight": 2 * torch.eye(3)}
    path = tmp_path / "hessians.pt"
    save_hessians(path, hessians)
    loaded = load_hessians(path)
    assert loaded.keys() == hessians.keys() and all(torch.equal(loaded[n], hessians[n]) for n in hessians)
    with pytest.raises(FileNotFoundError, match="missing.pt: Hessians file not found"):
        load_hessians(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: not a readable Hessians file"):
        load_hessians(garbage)
    code = tmp_path / "code.pt"
    code.write_bytes(pickle.dumps(print, protocol=2))  # a pickle that would call code: refused, not run
    with pytest.raises(ValueError, match="code.pt: not a readable Hessians file"):
        load_hessians(code)
    not_square = tmp_path / "not_square.pt"
    torch.save({"format": "pgolf-hessians", "version": 1, "hessians": {"tok_emb.weight": torch.zeros(3, 4)}}, not_square)
    with pytest.raises(ValueError, match="not_square.pt: not a Hessians file"):
        load_hessians(not_square)
    untagged = tmp_path / "untagged.pt"
    torch.save({"tok_emb.weight": torch.eye(4)}, untagged)
    with pytest.raises(ValueError, match="untagged.pt: not a Hessians file"):
        load_hessians(untagged)
