"""Output sensitivity: each row's mean squared per-token loss gradient, against autograd, and its file."""

from __future__ import annotations

import torch

from pgolf.quant.hessians import load_hessians, load_output_sensitivity, save_hessians
from pgolf.quant.sensitivity import collect_output_sensitivity
from tests.quant.test_allocate import model_with_hessians


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
