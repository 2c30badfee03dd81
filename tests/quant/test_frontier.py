"""The frontier's export (PR #1855): GPTQ at its per-group clips, QuantGate's rule, LQER asym.

Parity with ``../shared/golden/golden_frontier_tiny.pt`` (README "Frontier record"), which the
record's own ``gptq_mixed_quantize`` computed: ``quant_tiny`` (the tiny model's codes and scales,
each block matrix GPTQ'd by the record's name routing; its gates' int8 rows) and ``quant_mixed``
(the whole function on record-named matrices above its fp16 threshold: codes, gate rows, fp16
passthroughs, the LQER-asym factors of the 3 tensors of largest residual). Tolerances are the
README's: GPTQ codes ≥ 99.99 % equal and off by ≤ 1, scales equal; gate codes exact; LQER packing
exact on the record's unpacked factors, selection exact on its residual norms, end to end ≥ 99 %
of the factor codes equal and off by ≤ 1 (the SVD's last bits and signs are the library's).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.artifact.tensors import GroupedTensor, QuantizedModel, QuantizedTensor, dequantize
from pgolf.config import ModelConfig, QuantizeConfig
from pgolf.model.gpt import GPT
from pgolf.quant.calibrate import collect_hessians
from pgolf.quant.gptq import TensorPlan, quantize_model, tensor_plan
from pgolf.quant.lqer import frobenius_corrections, grouped_codes, pack_asymmetric, svd_factors
from stages.import_model import unbank_state_dict
from tests.conftest import _load, _require
from tests.model.test_frontier import GOLDEN, frontier_config

# The record's export settings (docs/ARTIFACT.md), as presets/frontier.yaml sets them.
RECORD = QuantizeConfig(embed_bits=7, embed_clip_sigmas=14.0, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0,
                        gate_int8=True, gate_rule="attn_gate_w", lqer_rank=4, lqer_max_tensors=3, lqer_mode="asym",
                        lqer_group=64)
LQER_KEYS = {"lqer_a": ("lqA_a", "lqAs_a"), "lqer_b": ("lqB_a", "lqBs_a")}  # pgolf's factor -> the record's names


def frontier_model_with_hessians(seed: int = 0) -> tuple[GPT, dict[str, torch.Tensor]]:
    """A random 2-layer model of width 128 with the frontier's gates (sparse attention gate 4×12, modded
    SmearGate, skip gates), whose matrices exceed the fp16 threshold when set to 0, and its Hessians."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=512, num_layers=2, model_dim=128, embedding_dim=128, num_heads=4,
                            num_kv_heads=2, rope_dims=8, xsa_last_n=2, num_loops=0, loop_start=0, loop_end=0,
                            attn_gate="sparse", smear_gate="modded"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batches = [torch.randint(0, 512, (2, 64)) for _ in range(2)]
    return model, collect_hessians(model, batches, "cpu", show_progress=False)


@pytest.fixture(scope="module")
def golden() -> dict:
    return _load(_require(GOLDEN))


def assert_codes_close(name: str, codes: torch.Tensor, expected: torch.Tensor, equal_share: float) -> None:
    diff = (codes.int() - expected.int()).abs()
    assert diff.max() <= 1, f"{name}: a code differs by {int(diff.max())}"
    assert (diff == 0).float().mean() >= equal_share, f"{name}: only {(diff == 0).float().mean():.5f} of codes equal"


def assert_record_tensor(name: str, stored, result: dict) -> None:
    """``stored`` (pgolf's) against the record's ``result`` entries of ``name``, by its storage method."""
    if name in result:  # fp16 passthrough
        assert torch.equal(stored, result[name]), name
    elif f"{name}.gq" in result:  # QuantGate's int8 rows
        assert isinstance(stored, QuantizedTensor) and stored.bits == 8
        assert torch.equal(stored.q, result[f"{name}.gq"]) and torch.equal(stored.scale, result[f"{name}.gs"]), name
    else:
        assert_codes_close(name, stored.q, result[f"{name}.q"], 0.9999)
        assert torch.equal(stored.scale, result[f"{name}.scale"]), name


def record_factor(result: dict, name: str) -> GroupedTensor:
    """The record's packed factor ``<tensor>.lqer_a`` / ``.lqer_b`` as pgolf's type."""
    tensor, factor = name.rsplit(".", 1)
    codes, scales = (result[f"{tensor}.{key}"] for key in LQER_KEYS[factor])
    group = codes.numel() // scales.numel()
    return GroupedTensor(codes, scales.reshape(-1), 2 if factor == "lqer_a" else 4, group)


# ------------------------------------------------------------------------------------ golden parity


def test_gptq_codes_and_scales_match_the_record_at_its_per_group_clips(golden):
    """quant_tiny: int6 attention at 13.0, int6 MLP at 11.5, int7 embedding at 14.0; the gates' int8 rows."""
    tiny = golden["quant_tiny"]
    hessians = dict(tiny["hessians"])
    for layer in range(golden["config"]["NUM_LAYERS"]):  # c_k, c_v share c_q's input (stored once)
        for key in ("c_k", "c_v"):
            hessians[f"blocks.{layer}.attn.{key}.weight"] = hessians[f"blocks.{layer}.attn.c_q.weight"]
    state = {name: t for name, t in unbank_state_dict(golden["state_dict"]).items()
             if name in hessians or name.endswith(".attn_gate_w")}
    qm, _ = quantize_model(frontier_config(golden["config"]), state, hessians,
                           dataclasses.replace(RECORD, passthrough_max_numel=0, lqer_rank=0), show_progress=False)
    checked = 0
    for name, expected in tiny["gptq"].items():
        stored = qm.tensors.get(name)
        if "gq" in expected:
            assert torch.equal(stored.q, expected["gq"]) and torch.equal(stored.scale, expected["gs"]), name
        elif name in hessians:
            assert (stored.bits, stored.clip_sigmas) == (expected["bits"], expected["clip_sigmas"]), name
            assert_codes_close(name, stored.q, expected["q"], 0.9999)
            assert torch.equal(stored.scale, expected["scale"]), name
        checked += stored is not None
    assert checked == len(hessians) + golden["config"]["NUM_LAYERS"]  # every matrix with a Hessian, every gate


def test_the_records_export_of_the_tiny_model_corrects_the_embedding(golden):
    """quant_tiny's gptq_mixed_quantize: below 65,536 elements everything but the gates stays fp16; the
    embedding, the only GPTQ tensor, gets the LQER-asym correction."""
    tiny = golden["quant_tiny"]
    state = unbank_state_dict(golden["state_dict"])
    qm, rows = quantize_model(frontier_config(golden["config"]), state, {"tok_emb.weight": tiny["hessians"]["tok_emb.weight"]},
                              RECORD, show_progress=False)
    expected = tiny["gptq_mixed_nonpassthrough"]
    methods = {row["name"]: row["method"] for row in rows}
    assert {name for name, method in methods.items() if method != "fp16"} == \
        {"tok_emb.weight"} | {name[:-3] for name in expected if name.endswith(".gq")}
    for name in (n for n in expected if n.endswith(".gq")):
        assert_record_tensor(name[:-3], qm.tensors[name[:-3]], expected)
    for factor in ("lqer_a", "lqer_b"):
        stored, record = qm.tensors[f"tok_emb.weight.{factor}"], record_factor(expected, f"tok_emb.weight.{factor}")
        assert isinstance(stored, GroupedTensor) and (stored.bits, stored.group_size) == (record.bits, record.group_size)
        assert_codes_close(factor, stored.q, record.q, 0.99)
        assert torch.allclose(stored.scale.float(), record.scale.float(), rtol=2e-3), factor  # 1 fp16 ulp


def test_the_records_export_of_record_named_matrices_end_to_end(golden):
    """quant_mixed: codes, the gate's int8 rows (the 24-element gate and skip_gates stay fp16), the LQER
    factors of the 3 tensors of largest residual, and what the artifact dequantizes to."""
    mixed = golden["quant_mixed"]
    qm, rows = quantize_model(ModelConfig(), mixed["state_dict"], mixed["hessians"], RECORD, show_progress=False)
    for name in mixed["state_dict"]:
        assert_record_tensor(name, qm.tensors[name], mixed["result"])
    chosen = [row["name"] for row in rows if row["lqer_rank"]]
    assert sorted(chosen) == sorted(mixed["lqer_chosen"]) and all(row["lqer_rank"] == 4 for row in rows
                                                                   if row["name"] in chosen)
    for name in mixed["lqer_chosen"]:
        for factor in ("lqer_a", "lqer_b"):
            stored, record = qm.tensors[f"{name}.{factor}"], record_factor(mixed["result"], f"{name}.{factor}")
            assert_codes_close(f"{name}.{factor}", stored.q, record.q, 0.99)
    decoded = dequantize(qm)
    for name, error in mixed["dequant_error_fro"].items():
        measured = float((mixed["state_dict"][name].float() - decoded[name]).norm())
        assert measured == pytest.approx(error, rel=1e-3), name


def test_lqer_asym_packing_is_the_records_on_its_own_factors(golden):
    mixed = golden["quant_mixed"]
    for name, factors in mixed["lqer_factors_before_packing"].items():
        assert factors["packing"] == "asym"
        a, b = pack_asymmetric(factors["A"], factors["B"], group=64, fallback_bits=4)
        for stored, factor in ((a, "lqer_a"), (b, "lqer_b")):
            record = record_factor(mixed["result"], f"{name}.{factor}")
            assert torch.equal(stored.q, record.q) and torch.equal(stored.scale, record.scale), f"{name}.{factor}"


def test_lqer_asym_selects_by_the_records_residual_norms(golden):
    """On the record's own codes the residual norms are its ``quant_error_fro`` and the choice its top 3."""
    mixed = golden["quant_mixed"]
    result, weights = mixed["result"], mixed["state_dict"]
    names = list(mixed["quant_error_fro"])
    tensors = {name: QuantizedTensor(result[f"{name}.q"], result[f"{name}.scale"], 6, 0.0) for name in names}
    for name in names:
        assert float((weights[name].float() - tensors[name].dequantize()).norm()) == mixed["quant_error_fro"][name]
    factors = frobenius_corrections(tensors, weights, names, rank=4, max_tensors=3, group=64, fallback_bits=4)
    assert {name.rsplit(".", 1)[0] for name in factors} == set(mixed["lqer_chosen"])


# ----------------------------------------------------------------------------- the record's rules


def test_clip_and_bit_routing_is_the_records_table():
    big = torch.zeros(1024, 512)
    assert tensor_plan("tok_emb.weight", big, RECORD) == TensorPlan("embed", 7, 14.0)
    assert tensor_plan("blocks.3.mlp.fc.weight", big, RECORD) == TensorPlan("mlp", 6, 11.5)
    assert tensor_plan("blocks.3.mlp.proj.weight", big.T, RECORD) == TensorPlan("mlp", 6, 11.5)
    for key in ("c_q", "c_k", "c_v", "proj"):
        assert tensor_plan(f"blocks.10.attn.{key}.weight", big, RECORD) == TensorPlan("attn", 6, 13.0)
    assert tensor_plan("lm_head.weight", big, RECORD) == TensorPlan("matrix", 6, 12.85)
    assert tensor_plan("blocks.0.mlp.fc.weight", torch.zeros(256, 256), RECORD).bits == 0  # 65,536: fp16


def test_quantgate_takes_the_attention_gates_in_its_size_range_and_nothing_else():
    plan = lambda name, shape, cfg=RECORD: tensor_plan(name, torch.randn(*shape), cfg)
    assert plan("blocks.4.attn.attn_gate_w", (8, 12)) == TensorPlan("gate", 8, 0.0, rounding="row_max")
    assert plan("blocks.4.attn.attn_gate_w", (8, 1024)).rounding == "row_max"  # 8,192: the upper bound
    assert plan("blocks.4.attn.attn_gate_w", (8, 1025)).bits == 0
    assert plan("blocks.4.attn.attn_gate_w", (2, 12)).bits == 0  # 24 < 32
    assert plan("blocks.4.attn.attn_gate_w", (96,)).bits == 0  # not 2-D
    for name, shape in (("skip_gates", (8, 512)), ("smear_gate.weight", (1, 12)), ("blocks.0.attn.gate_w", (8, 12))):
        assert plan(name, shape).bits == 0, name
    small_gates = dataclasses.replace(RECORD, gate_rule="small_gates")  # pgolf's rule stays reachable
    assert plan("skip_gates", (8, 512), small_gates).rounding == "row_max"
    assert plan("blocks.4.attn.attn_gate_w", (2, 12), small_gates).rounding == "row_max"


def test_lqer_asym_a_is_int2_with_one_scale_and_its_positive_extreme_decodes_to_one_step():
    a = torch.tensor([[0.3, -1.2], [3.0, 0.1], [-2.9, 0.0]])  # max |A| = 3.0, positive
    packed = grouped_codes(a, bits=2, group=a.numel())
    assert packed.scale.shape == (1,) and packed.scale.item() == pytest.approx(2.0, rel=1e-3)
    assert packed.q.tolist() == [[0, -1], [1, 0], [-1, 0]]  # 3.0 / 2.0 = 1.5 rounds to 2, clamps to 1
    assert packed.dequantize()[1, 0] == packed.scale.float().item()
    assert int(grouped_codes(-a, 2, a.numel()).q.min()) == -2  # the negative extreme keeps its code


def test_lqer_asym_b_round_trips_each_group_within_half_its_step():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(4, 192, generator=generator) * torch.logspace(-2, 1, 12).repeat_interleave(64).reshape(4, 192)
    packed = grouped_codes(b, bits=4, group=64)
    assert packed.scale.shape == (12,) and int(packed.q.min()) >= -8 and int(packed.q.max()) <= 7
    error = (packed.dequantize() - b).abs().reshape(12, 64)
    # half a step, plus what the fp16 rounding of the scale (2^-11 relative) moves a value 7.5 steps out
    assert (error <= packed.scale.float()[:, None] * (0.5 + 7.5 * 2**-11)).all()
    assert (error > 0.45 * packed.scale.float()[:, None]).any(dim=1).all()  # the positive extreme: 7.5 -> 7


def test_lqer_asym_factors_reproduce_a_rank_4_residual_and_fall_back_when_the_group_does_not_divide():
    generator = torch.Generator().manual_seed(1)
    residual = torch.randn(96, 4, generator=generator) @ torch.randn(4, 72, generator=generator)
    a, b = svd_factors(residual, rank=4)
    assert a.shape == (96, 4) and b.shape == (4, 72)
    assert torch.allclose(a @ b, residual, atol=1e-4)
    packed_a, packed_b = pack_asymmetric(a, b, group=64, fallback_bits=4)  # 288 values: not groups of 64
    assert isinstance(packed_a, QuantizedTensor) and isinstance(packed_b, QuantizedTensor) and packed_b.bits == 4


def test_lqer_asym_in_the_model_corrects_the_top_k_by_frobenius_norm_and_dequantization_adds_a_b():
    generator = torch.Generator().manual_seed(2)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(512, 256, generator=generator) * (1 + i) for i in range(4)}
    hessians = {name: torch.eye(256) for name in state}
    cfg = dataclasses.replace(RECORD, lqer_max_tensors=2)
    qm, _ = quantize_model(ModelConfig(), state, hessians, cfg, show_progress=False)
    corrected = sorted({name.rsplit(".", 1)[0] for name in qm.tensors if name.endswith(".lqer_a")})
    assert corrected == ["blocks.2.mlp.fc.weight", "blocks.3.mlp.fc.weight"]  # the largest weights, residuals
    plain = QuantizedModel(qm.model_config, {n: t for n, t in qm.tensors.items() if ".lqer_" not in n})
    for name in corrected:
        a, b = qm.tensors[f"{name}.lqer_a"], qm.tensors[f"{name}.lqer_b"]
        assert torch.equal(dequantize(qm)[name], dequantize(plain)[name] + a.dequantize() @ b.dequantize())
        assert (dequantize(qm)[name] - state[name]).norm() < (dequantize(plain)[name] - state[name]).norm()


def test_lqer_asym_with_the_allocator_is_refused():
    with pytest.raises(ValueError, match="lqer_mode.*method fixed"):
        QuantizeConfig(method="allocate", lqer_rank=4, lqer_mode="asym")
