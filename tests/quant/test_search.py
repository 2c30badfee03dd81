"""The size search: bisection on a known size curve, and a clip that fits through the real compressor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.artifact.size import SizeFitError
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.quant.gptq import quantize_model
from pgolf.quant.search import fit_clip_sigmas, fit_quantize
from tests.quant.test_gptq import compressed_size, random_hessian


def test_bisection_on_a_monotone_size_curve_meets_the_margin():
    def size_at(clip: float) -> int:
        return int(2_000_000 / clip)

    cfg = QuantizeConfig(matrix_clip_sigmas=12.85, fit_margin_bytes=500, fit_tolerance=1e-4)
    result = fit_clip_sigmas(size_at, cfg, size_limit_bytes=100_000)  # fits from clip 20
    assert result.margin_met and 99_500 <= result.total_bytes <= 100_000
    assert 20.0 <= result.clip_sigmas < 20.2
    assert all(point.fits == (point.total_bytes <= 100_000) for point in result.points)
    with pytest.raises(SizeFitError, match=r"fit_max_clip_sigmas=64 gives 31,250 bytes, over the limit of 1,000 by 30,250"):
        fit_clip_sigmas(size_at, cfg, size_limit_bytes=1_000)


def test_fit_to_size_finds_a_fitting_clip_through_the_compressor():
    generator = torch.Generator().manual_seed(1)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(320, 256, generator=generator) for i in range(2)}
    hessians = {name: random_hessian(256, 512, generator) for name in state}
    cfg = CompressConfig(brotli_quality=5)
    model_config = ModelConfig()
    qcfg = QuantizeConfig(matrix_clip_sigmas=40.0, fit_margin_bytes=300, fit_tolerance=0.01)
    loose, _ = quantize_model(model_config, state, hessians, dataclasses.replace(qcfg, matrix_clip_sigmas=6.0), show_progress=False)
    tight, _ = quantize_model(model_config, state, hessians, dataclasses.replace(qcfg, matrix_clip_sigmas=24.0), show_progress=False)
    limit = (compressed_size(loose, cfg) + compressed_size(tight, cfg)) // 2
    qm, rows, fit = fit_quantize(model_config, state, hessians, qcfg, lambda m: compressed_size(m, cfg), limit)
    assert compressed_size(qm, cfg) == fit.total_bytes <= limit
    assert fit.margin_met or any(not p.fits and fit.clip_sigmas - p.clip_sigmas <= 0.01 for p in fit.points)
    assert 6.0 < fit.clip_sigmas < 24.0 and rows[0]["clip_sigmas"] == fit.clip_sigmas
    assert len(fit.points) >= 3 and not all(p.fits for p in fit.points)  # it bracketed the limit
