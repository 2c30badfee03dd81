"""The model against the reference's golden outputs, and its structural facts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT, count_parameters, layer_order, sdpa_attention


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention written out in matrix products: the check for the fast paths; [B, T, H, D]."""
    group = q.size(2) // k.size(2)
    k = k.repeat_interleave(group, dim=2)  # [B, T, H, D]
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))  # [B, H, T, T]
    t = q.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", weights, v)  # [B, T, H, D]


def golden_model(golden, cfg: ModelConfig, looping: bool) -> GPT:
    model = GPT(cfg)
    model.load_state_dict(golden["state_dict"], strict=True)
    model.looping_active = looping
    return model.eval()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err <= rel, f"relative error {err:.3e} > {rel}"


def test_record_config_has_the_reference_parameter_count():
    assert count_parameters(GPT(ModelConfig())) == 35_943_512


def test_record_layer_order_with_looping():
    encoder, decoder = layer_order(ModelConfig(), looping=True)
    assert encoder + decoder == [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    assert len(encoder) == 7
    assert layer_order(ModelConfig(), looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])


def test_golden_layer_order(golden, golden_config):
    model = golden_model(golden, golden_config, looping=True)
    assert model.encoder_indices == list(golden["encoder_indices"])
    assert model.decoder_indices == list(golden["decoder_indices"])


def test_loads_reference_state_dict_names(golden, golden_config):
    assert set(GPT(golden_config).state_dict()) == set(golden["state_dict"])


@pytest.mark.parametrize("looping", [False, True], ids=["noloop", "loop"])
def test_golden_logits_and_loss(golden, golden_config, looping):
    # both sets: 1e-4 relative (compact: measured ~1e-7)
    suffix = "loop" if looping else "noloop"
    model = golden_model(golden, golden_config, looping)
    with torch.no_grad():
        logits = model.forward_logits(golden["x"])  # [B, 128, V]
        loss = model(golden["x"], golden["y"])
    expected = golden[f"logits_{suffix}"]  # [B, P, V]: the first P positions
    assert_rel_close(logits[:, : expected.size(1)], expected)
    assert loss.item() == pytest.approx(float(golden[f"loss_{suffix}"]), rel=1e-4)


def test_attention_paths_agree():
    torch.manual_seed(0)
    q = torch.randn(2, 33, 8, 16)  # [B, T, H, D]
    k = torch.randn(2, 33, 2, 16)  # [B, T, Hkv, D]
    v = torch.randn(2, 33, 2, 16)
    torch.testing.assert_close(sdpa_attention(q, k, v), math_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the flash paths")
def test_gpu_attention_matches_sdpa():
    from pgolf.model.gpt import causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 256, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 4, 4))
    torch.testing.assert_close(causal_attention(q, k, v), sdpa_attention(q, k, v), rtol=2e-2, atol=2e-2)


def test_rope_base_scales_beyond_training_length():
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=64, embedding_dim=64, num_heads=2,
                      num_kv_heads=1, rope_dims=8, rope_train_seq_len=16, num_loops=0, xsa_last_n=0)
    rotary = GPT(cfg).blocks[0].attn.rotary
    cos_short, _ = rotary.cos_sin(16, torch.device("cpu"), torch.float32)
    cos_long, _ = rotary.cos_sin(32, torch.device("cpu"), torch.float32)
    # The lowest frequency slows down when the context is longer than in training.
    assert not torch.allclose(cos_long[:, :16], cos_short)


def test_bad_loop_range_is_a_clear_error():
    with pytest.raises(ValueError, match="loop range"):
        GPT(ModelConfig(num_layers=4, loop_start=3, loop_end=5))
