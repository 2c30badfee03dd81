"""Calibration Hessians: parity with the reference, the file format and its errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from pgolf.model.gpt import GPT
from pgolf.quant.calibrate import (
    collect_hessians,
    collect_output_sensitivity,
    load_hessians,
    load_output_sensitivity,
    save_hessians,
)
from tests.quant.test_allocate import model_with_hessians


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


def test_output_sensitivity_is_the_mean_squared_per_token_gradient_of_each_output(tmp_path):
    model, hessians = model_with_hessians()
    batches = [torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sensitivity = collect_output_sensitivity(model, batches, "cpu", show_progress=False)
    assert set(sensitivity) == set(hessians)
    assert all(g.shape == (model.state_dict()[n].shape[0],) and bool((g >= 0).all()) for n, g in sensitivity.items())
    # the same quantity by autograd on one layer's output, per token
    layer = model.blocks[1].mlp.proj
    outputs = []

    def keep(module, inputs, out) -> None:
        out.retain_grad()
        outputs.append(out)

    handle = layer.register_forward_hook(keep)
    total, count = 0.0, 0
    for ids in batches:
        outputs.clear()
        logits = model.forward_logits(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        loss.backward()
        grads = outputs[0].grad.reshape(-1, outputs[0].shape[-1])  # per-token gradients [tokens, rows]
        total, count = total + grads.pow(2).sum(dim=0), count + grads.shape[0]
    handle.remove()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(sensitivity["blocks.1.mlp.proj.weight"], total / count, rtol=1e-4, atol=1e-12)
    save_hessians(tmp_path / "h.pt", hessians, sensitivity)
    assert load_hessians(tmp_path / "h.pt").keys() == hessians.keys()
    assert load_output_sensitivity(tmp_path / "h.pt").keys() == sensitivity.keys()
    save_hessians(tmp_path / "plain.pt", hessians)
    assert load_output_sensitivity(tmp_path / "plain.pt") == {}


def test_the_tied_embeddings_sensitivity_is_the_gradient_before_the_softcap():
    model, _ = model_with_hessians()
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))
    sensitivity = collect_output_sensitivity(model, [ids], "cpu", show_progress=False)["tok_emb.weight"]
    hidden = {}
    handle = model.final_norm.register_forward_hook(lambda m, i, out: hidden.setdefault("x", out.detach()))
    with torch.no_grad():
        model.forward_logits(ids[:, :-1])
    handle.remove()
    pre_cap = (hidden["x"] @ model.tok_emb.weight.T).detach().requires_grad_(True)  # [B, T, V]
    cap = model.config.logit_softcap
    loss = torch.nn.functional.cross_entropy((cap * torch.tanh(pre_cap / cap)).flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="sum")
    loss.backward()
    per_token = pre_cap.grad.reshape(-1, pre_cap.shape[-1])  # [tokens, V]
    torch.testing.assert_close(sensitivity, per_token.pow(2).mean(dim=0), rtol=1e-4, atol=1e-10)
