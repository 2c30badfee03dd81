"""GPTQ + SDClip: parity with the reference's codes and scales, plans, the size knob, size targeting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.artifact.compress import compress
from pgolf.artifact.format import serialize
from pgolf.artifact.tensors import QuantizedTensor
from pgolf.config import CompressConfig, ConfigError, QuantizeConfig
from pgolf.quant.gptq import (
    TensorPlan,
    check_hessians,
    factor_error,
    gptq_quantize,
    hessian_error,
    prepare_hessians,
    quantize_model,
    tensor_plan,
)
from pgolf.quant.rate import RateTerms
from pgolf.quant.sensitivity import collect_output_sensitivity
from tests.quant.test_allocate import model_with_hessians

ALL_GPTQ = QuantizeConfig(passthrough_max_numel=0)  # both golden sets quantize every linear


def assert_codes_match(name: str, codes: torch.Tensor, golden_codes: torch.Tensor) -> None:
    diff = (codes.int() - golden_codes.int()).abs()
    assert diff.max() <= 1, f"{name}: a code differs by {int(diff.max())}"
    assert (diff == 0).float().mean() >= 0.999, f"{name}: only {(diff == 0).float().mean():.5f} of codes equal"


def random_hessian(cols: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, cols, generator=generator) * torch.rand(cols, generator=generator)  # [tokens, cols]
    return x.T @ x / tokens


def test_each_tensor_matches_reference_codes_and_scales(golden):
    for name, entry in golden["gptq"].items():
        weight = golden["state_dict"][name]
        factors = prepare_hessians(entry["H"][None], damping=0.01)
        codes, scales, _ = gptq_quantize(weight[None], factors, [entry["bits"]], [entry["clip_sigmas"]])
        assert_codes_match(name, codes[0], entry["q"])
        assert torch.equal(scales[0], entry["scale"]), f"{name}: scales differ"


def test_quantize_model_batches_same_shapes_and_matches_reference(golden, golden_config):
    hessians = {name: entry["H"] for name, entry in golden["gptq"].items()}
    qm, rows = quantize_model(golden_config, golden["state_dict"], hessians, ALL_GPTQ, show_progress=False)
    for name, entry in golden["gptq"].items():
        tensor = qm.tensors[name]
        assert isinstance(tensor, QuantizedTensor) and tensor.bits == entry["bits"]
        assert tensor.clip_sigmas == entry["clip_sigmas"]
        assert_codes_match(name, tensor.q, entry["q"])
        assert torch.equal(tensor.scale, entry["scale"])
    small = [name for name in golden["state_dict"] if name not in golden["gptq"]]
    assert all(qm.tensors[name].dtype == torch.float16 for name in small)
    by_name = {row["name"]: row for row in rows}
    assert by_name["tok_emb.weight"]["method"] == "gptq int8" and by_name["skip_weights"]["method"] == "fp16"
    assert 0 < by_name["blocks.0.mlp.fc.weight"]["h_rel_error"] < 0.05
    for name in ("blocks.0.mlp.fc.weight", "tok_emb.weight"):  # GPTQ's own error term, measured through H
        decoded = qm.tensors[name].dequantize()
        measured = hessian_error(golden["state_dict"][name], decoded, hessians[name])
        assert by_name[name]["h_rel_error"] == pytest.approx(measured, rel=1e-4)


def test_plan_passthrough_groups_and_overrides():
    cfg = QuantizeConfig(mlp_bits=5, mlp_clip_sigmas=12.0, attn_clip_sigmas=13.0, embed_bits=7, embed_clip_sigmas=15.0)
    big = torch.zeros(512, 512)
    assert tensor_plan("blocks.0.mlp.fc.weight", big, cfg) == TensorPlan("mlp", 5, 12.0)
    assert tensor_plan("blocks.0.attn.c_q.weight", big, cfg) == TensorPlan("attn", 6, 13.0)
    assert tensor_plan("tok_emb.weight", big, cfg) == TensorPlan("embed", 7, 15.0)
    assert tensor_plan("head_proj.weight", big, cfg) == TensorPlan("matrix", 6, 12.85)
    assert tensor_plan("blocks.0.mlp.fc.weight", torch.zeros(256, 256), cfg).bits == 0  # 65,536 elements: fp16
    assert tensor_plan("skip_weights", big, dataclasses.replace(cfg, passthrough_max_numel=0)).bits == 0
    with pytest.raises(ConfigError, match="bits"):
        tensor_plan("blocks.0.mlp.fc.weight", big, dataclasses.replace(cfg, mlp_bits=9))


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_codes_stay_in_range_and_gptq_beats_rounding(bits):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(96, 160, generator=generator)
    hessian = random_hessian(160, 400, generator)
    codes, scales, _ = gptq_quantize(weight[None], prepare_hessians(hessian[None], 0.01), [bits], [2.5], block_size=64)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() == qmax  # a 2.5-sigma clip saturates, never overflows
    rounded = (weight / scales[0].float()[:, None]).round().clamp(-qmax, qmax)  # [rows, cols]
    gptq_error = hessian_error(weight, codes[0].float() * scales[0].float()[:, None], hessian)
    rtn_error = hessian_error(weight, rounded * scales[0].float()[:, None], hessian)
    assert gptq_error < 0.85 * rtn_error  # about 0.75 on these shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hessians_on", ["cpu", "cuda"])
def test_quantize_model_on_cuda_gives_the_cpus_codes_and_report(golden, golden_config, hessians_on):
    """The quantize stage and the exported runner run GPTQ on the GPU while the weights (and the stage's
    Hessians) are on the CPU: the report's errors are measured where GPTQ's factors live."""
    hessians = {name: entry["H"] for name, entry in golden["gptq"].items()}
    on_cpu, cpu_rows = quantize_model(golden_config, golden["state_dict"], hessians, ALL_GPTQ, show_progress=False)
    on_gpu, gpu_rows = quantize_model(golden_config, golden["state_dict"],
                                      {name: h.to(hessians_on) for name, h in hessians.items()}, ALL_GPTQ, "cuda",
                                      show_progress=False)
    for name in golden["gptq"]:
        assert on_gpu.tensors[name].q.device.type == "cpu"
        assert_codes_match(name, on_gpu.tensors[name].q, on_cpu.tensors[name].q)
    for cpu_row, gpu_row in zip(cpu_rows, gpu_rows, strict=True):
        if cpu_row["h_rel_error"] is not None:
            assert gpu_row["h_rel_error"] == pytest.approx(cpu_row["h_rel_error"], rel=1e-2), cpu_row["name"]


@pytest.mark.parametrize("rate_aware", [False, True])
def test_gptqs_own_residuals_give_the_reports_error_without_a_product_by_the_factor(rate_aware):
    """‖ΔR‖² = Σ_k (w′_k − q_k s)²·R_kk²: the report's error from GPTQ's residuals is the error
    measured through the factor and through H itself, for any code choice, dead columns included."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 160, generator=generator)
    hessian = random_hessian(160, 400, generator)
    hessian[:, 7] = 0.0
    hessian[7, :] = 0.0
    factors = prepare_hessians(hessian[None], 0.01)
    prices = RateTerms(torch.full((1, 96), 0.5), torch.ones(1, 160), torch.rand(1, 160, 63, generator=generator) * 8)
    codes, scales, energy = gptq_quantize(weight[None], factors, [6], [12.85], block_size=64,
                                          rate=prices if rate_aware else None)
    approx = codes[0].float() * scales[0].float()[:, None]  # [rows, cols]
    through_factor = factor_error(weight, approx, factors, 0)
    assert factor_error(weight, approx, factors, 0, float(energy[0])) == pytest.approx(through_factor, rel=1e-5)
    assert through_factor == pytest.approx(hessian_error(weight, approx, hessian), rel=1e-4)


def test_dead_columns_and_zero_rows_give_finite_zero_codes():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 32, generator=generator)
    weight[3] = 0.0
    hessian = random_hessian(32, 100, generator)
    hessian[:, 5] = 0.0
    hessian[5, :] = 0.0
    codes, scales, _ = gptq_quantize(weight[None], prepare_hessians(hessian[None], 0.01), [6], [12.85])
    assert torch.isfinite(scales.float()).all() and (scales > 0).all()
    assert (codes[0, 3] == 0).all() and (codes[0, :, 5] == 0).all()


def test_missing_or_misshapen_hessian_is_named():
    state = {"blocks.0.mlp.fc.weight": torch.randn(300, 256), "blocks.0.attn.c_q.weight": torch.randn(300, 256)}
    with pytest.raises(ValueError, match=r"no Hessian for blocks\.0\.attn\.c_q\.weight"):
        check_hessians(state, {"blocks.0.mlp.fc.weight": torch.eye(256)}, QuantizeConfig())
    bad = {"blocks.0.mlp.fc.weight": torch.eye(256), "blocks.0.attn.c_q.weight": torch.eye(300)}
    with pytest.raises(ValueError, match=r"c_q\.weight: Hessian shape \(300, 300\), expected \(256, 256\)"):
        check_hessians(state, bad, QuantizeConfig())


def compressed_size(qm, cfg: CompressConfig) -> int:
    return len(compress(serialize(qm), cfg))


def test_raising_clip_sigmas_shrinks_the_compressed_artifact(golden, golden_config):
    blocks = {name: t for name, t in golden["state_dict"].items() if name.startswith("blocks.")}
    hessians = {name: entry["H"] for name, entry in golden["gptq"].items()}
    cfg = CompressConfig()  # the record's brotli-11 with the stride-2 shuffle
    sizes = []
    for clip in (8.0, 12.85, 20.0):
        qcfg = dataclasses.replace(ALL_GPTQ, matrix_clip_sigmas=clip)
        qm, _ = quantize_model(golden_config, blocks, hessians, qcfg, show_progress=False)
        sizes.append(compressed_size(qm, cfg))
    assert sizes[0] > sizes[1] > sizes[2], sizes


def test_embed_gptq_off_rounds_the_embedding_to_nearest(golden, golden_config):
    hessians = {name: entry["H"] for name, entry in golden["gptq"].items()}
    cfg = dataclasses.replace(ALL_GPTQ, embed_gptq=False)
    qm, _ = quantize_model(golden_config, golden["state_dict"], hessians, cfg, show_progress=False)
    embedding = golden["state_dict"]["tok_emb.weight"]  # [V, C]
    tensor = qm.tensors["tok_emb.weight"]
    qmax = 2 ** (cfg.embed_bits - 1) - 1
    rounded = torch.clamp(torch.round(embedding / tensor.scale.float()[:, None]), -qmax, qmax)
    assert torch.equal(tensor.q.to(torch.float32), rounded)
    # the matrices still get GPTQ with their Hessians
    assert_codes_match("blocks.0.mlp.fc.weight", qm.tensors["blocks.0.mlp.fc.weight"].q,
                       golden["gptq"]["blocks.0.mlp.fc.weight"]["q"])


def test_hessian_sdclip_at_lambda_zero_is_sdclip_and_widens_the_clip_of_the_rows_that_matter():
    model, hessians = model_with_hessians()
    state = model.state_dict()
    base = QuantizeConfig(passthrough_max_numel=0)
    sdclip, _ = quantize_model(model.config, state, hessians, base, show_progress=False)
    flat, _ = quantize_model(model.config, state, hessians,
                             dataclasses.replace(base, scale_search="hessian_sdclip", hessian_clip_lambda=0.0),
                             show_progress=False)
    assert serialize(flat) == serialize(sdclip)
    aware, _ = quantize_model(model.config, state, hessians,
                              dataclasses.replace(base, scale_search="hessian_sdclip"), show_progress=False)
    name = "blocks.0.mlp.fc.weight"
    weight, diag = state[name].float(), hessians[name].diagonal()
    energy = (weight.pow(2) * diag).sum(dim=1)  # [rows]
    ratio = aware.tensors[name].scale.float() / sdclip.tensors[name].scale.float()  # [rows]
    assert float(torch.corrcoef(torch.stack([ratio, energy]))[0, 1]) > 0.9
    assert abs(float(ratio.mean()) - 1.0) < 0.02  # the factors average 1 (up to the cap on r)


def test_gate_int8_rounds_the_gates_to_int8_rows_and_leaves_other_control_tensors():
    cfg = QuantizeConfig(gate_int8=True)
    gates = torch.randn(4, 192)
    assert tensor_plan("skip_gates", gates, cfg).rounding == "row_max"
    assert tensor_plan("skip_gates", gates, QuantizeConfig()).bits == 0
    assert tensor_plan("skip_weights", gates, cfg).bits == 0
    assert tensor_plan("blocks.0.attn.attn_gate_w", torch.randn(8, 512), cfg).bits == 8
    model, hessians = model_with_hessians()
    qm, rows = quantize_model(model.config, model.state_dict(), hessians, cfg, show_progress=False)
    stored = qm.tensors["skip_gates"]
    assert isinstance(stored, QuantizedTensor) and stored.bits == 8
    assert torch.allclose(stored.dequantize(), model.state_dict()["skip_gates"], atol=float(stored.scale.max()) / 2 + 1e-6)
    assert next(r for r in rows if r["name"] == "skip_gates")["method"] == "round int8"


def test_loss_sdclip_gives_each_row_the_step_its_output_sensitivity_asks_for():
    model, hessians = model_with_hessians()
    state = model.state_dict()
    batches = [torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sensitivity = collect_output_sensitivity(model, batches, "cpu", show_progress=False)
    cfg = QuantizeConfig(passthrough_max_numel=0, scale_search="loss_sdclip")
    with pytest.raises(ValueError, match="calibrate.output_sensitivity"):
        quantize_model(model.config, state, hessians, cfg, show_progress=False)
    aware, _ = quantize_model(model.config, state, hessians, cfg, show_progress=False, sensitivity=sensitivity)
    plain, _ = quantize_model(model.config, state, hessians, QuantizeConfig(passthrough_max_numel=0),
                              show_progress=False)
    name = "blocks.1.attn.c_q.weight"
    factor = aware.tensors[name].scale.float() / plain.tensors[name].scale.float()  # [rows]
    assert abs(float(factor.log().mean())) < 0.05  # bytes about the same: geometric mean 1
    expected = (sensitivity[name] * state[name].float().var(dim=1)).pow(-0.5)
    inside = (factor > 0.34) & (factor < 2.9)  # away from the clamp
    assert float(torch.corrcoef(torch.stack([factor[inside].log(), expected[inside].log()]))[0, 1]) > 0.99
