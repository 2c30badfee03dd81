"""The frontier's model (PR #1855) against the golden outputs its own code computed, and its structure.

``../shared/golden/golden_frontier_tiny.pt`` (README "Frontier record"): a 7-layer, 64-wide model
with every option of the record's (looping 2–3, lanes from layer 5, sparse attention gate, BOS-masked
SmearGate, no rotary rescaling) run on one packed row of real documents with ``cu_seqlens``, and
on dense rows. Tolerances are the README's: hidden states, logits, NLL and losses within 1e-5
relative; the BOS isolation exact.
"""

from __future__ import annotations

import dataclasses
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from pgolf.config import ModelConfig
from pgolf.data.shards import BOS_ID
from pgolf.model.gpt import (
    GPT,
    count_parameters,
    document_attention,
    flex_document_attention,
    layer_order,
    sdpa_attention,
)
from stages.import_model import unbank_state_dict
from tests.conftest import SHARED_DIR, _load, _require, model_config_from_reference
from tests.model.test_gpt import assert_rel_close, math_attention

GOLDEN = SHARED_DIR / "golden" / "golden_frontier_tiny.pt"
# The record's full configuration (docs/FRONTIER.md): #1394's shape plus every frontier option.
FRONTIER = ModelConfig(qk_gain_init=5.0, num_loops=2, loop_start=3, loop_end=5, rope_ntk_scaling=False,
                       parallel_start_layer=8, attn_gate="sparse", attn_gate_scale=0.5, smear_gate="modded")


@pytest.fixture(scope="module")
def golden() -> dict:
    return _load(_require(GOLDEN))


def frontier_config(env: dict) -> ModelConfig:
    """A ModelConfig from the record's environment-variable settings, frontier options included."""
    base = model_config_from_reference(env)
    return dataclasses.replace(
        base, embedding_dim=base.model_dim, rope_ntk_scaling=bool(env["ROPE_YARN"]),
        parallel_start_layer=env["PARALLEL_START_LAYER"], parallel_final_lane=env["PARALLEL_FINAL_LANE"],
        attn_gate="sparse" if env["SPARSE_ATTN_GATE_ENABLED"] else "none",
        attn_gate_scale=env["SPARSE_ATTN_GATE_SCALE"], gate_window=env["GATE_WINDOW"],
        smear_gate="modded" if env["SMEAR_GATE_ENABLED"] else False)


def golden_model(golden: dict, looping: bool) -> GPT:
    model = GPT(frontier_config(golden["config"]))
    model.load_state_dict(unbank_state_dict(golden["state_dict"]), strict=True)
    model.looping_active = looping
    return model.eval()


def run(model: GPT, x: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(final-norm output [B, T, C], softcapped logits [B, T, V]) of one forward."""
    hidden = []
    handle = model.final_norm.register_forward_hook(lambda m, inp, out: hidden.append(out))
    with torch.no_grad():
        logits = model.forward_logits(x, cu_seqlens=cu_seqlens)
    handle.remove()
    return hidden[0], logits


def token_nll(logits: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten().long(), reduction="none")


def test_full_size_frontier_has_the_records_parameter_count(golden):
    assert count_parameters(GPT(FRONTIER)) == 35_945_671 == golden["f11_model_params"]
    shapes = {name: list(p.shape) for name, p in GPT(FRONTIER).named_parameters()}
    record = unbank_state_dict({name: torch.empty(shape, device="meta")
                                for name, shape in golden["f11_param_shapes"].items()})
    assert shapes == {name: list(t.shape) for name, t in record.items()}  # the record's names, unbanked


def test_golden_layer_order(golden):
    encoder, decoder = layer_order(frontier_config(golden["config"]), looping=True)
    assert (encoder, decoder) == (golden["model"]["encoder_indices"], golden["model"]["decoder_indices"])
    assert len(golden_model(golden, True).skip_weights) == golden["model"]["num_skip_weights"]
    assert layer_order(FRONTIER, looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])


@pytest.mark.parametrize("looping", [False, True], ids=["noloop", "loop"])
def test_golden_packed_row(golden, looping):
    """One packed row of 512 tokens, BOS at 0 and 174, segments capped at 128: varlen attention."""
    suffix = "loop" if looping else "noloop"
    ref = golden["model"]
    model = golden_model(golden, looping)
    hidden, logits = run(model, ref["x"], ref["cu_seqlens"])
    assert_rel_close(hidden[0], ref[f"hidden_{suffix}"], rel=1e-5)
    assert_rel_close(logits[0, ref["logit_positions"]], ref[f"logits_{suffix}"], rel=1e-5)
    nll = token_nll(logits, ref["y"])
    assert_rel_close(nll, ref[f"nll_{suffix}"], rel=1e-5)
    with torch.no_grad():
        loss = model(ref["x"], ref["y"].long(), cu_seqlens=ref["cu_seqlens"])
    assert loss.item() == pytest.approx(ref[f"loss_{suffix}"], rel=1e-5)


def test_golden_dense_rows(golden):
    """The same tokens as 4 rows of 128 without cu_seqlens: causal attention across documents (calibration)."""
    ref = golden["model"]
    model = golden_model(golden, looping=True)
    _, logits = run(model, ref["dense_x"], None)
    assert_rel_close(token_nll(logits, ref["y"].view(4, 128)), ref["dense_nll_loop"], rel=1e-5)


def test_a_document_does_not_see_the_previous_one(golden):
    """Changing document N (here: all of it, and the token right before the BOS) leaves document N+1 exact.

    Both leaks the record closed are covered: attention stays in its segment, and the SmearGate does not
    carry the last token of document N into the BOS of N+1 (#1797 → #1855). Dense attention does leak,
    so the test can fail.
    """
    ref = golden["model"]
    second_bos = 174
    assert ref["x"][0, second_bos] == BOS_ID
    model = golden_model(golden, looping=True)
    changed = ref["x"].clone()
    changed[0, 1:second_bos] = torch.randint(2, 8192, (second_bos - 1,), generator=torch.Generator().manual_seed(0))
    for x in (changed, _with(ref["x"], ref["bos_isolation"]["changed_pos"], ref["bos_isolation"]["new_id"])):
        _, before = run(model, ref["x"], ref["cu_seqlens"])
        _, after = run(model, x, ref["cu_seqlens"])
        assert torch.equal(after[:, second_bos:], before[:, second_bos:])
        assert not torch.equal(after[:, :second_bos], before[:, :second_bos])
        _, dense_before = run(model, ref["x"], None)
        _, dense_after = run(model, x, None)
        assert not torch.equal(dense_after[:, second_bos:], dense_before[:, second_bos:])


def test_smear_gate_reaches_the_next_token_except_at_a_bos(golden):
    """The mask is what isolates the BOS: the same change before a non-BOS token moves that token."""
    model = golden_model(golden, looping=False)
    ids = torch.tensor([[BOS_ID, 500, 600, BOS_ID, 700]])
    embedded = model.embed(ids)
    for position, is_bos in ((2, False), (3, True)):
        changed = ids.clone()
        changed[0, position - 1] = 900
        moved = not torch.equal(model.embed(changed)[0, position], embedded[0, position])
        assert moved != is_bos


def _with(x: Tensor, position: int, token: int) -> Tensor:
    x = x.clone()
    x[0, position] = token
    return x


# ---------------------------------------------------------------- the packed-row attention paths


def one_document_qkv(length: int = 70) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, length, heads, 16, generator=generator) for heads in (4, 2, 2))


EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@EAGER_FLEX
@pytest.mark.parametrize("path", ["sdpa", "flex"])
def test_packed_attention_of_one_document_is_dense_causal_attention(path):
    q, k, v = one_document_qkv()
    cu_seqlens = torch.tensor([0, 70] + [70] * 62, dtype=torch.int32)  # padded to 64 entries, as the loader
    attention = document_attention(cu_seqlens, 70) if path == "sdpa" else flex_document_attention(cu_seqlens, 70)
    torch.testing.assert_close(attention(q, k, v), sdpa_attention(q, k, v), rtol=1e-5, atol=1e-5)


@EAGER_FLEX
@pytest.mark.parametrize("path", ["sdpa", "flex"])
def test_packed_attention_is_attention_within_each_segment(path):
    q, k, v = one_document_qkv()
    bounds = [0, 9, 40, 41, 70]
    cu_seqlens = torch.tensor(bounds + [70] * 3, dtype=torch.int32)
    attention = document_attention(cu_seqlens, 70) if path == "sdpa" else flex_document_attention(cu_seqlens, 70)
    expected = torch.cat([math_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in pairwise(bounds)], dim=1)
    torch.testing.assert_close(attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_packed_row_of_one_document_equals_the_dense_model(golden):
    model = golden_model(golden, looping=True)
    x = golden["model"]["x"][:, :128]  # the first document's first 128 tokens, BOS at 0
    cu_seqlens = torch.tensor([0, 128] + [128] * 62, dtype=torch.int32)
    torch.testing.assert_close(run(model, x, cu_seqlens)[1], run(model, x, None)[1], rtol=1e-5, atol=1e-5)


def test_packed_rows_are_one_row():
    model = GPT(dataclasses.replace(FRONTIER, num_layers=2, model_dim=32, embedding_dim=32, num_heads=2,
                                    num_kv_heads=1, rope_dims=8, vocab_size=64, num_loops=0, parallel_start_layer=1))
    with pytest.raises(ValueError, match="one packed row"):
        model.forward_logits(torch.zeros(2, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_pgolf_import_reads_the_records_banked_weights(golden, tmp_path):
    """A final_model.pt of #1855 keeps its matrices in banks; `pgolf import` writes them under pgolf's names."""
    from pgolf.model.files import build_model
    from stages.import_model import import_model

    source = tmp_path / "final_model.pt"
    torch.save(golden["state_dict"], source)
    import_model(source, frontier_config(golden["config"]), tmp_path / "model.pt")
    model = build_model(tmp_path / "model.pt").eval()
    model.looping_active = True
    ref = golden["model"]
    assert_rel_close(token_nll(run(model, ref["x"], ref["cu_seqlens"])[1], ref["y"]), ref["nll_loop"], rel=1e-5)
    truncated = dict(golden["state_dict"], kv_bank=golden["state_dict"]["kv_bank"][:5])
    with pytest.raises(ValueError, match=r"kv_bank \(5 slots\)"):
        unbank_state_dict(truncated)


@pytest.mark.parametrize("change, message", [
    ({"parallel_start_layer": 4}, "parallel_start_layer"),  # inside the loop range 3..5
    ({"parallel_start_layer": 11}, "parallel_start_layer"),
    ({"gate_window": 600}, "gate_window"),
    ({"attn_gate": "dense"}, "attn_gate"),
    ({"smear_gate": "bos"}, "smear_gate"),
])
def test_bad_frontier_options_are_refused(change, message):
    from pgolf.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(FRONTIER, **change)


def test_modded_smear_gate_at_init_leaves_the_output_unchanged():
    from tests.model.test_variants import logits_with_extras

    plain, extended = logits_with_extras({"smear_gate": "modded"})  # λ = 0: identity at initialisation
    assert torch.equal(plain, extended)


def test_lora_reaches_every_slot_of_the_lanes(golden):
    """TTT's adapters (pgolf/eval/lora.py) reach the parallel blocks; zero B leaves the logits exact."""
    from pgolf.eval.lora import DocumentLoRA

    model = golden_model(golden, looping=True)
    x = golden["model"]["dense_x"][:1]  # one 128-token row
    lora = DocumentLoRA(model, num_docs=1, rank=2)
    lora.reset([0])
    with torch.no_grad():
        plain = model.forward_logits(x)
        assert torch.equal(model.forward_logits(x, adapter=lora), plain)
        last_slot = lora.num_slots - 1  # layer 6: a lane layer
        for kind in ("q", "k", "v", "o", "mlp"):
            factor = lora.factors[(last_slot, kind)]
            lora.B.zero_()
            lora.B[0, factor.b_offset: factor.b_offset + factor.out_features * lora.rank] = 0.1
            assert not torch.equal(model.forward_logits(x, adapter=lora), plain), kind
