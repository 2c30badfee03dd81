"""The variants' model options at initialisation, and their configuration errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pgolf.config import ConfigError, ModelConfig, QuantizeConfig
from pgolf.model.gpt import GPT, SmearGate

BASE = ModelConfig(vocab_size=128, num_layers=4, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=2,
                   rope_dims=8, rope_train_seq_len=32, xsa_last_n=4, num_loops=0, skip_gates_enabled=False)


def noisy(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def logits_with_extras(extras: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a noisy model without the extras and of the same weights with them freshly initialised."""
    plain = noisy(BASE)
    torch.manual_seed(1)
    extended = GPT(dataclasses.replace(BASE, **extras)).eval()
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing  # only the extras keep their initialisation
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return plain.forward_logits(x), extended.forward_logits(x)


def test_bigram_hash_at_init_leaves_the_output_unchanged():
    plain, extended = logits_with_extras({"bigram_vocab_size": 256, "bigram_dim": 16})
    assert torch.equal(plain, extended)  # the table starts at zero (docs/VARIANTS.md §4.2)


def test_value_embeddings_at_init_leave_the_output_unchanged_below_64_wide():
    # The PRs zero the projection in the constructor; their orthogonal init replaces that only when both
    # dimensions are >= 64 (as at full size, 128 -> 512 or 256: there VE contributes from the first step).
    plain, extended = logits_with_extras({"ve_layers": [2, 3], "ve_dim": 16})
    assert torch.equal(plain, extended)


def test_full_width_value_embedding_and_bigram_projections_follow_pr576s_init():
    cfg = dataclasses.replace(BASE, model_dim=128, embedding_dim=128, num_heads=2, num_kv_heads=2, rope_dims=16,
                              bigram_vocab_size=256, bigram_dim=64, ve_layers=[3], ve_dim=64, scaled_proj_init=True)
    model = GPT(cfg)
    gain = 1 / math.sqrt(2 * cfg.num_layers)
    for proj in (model.bigram.proj.weight, model.ve_shared.proj.weight):  # [128, 64]: orthogonal columns
        torch.testing.assert_close(proj.T @ proj, gain**2 * torch.eye(64), atol=1e-5, rtol=0)
    assert torch.count_nonzero(model.bigram.embed.weight) == 0
    assert float(model.ve_shared.embed.weight.std()) == pytest.approx(0.01, rel=0.05)
    assert (float(model.bigram.scale), float(model.ve_shared.scale)) == pytest.approx((0.05, 0.1))
    unscaled = GPT(dataclasses.replace(cfg, scaled_proj_init=False))
    w = unscaled.ve_shared.proj.weight
    torch.testing.assert_close(w.T @ w, torch.eye(64), atol=1e-5, rtol=0)  # PR #1218: unscaled orthogonal


def test_smear_gate_mixes_each_position_with_the_previous():
    gate = SmearGate(4)
    x = torch.arange(12, dtype=torch.float32).view(1, 3, 4)  # [B, T, C]
    expected = torch.cat((0.5 * x[:, :1], 0.5 * x[:, 1:] + 0.5 * x[:, :-1]), dim=1)  # sigmoid(0) = 1/2
    torch.testing.assert_close(gate(x), expected)


def test_relu2_and_leaky_relu2_differ_only_below_zero():
    cfg = dataclasses.replace(BASE, mlp_activation="relu2")
    relu_mlp, leaky_mlp = GPT(cfg).blocks[0].mlp, GPT(BASE).blocks[0].mlp
    leaky_mlp.load_state_dict(relu_mlp.state_dict())
    with torch.no_grad():
        relu_mlp.fc.weight.abs_()
        leaky_mlp.fc.weight.copy_(relu_mlp.fc.weight)
        x = torch.rand(3, 32)  # positive inputs and weights: every pre-activation > 0
        torch.testing.assert_close(relu_mlp(x), leaky_mlp(x))
        torch.testing.assert_close(relu_mlp(-x), torch.zeros(3, 32))


@pytest.mark.parametrize("change, message", [
    ({"mlp_activation": "gelu"}, "mlp_activation"),
    ({"bigram_vocab_size": 1}, "bigram_vocab_size"),
    ({"ve_layers": [4]}, "ve_layers"),
    ({"ve_layers": [1, 1]}, "ve_layers"),
])
def test_bad_seed_options_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(BASE, **change)


@pytest.mark.parametrize("change, message", [
    ({"scale_search": "per_group"}, "scale_search"),
    ({"gptq_column_order": "random"}, "gptq_column_order"),
    ({"prune_fraction": 1.0}, "prune_fraction"),
    ({"fit_to_size": True, "scale_search": "row_percentiles"}, "fit_to_size"),
])
def test_bad_export_options_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        QuantizeConfig(**change)
