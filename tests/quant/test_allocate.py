"""Rate–distortion allocation: the λ-search against brute force, the real size limit, determinism."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from pgolf.artifact.compress import compress
from pgolf.artifact.format import deserialize, serialize
from pgolf.artifact.size import SizeFitError, SizeLimitError, pack_artifact, submission_bytes
from pgolf.artifact.tensors import QuantizedTensor, dequantize
from pgolf.config import CompressConfig, QuantizeConfig
from pgolf.pipeline import layout
from pgolf.quant.allocate import allocate, allocate_model, allocate_within, assemble, lower_hull, model_candidates
from pgolf.quant.gptq import quantize_model
from pgolf.quant.lqer import h_weighted_error
from pgolf.quant.sensitivity import collect_output_sensitivity
from stages import quantize as stage
from tests.stages.test_quantize import CODE_BYTES, PIPELINE, model_with_hessians, small_workdir  # noqa: F401 (a fixture)

FAST = CompressConfig(brotli_quality=5)


def brute_force(candidates: dict[str, list[tuple[int, float]]], budget: int) -> float:
    """The least total distortion over every combination whose rate fits."""
    names = sorted(candidates)
    best = float("inf")
    for combo in itertools.product(*(candidates[n] for n in names)):
        if sum(r for r, _ in combo) <= budget:
            best = min(best, sum(d for _, d in combo))
    return best


def convex_unit_steps(generator: torch.Generator, tensors: int, options: int) -> dict[str, list[tuple[int, float]]]:
    """Candidates whose rates rise by one unit and whose savings shrink: the greedy λ-walk is exact."""
    problem = {}
    for t in range(tensors):
        savings = sorted(torch.rand(options - 1, generator=generator).tolist(), reverse=True)
        distortion = [1.0 + sum(savings)]
        for saving in savings:
            distortion.append(distortion[-1] - saving)
        problem[f"t{t}"] = [(10 + step, d) for step, d in enumerate(distortion)]
    return problem


def test_the_allocation_is_the_optimum_of_a_problem_with_a_known_optimum():
    generator = torch.Generator().manual_seed(0)
    problem = convex_unit_steps(generator, tensors=4, options=5)
    for budget in range(40, 57):
        allocation = allocate(problem, budget)
        assert allocation.rate <= budget
        assert allocation.distortion == pytest.approx(brute_force(problem, budget), abs=1e-12), budget


def breakpoint_rates(problem: dict[str, list[tuple[int, float]]]) -> list[int]:
    """The total rates of the λ-solutions: every prefix of all hull segments sorted by slope."""
    segments = []
    for name, points in problem.items():
        hull = lower_hull(points)
        for low, high in zip(hull, hull[1:]):
            slope = (points[high][1] - points[low][1]) / (points[high][0] - points[low][0])
            segments.append((slope, points[high][0] - points[low][0]))
    rate = sum(points[lower_hull(points)[0]][0] for points in problem.values())
    rates = [rate]
    for _, extra in sorted(segments):
        rate += extra
        rates.append(rate)
    return rates


def test_at_every_lambda_solution_the_allocation_is_optimal_for_arbitrary_candidates():
    generator = torch.Generator().manual_seed(1)
    problem = {f"t{t}": [(int(r), float(d)) for r, d in zip(torch.randint(5, 60, (5,), generator=generator),
                                                                torch.rand(5, generator=generator) * 10)]
               for t in range(4)}
    rates = breakpoint_rates(problem)
    assert len(rates) > 4
    for budget in rates:  # a Lagrangian solution is the optimum at its own rate
        assert allocate(problem, budget).distortion == pytest.approx(brute_force(problem, budget), abs=1e-12)
    for budget in range(rates[0], rates[-1], 5):  # between them it fills, never worse than the last λ-solution
        allocation = allocate(problem, budget)
        below = max(r for r in rates if r <= budget)
        assert allocation.rate <= budget
        assert brute_force(problem, budget) - 1e-12 <= allocation.distortion <= allocate(problem, below).distortion
    with pytest.raises(ValueError, match="cheapest"):
        allocate(problem, rates[0] - 1)


def test_the_hull_drops_dominated_and_concave_points():
    points = [(10, 5.0), (12, 5.0), (20, 3.0), (30, 2.9), (40, 0.5), (15, 6.0)]
    assert lower_hull(points) == [0, 2, 4]


ALLOCATE = QuantizeConfig(passthrough_max_numel=0, method="allocate", allocate_bits=[5, 6, 8],
                          allocate_clip_sigmas=[10.0, 16.0], fit_margin_bytes=500)


def allocated(limit: int, cfg: QuantizeConfig = ALLOCATE):
    model, hessians = model_with_hessians()
    compress_cfg = CompressConfig(brotli_quality=5, size_limit_bytes=limit)
    return allocate_model(model.config, model.state_dict(), hessians, cfg, compress_cfg,
                          lambda qm: submission_bytes(qm, compress_cfg, CODE_BYTES), show_progress=False)


def int6_bytes() -> int:
    """The submission bytes of the record's settings (int6 at 12.85 sigmas, int8 embedding) on the small model."""
    model, hessians = model_with_hessians()
    qm, _ = quantize_model(model.config, model.state_dict(), hessians, QuantizeConfig(passthrough_max_numel=0),
                           show_progress=False)
    return submission_bytes(qm, FAST, CODE_BYTES)


def test_the_allocation_fits_the_limit_as_the_compress_stage_counts_and_is_deterministic():
    limit = int6_bytes()
    qm, rows, result = allocated(limit)
    raw = serialize(qm)
    compress_cfg = CompressConfig(brotli_quality=5, size_limit_bytes=limit)
    assert result.total_bytes == len(compress(raw, compress_cfg)) + CODE_BYTES <= limit
    pack_artifact(raw, compress_cfg, CODE_BYTES)  # the gate passes
    with pytest.raises(SizeLimitError):
        pack_artifact(raw, CompressConfig(brotli_quality=5, size_limit_bytes=result.total_bytes - 1), CODE_BYTES)
    again, _, _ = allocated(limit)
    assert serialize(again) == raw
    widths = {row["bits"] for row in rows if row["method"].startswith("gptq")}
    assert len(widths) > 1, "at the int6 budget the allocation should mix widths"


def test_more_bytes_buy_less_error_and_too_few_bytes_are_refused():
    limit = int6_bytes()
    small, large = allocated(limit - 15_000)[2], allocated(limit + 30_000)[2]
    assert sum(t["distortion"] for t in large.tensors) < sum(t["distortion"] for t in small.tensors)
    assert small.total_bytes <= limit - 15_000 and large.total_bytes <= limit + 30_000
    with pytest.raises(SizeFitError, match="cheapest"):
        allocated(limit - 100_000)


@pytest.mark.parametrize("headroom", [5, 60, 150])
def test_a_correction_that_overshoots_keeps_the_best_fitting_allocation(headroom):
    """A limit a few bytes above the cheapest allocation's and its smallest step, and a whole-stream gap that grows
    faster than the rates: the first correction overshoots the limit and the next would aim below the cheapest
    allocation. The search keeps the best that fits."""
    model, hessians = model_with_hessians()
    candidates, base = model_candidates(model.config, model.state_dict(), hessians, ALLOCATE,
                                        CompressConfig(brotli_quality=5), show_progress=False)
    points = {name: [(c.rate, c.distortion) for c in found] for name, found in candidates.items()}
    cheapest = assemble(base, candidates, allocate(points, sum(p[lower_hull(p)[0]][0] for p in points.values())))
    first = submission_bytes(cheapest, FAST, CODE_BYTES)

    def size_of(qm) -> int:  # every byte above the cheapest allocation's costs four
        size = submission_bytes(qm, FAST, CODE_BYTES)
        return size + 3 * (size - first)

    hulls = {name: lower_hull(p) for name, p in points.items()}
    smallest_step = min(points[name][hull[1]][0] - points[name][hull[0]][0] for name, hull in hulls.items()
                        if len(hull) > 1)
    limit = first + smallest_step + headroom  # room for one step by the rates, not once measured
    qm, _, result = allocate_within(candidates, base, model.state_dict(), hessians, ALLOCATE, limit, size_of,
                                    show_progress=False)
    assert len(result.rounds) > 1 and not all(r["fits"] for r in result.rounds)  # a correction overshot
    assert result.total_bytes == size_of(qm) <= limit


def test_the_stage_allocates_and_the_report_says_what_each_tensor_got(small_workdir):  # noqa: F811
    quantize = {"passthrough_max_numel": 0, "method": "allocate", "allocate_bits": [5, 6, 8],
                "allocate_clip_sigmas": [10.0, 16.0], "lqer_rank": 4}
    stage.run({"quantize": quantize, "compress": {"brotli_quality": 5, "size_limit_bytes": 300_000}}, PIPELINE)
    report = json.loads(Path(layout.QUANTIZE_REPORT).read_text())
    allocation = report["allocation"]
    assert allocation["total_bytes"] <= 300_000 == allocation["size_limit_bytes"]
    qm = deserialize(Path(layout.QUANTIZE_MODEL).read_bytes())
    assert len(qm.tensors) - len(report["tensors"]) == 2 * sum(t["lqer_rank"] > 0 for t in allocation["tensors"])
    for entry in allocation["tensors"]:
        assert isinstance(qm.tensors[entry["name"]], QuantizedTensor)
        assert qm.tensors[entry["name"]].bits == entry["bits"]


def test_loss_weighted_distortion_needs_the_sensitivities_and_uses_them():
    model, hessians = model_with_hessians()
    limit = int6_bytes()
    cfg = dataclasses.replace(ALLOCATE, allocate_distortion="loss")
    compress_cfg = CompressConfig(brotli_quality=5, size_limit_bytes=limit)
    size_of = lambda qm: submission_bytes(qm, compress_cfg, CODE_BYTES)  # noqa: E731
    with pytest.raises(ValueError, match="calibrate.output_sensitivity"):
        allocate_model(model.config, model.state_dict(), hessians, cfg, compress_cfg, size_of, show_progress=False)
    batches = [torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sensitivity = collect_output_sensitivity(model, batches, "cpu", show_progress=False)
    qm, _, result = allocate_model(model.config, model.state_dict(), hessians, cfg, compress_cfg, size_of,
                                   show_progress=False, sensitivity=sensitivity)
    assert result.total_bytes <= limit
    name = result.tensors[0]["name"]
    decoded = dequantize(qm)[name]
    assert result.tensors[0]["distortion"] == pytest.approx(
        h_weighted_error(model.state_dict()[name].float() - decoded, hessians[name], sensitivity[name]), rel=1e-9)
