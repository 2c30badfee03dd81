"""MuonEq-R against the reference's golden steps, and the optimiser groups of a GPT."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import ModelConfig, TrainConfig
from pgolf.model.gpt import GPT
from pgolf.train.optim import MuonEqR, build_optimizers, muon_momentum_at, newton_schulz, split_parameters

TINY = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                   rope_dims=8, rope_train_seq_len=16, xsa_last_n=2, num_loops=1, loop_start=0, loop_end=0)


def test_muon_three_steps_match_golden(golden):
    steps = golden["muon"]  # compact set: block 0's six matrices; the full set: every block's
    params = [torch.nn.Parameter(w.clone()) for w in steps["before"]]
    muon = MuonEqR(params, lr=steps["lr"], momentum=steps["momentum"], backend_steps=steps["backend_steps"],
                   weight_decay=steps["weight_decay"], row_normalize=steps["row_normalize"])
    previous = steps["before"]
    for grads, after in zip(steps["grads"], steps["after"], strict=True):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        muon.step()
        error = sum(((p.detach() - a) ** 2).sum() for p, a in zip(params, after)).sqrt()
        step_size = sum(((w - a) ** 2).sum() for w, a in zip(previous, after)).sqrt()
        assert error / step_size <= 0.1  # both sets' README tolerance; missing momentum gives ~1
        previous = after


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_is_near_orthogonal_bf16(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=5)
    assert x.dtype == torch.bfloat16 and x.shape == shape
    singular = torch.linalg.svdvals(x.float())
    # The quintic iteration maps every singular value into roughly [0.7, 1.2], not exactly 1.
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_muon_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.randn(8, 8))
    before = p.detach().clone()
    p.grad = torch.zeros(8, 8)  # a zero gradient orthogonalises to zero: only decay remains
    MuonEqR([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5, row_normalize=True).step()
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5), rtol=0, atol=0)


def test_muon_momentum_warmup_is_linear():
    cfg = TrainConfig(muon_momentum_warmup_start=0.92, muon_momentum=0.99, muon_momentum_warmup_steps=100)
    assert muon_momentum_at(0, cfg) == pytest.approx(0.92)
    assert muon_momentum_at(50, cfg) == pytest.approx(0.955)
    assert muon_momentum_at(100, cfg) == pytest.approx(0.99)
    assert muon_momentum_at(5000, cfg) == pytest.approx(0.99)


def _names(model, tensors):
    ids = {id(t) for t in tensors}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_parameter_groups_follow_the_reference():
    model = GPT(TINY)
    groups = split_parameters(model)
    assert _names(model, groups["token"]) == {"tok_emb.weight"}
    assert _names(model, groups["head"]) == set()
    matrices = _names(model, groups["matrix"])
    assert matrices == {n for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith(".weight")}
    control = _names(model, groups["control"])
    assert {"skip_weights", "skip_gates", "blocks.0.attn.q_gain", "blocks.1.resid_mix",
            "blocks.0.attn_scale", "blocks.0.mlp_scale"} <= control
    assert len(matrices) + len(control) + 1 == len(list(model.parameters()))


def test_build_optimizers_rates_and_untied_head():
    cfg = TrainConfig(tied_embed_lr=0.03, embed_lr=0.6, head_lr=0.008, scalar_lr=0.02, matrix_lr=0.02,
                      embed_wd=0.085, adam_wd=0.02, muon_wd=0.085)
    tied = build_optimizers(GPT(TINY), cfg)
    token, muon, control = tied.all
    assert (token.param_groups[0]["lr"], token.param_groups[0]["weight_decay"]) == (0.03, 0.085)
    assert (control.param_groups[0]["lr"], control.param_groups[0]["weight_decay"]) == (0.02, 0.02)
    assert muon is tied.muon and muon.param_groups[0]["weight_decay"] == 0.085
    untied = build_optimizers(GPT(ModelConfig(**{**TINY.__dict__, "tie_embeddings": False})), cfg)
    token, head, _, _ = untied.all
    assert token.param_groups[0]["lr"] == 0.6
    assert isinstance(head, torch.optim.Adam) and head.param_groups[0]["lr"] == 0.008
    untied.set_schedule(0.5, 0.95)
    assert head.param_groups[0]["lr"] == 0.004 and untied.muon.param_groups[0]["momentum"] == 0.95
