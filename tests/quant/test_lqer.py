"""LQER: the low-rank correction lowers the H-weighted error of what it touches, and never raises it."""

from __future__ import annotations

import torch

from pgolf.artifact.tensors import dequantize
from pgolf.config import QuantizeConfig
from pgolf.quant.gptq import quantize_model
from pgolf.quant.lqer import h_weighted_error, low_rank_correction
from tests.quant.test_allocate import model_with_hessians


def random_hessian(cols: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * cols, cols, generator=generator) * torch.linspace(0.2, 3.0, cols)  # [tokens, cols]
    return x.T @ x


def test_the_correction_lowers_the_h_weighted_error_and_more_rank_lowers_it_more():
    generator = torch.Generator().manual_seed(0)
    hessian = random_hessian(64, generator)
    residual = torch.randn(96, 8, generator=generator) @ torch.randn(8, 64, generator=generator) * 0.01 \
        + 0.002 * torch.randn(96, 64, generator=generator)  # low rank plus noise, as GPTQ's residual
    before = h_weighted_error(residual, hessian)
    errors = []
    for rank in (2, 4, 8):
        a, b = low_rank_correction(residual, hessian, rank, bits=4)
        assert a.q.shape == (96, rank) and b.q.shape == (rank, 64) and a.bits == b.bits == 4
        errors.append(h_weighted_error(residual - a.dequantize() @ b.dequantize(), hessian))
    assert errors[0] < before and errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.2 * before  # rank 8 takes most of a rank-8 residual, even in int4
    assert low_rank_correction(residual, hessian, 0, bits=4) is None


def test_a_correction_that_would_not_help_is_refused():
    generator = torch.Generator().manual_seed(1)
    hessian = random_hessian(32, generator)
    white = 1e-3 * torch.randn(32, 32, generator=generator)  # no structure: int2 factors only add error
    found = low_rank_correction(white, hessian, 1, bits=2)
    assert found is None or h_weighted_error(white - found[0].dequantize() @ found[1].dequantize(), hessian) \
        < h_weighted_error(white, hessian)


def test_in_the_model_lqer_touches_the_worst_tensors_and_lowers_their_error():
    model, hessians = model_with_hessians()
    state = model.state_dict()
    plain_cfg = QuantizeConfig(passthrough_max_numel=0, matrix_bits=5)
    plain, plain_rows = quantize_model(model.config, state, hessians, plain_cfg, show_progress=False)
    corrected, rows = quantize_model(model.config, state, hessians,
                                     QuantizeConfig(passthrough_max_numel=0, matrix_bits=5, lqer_rank=4,
                                                    lqer_max_tensors=3), show_progress=False)
    touched = [row["name"] for row in rows if row["lqer_rank"]]
    assert len(touched) == 3
    absolute = {r["name"]: h_weighted_error(state[r["name"]].float() - dequantize(plain)[r["name"]], hessians[r["name"]])
                for r in plain_rows if r["method"].startswith("gptq")}
    assert set(touched) == set(sorted(absolute, key=absolute.get, reverse=True)[:3])
    before = {r["name"]: r["h_rel_error"] for r in plain_rows}
    for row in rows:
        if row["name"] in touched:
            assert row["h_rel_error"] < before[row["name"]]
        else:
            assert row["h_rel_error"] == before[row["name"]]
    assert all(f"{name}.lqer_a" in corrected.tensors and f"{name}.lqer_b" in corrected.tensors for name in touched)
