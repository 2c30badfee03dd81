"""Rate-aware GPTQ: λ 0 is plain GPTQ, bits fall as λ grows, and the size limit holds as for every method."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pgolf.artifact.ans import code_bits
from pgolf.artifact.compress import compress
from pgolf.artifact.format import deserialize, serialize
from pgolf.artifact.size import SizeLimitError, pack_artifact, submission_bytes
from pgolf.artifact.tensors import QuantizedTensor, dequantize
from pgolf.config import CompressConfig, ConfigError, QuantizeConfig
from pgolf.pipeline import layout
from pgolf.quant.fit import quantize_for_size
from pgolf.quant.gptq import gptq_quantize, prepare_hessians, quantize_model
from pgolf.quant.lqer import h_weighted_error
from pgolf.quant.rate import RateTerms
from stages import quantize as stage
from tests.stages.test_quantize import CODE_BYTES, PIPELINE, model_with_hessians, small_workdir  # noqa: F401 (a fixture)

ANS = CompressConfig(compressor="ans")
ALL_GPTQ = QuantizeConfig(passthrough_max_numel=0)


def coded_bits(tensor: QuantizedTensor) -> float:
    """The bits of a tensor's codes under the model the ans coder fits to them."""
    codes = tensor.q.numpy()
    priced = code_bits(codes, tensor.bits)  # [cols, symbols]
    qmax = 2 ** (tensor.bits - 1) - 1
    return float(priced[torch.arange(codes.shape[1])[None, :].numpy(), codes.astype(int) + qmax].sum())


def test_lambda_zero_is_plain_gptq_and_a_negligible_lambda_picks_the_nearest_codes():
    model, hessians = model_with_hessians()
    plain, _ = quantize_model(model.config, model.state_dict(), hessians, ALL_GPTQ, show_progress=False)
    zero, _ = quantize_model(model.config, model.state_dict(), hessians,
                             dataclasses.replace(ALL_GPTQ, rate_lambda=0.0), show_progress=False)
    assert serialize(zero) == serialize(plain)
    # the rate-aware choice itself, with bits worth nothing next to the error: the nearest code, as GPTQ rounds
    weight, hessian = model.state_dict()["blocks.0.mlp.fc.weight"][None], hessians["blocks.0.mlp.fc.weight"][None]
    factors = prepare_hessians(hessian, 0.01)
    codes, scale, _ = gptq_quantize(weight, factors, [6], [12.85])
    rows, cols = weight.shape[1:]
    bits = torch.rand(1, cols, 63, generator=torch.Generator().manual_seed(0)) * 8  # arbitrary prices
    negligible = RateTerms(torch.full((1, rows), 1e12), torch.ones(1, cols), bits)
    chosen, _, _ = gptq_quantize(weight, factors, [6], [12.85], rate=negligible)
    assert torch.equal(chosen, codes)


def test_the_codes_bits_under_the_coders_model_fall_as_lambda_grows_and_the_error_rises():
    model, hessians = model_with_hessians()
    state = model.state_dict()
    totals, errors = [], []
    for rate_lambda in (0.0, 0.05, 0.2, 0.8):
        qm, _ = quantize_model(model.config, state, hessians, dataclasses.replace(ALL_GPTQ, rate_lambda=rate_lambda),
                               show_progress=False)
        quantized = {name: t for name, t in qm.tensors.items() if isinstance(t, QuantizedTensor)}
        decoded = dequantize(qm)
        totals.append(sum(coded_bits(t) for t in quantized.values()))
        errors.append(sum(h_weighted_error(state[n].float() - decoded[n], hessians[n]) for n in quantized))
    assert all(later < earlier for earlier, later in zip(totals, totals[1:])), totals
    assert all(later > earlier for earlier, later in zip(errors, errors[1:])), errors
    assert totals[-1] < 0.98 * totals[0]


def test_rate_aware_gptq_needs_sdclip_scales():
    with pytest.raises(ConfigError, match="rate_lambda"):
        QuantizeConfig(rate_lambda=0.1, scale_search="row_percentiles").check()
    with pytest.raises(ConfigError, match="allocate_rate_lambdas"):
        QuantizeConfig(method="allocate", allocate_rate_lambdas=[]).check()


@pytest.mark.parametrize("settings", [
    {"method": "allocate", "allocate_bits": [5, 6, 8], "allocate_clip_sigmas": [10.0, 16.0],
     "allocate_rate_lambdas": [0.0, 0.1, 0.4]},
    {"rate_lambda": 0.1, "fit_to_size": True, "fit_tolerance": 0.2},
    {"fit_to_size": True, "fit_knob": "rate_lambda", "fit_max_rate_lambda": 2.0, "fit_tolerance": 0.02},
], ids=["allocate", "clip_at_a_lambda", "lambda_searched"])
def test_the_stage_fits_the_size_limit_exactly_as_the_compress_stage_counts(small_workdir, settings):  # noqa: F811
    model, hessians = model_with_hessians()
    plain, _ = quantize_model(model.config, model.state_dict(), hessians, ALL_GPTQ, show_progress=False)
    limit = submission_bytes(plain, ANS, CODE_BYTES) - 4_000  # below the record's settings: something must give
    quantize = {"passthrough_max_numel": 0, "fit_margin_bytes": 1_500, **settings}
    stage.run({"quantize": quantize, "compress": {"compressor": "ans", "size_limit_bytes": limit}}, PIPELINE)
    raw = Path(layout.QUANTIZE_MODEL).read_bytes()
    compress_cfg = dataclasses.replace(ANS, size_limit_bytes=limit)
    total = len(compress(raw, compress_cfg)) + CODE_BYTES
    assert total <= limit
    pack_artifact(raw, compress_cfg, CODE_BYTES)  # the compress stage's gate passes
    with pytest.raises(SizeLimitError):
        pack_artifact(raw, dataclasses.replace(compress_cfg, size_limit_bytes=total - 1), CODE_BYTES)
    report = json.loads(Path(layout.QUANTIZE_REPORT).read_text())
    if settings.get("method") == "allocate":
        assert report["allocation"]["total_bytes"] == total
        assert any(entry["rate_lambda"] > 0 for entry in report["allocation"]["tensors"])
    else:
        assert report["fit"]["total_bytes"] == total and report["fit"]["knob"] == settings.get("fit_knob", "clip_sigmas")
    if settings.get("fit_knob") == "rate_lambda":  # the clip stayed; λ alone made the bytes
        assert report["fit"]["matrix_clip_sigmas"] == 12.85 and 0 < report["fit"]["rate_lambda"] <= 2.0
    assert isinstance(deserialize(raw).tensors["blocks.0.mlp.fc.weight"], QuantizedTensor)


def test_the_same_inputs_give_the_same_rate_aware_artifact():
    model, hessians = model_with_hessians()
    cfg = dataclasses.replace(ALL_GPTQ, rate_lambda=0.3)
    first = quantize_for_size(model.config, model.state_dict(), hessians, cfg, None, CODE_BYTES, "cpu")[0]
    again = quantize_for_size(model.config, model.state_dict(), hessians, cfg, None, CODE_BYTES, "cpu")[0]
    assert serialize(first) == serialize(again)
