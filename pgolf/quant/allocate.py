"""Rate–distortion allocation: each tensor's bits and clip sigmas, chosen within the size limit.

``quantize.method: allocate`` replaces one clip for all matrices by a choice per tensor.
Every candidate, ``allocate_bits`` × ``allocate_clip_sigmas`` (and with ``lqer_rank`` each
also with its low-rank correction), is quantized by GPTQ with the Hessian factors cached
per shape batch, so a try costs one GPTQ pass. A candidate's rate is the bytes the
configured compressor makes of the tensor alone; its distortion is GPTQ's H-weighted
error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)``, the output energy the layer loses, or with
``allocate_distortion: loss`` the same per output row weighted by the row's output
sensitivity ``E[(∂ℓ/∂y_i)²]`` (:func:`pgolf.quant.sensitivity.collect_output_sensitivity`): the
Gauss–Newton estimate of the loss it costs, comparable across layers. Minimising
``Σ D + λ Σ R`` for one multiplier λ picks, in each tensor, the point of the lower convex
hull of its (R, D) candidates where the hull's slope passes −λ; lowering λ walks all
hulls' segments in the order of their slopes (:func:`allocate`). One compressed stream
of the whole model is not the sum of the tensors' streams, so the budget is corrected by
the measured gap until the real artifact, counted exactly as the compress stage counts
it (:func:`pgolf.submit.bundle.submission_bytes`), fits ``compress.size_limit_bytes``.
Everything is in a fixed order, so the same inputs give the same artifact.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pgolf.artifact.compress import tensors_alone_bytes
from pgolf.artifact.size import SizeFitError
from pgolf.artifact.tensors import LQER_SUFFIXES, QuantizedModel, QuantizedTensor, correction_names
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.quant.gptq import FactorCache, TensorPlan, model_report, ordered_tensors, quantize_model, tensor_plan
from pgolf.quant.lqer import h_weighted_error, low_rank_correction
from pgolf.runtime import progress_bar

MAX_ROUNDS = 8  # budget corrections; the gap between rate sums and the real size settles in two or three


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: its artifact entries, their compressed bytes alone and the error."""

    bits: int
    clip_sigmas: float
    rate_lambda: float  # rate-aware GPTQ's λ (0: nearest codes)
    lqer_rank: int
    rate: int  # bytes of the entries compressed alone
    distortion: float  # tr((W − Ŵ) H (W − Ŵ)ᵀ)
    entries: dict[str, QuantizedTensor]  # the tensor (and its correction factors) by artifact name


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate index per tensor and the multiplier that chose them."""

    choice: dict[str, int]
    multiplier: float  # λ: bytes are worth this much distortion at the margin
    rate: int
    distortion: float


def lower_hull(points: list[tuple[int, float]]) -> list[int]:
    """Indices of the lower convex hull of (rate, distortion) points, by rising rate.

    Dominated points (more bytes, no less error) and points above a chord between two
    others are left out: no single λ would pick them.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    hull: list[int] = []
    for i in order:
        if hull and points[i][1] >= points[hull[-1]][1]:
            continue  # not better than a cheaper point
        while len(hull) >= 2:
            (r1, d1), (r2, d2), (r3, d3) = points[hull[-2]], points[hull[-1]], points[i]
            if (d2 - d1) * (r3 - r1) >= (d3 - d1) * (r2 - r1):  # the middle point is on or above the chord
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(candidates: dict[str, list[tuple[int, float]]], budget: int) -> Allocation:
    """The λ-solution of min Σ D subject to Σ R ≤ ``budget`` over (rate, distortion) candidates.

    Every tensor starts at its cheapest hull point; the hull segments of all tensors are then
    taken in order of their distortion saved per byte (steepest first, ties by name) while
    they fit, which is lowering λ through the segments' slopes. A segment that does not fit
    stops its tensor (its later segments are shallower), and cheaper segments of other tensors
    may still fill the remaining bytes. Raises ValueError when even the cheapest points do not fit.
    """
    hulls = {name: lower_hull(points) for name, points in candidates.items()}
    choice = {name: hull[0] for name, hull in hulls.items()}
    rate = sum(candidates[name][i][0] for name, i in choice.items())
    if rate > budget:
        raise ValueError(f"allocate: the cheapest candidates take {rate:,} bytes, over the budget of {budget:,}")
    segments = []
    for name in sorted(hulls):
        hull, points = hulls[name], candidates[name]
        for step, (low, high) in enumerate(itertools.pairwise(hull)):
            saved_per_byte = (points[low][1] - points[high][1]) / (points[high][0] - points[low][0])
            segments.append((-saved_per_byte, name, step, high, points[high][0] - points[low][0]))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    stopped: set[str] = set()
    multiplier = 0.0
    next_step = dict.fromkeys(hulls, 0)
    for slope, name, step, high, extra in segments:
        if name in stopped or step != next_step[name]:
            continue
        if rate + extra > budget:
            stopped.add(name)
            continue
        choice[name], rate, next_step[name] = high, rate + extra, step + 1
        multiplier = -slope
    distortion = sum(candidates[name][i][1] for name, i in choice.items())
    return Allocation(choice, multiplier, rate, distortion)


def candidate_configs(cfg: QuantizeConfig) -> list[QuantizeConfig]:
    """One quantize config per (bits, clip sigmas, rate λ), every quantized tensor following it."""
    return [
        dataclasses.replace(cfg, matrix_bits=bits, matrix_clip_sigmas=clip, embed_bits=bits, embed_clip_sigmas=clip,
                            mlp_bits=None, mlp_clip_sigmas=None, attn_bits=None, attn_clip_sigmas=None,
                            lqer_rank=0, method="fixed", rate_lambda=rate_lambda)
        for bits in sorted(set(cfg.allocate_bits)) for clip in sorted(set(cfg.allocate_clip_sigmas))
        for rate_lambda in sorted(set(cfg.allocate_rate_lambdas))
    ]


def row_weights(name: str, cfg: QuantizeConfig, sensitivity: dict[str, Tensor] | None) -> Tensor | None:
    """The weights of a tensor's rows in its distortion: None (all 1) unless ``allocate_distortion`` is loss."""
    if cfg.allocate_distortion == "hessian":
        return None
    if not sensitivity or name not in sensitivity:
        raise ValueError(f"quantize: allocate_distortion loss needs the output sensitivity of {name}, and the "
                         "Hessians file has none: set calibrate.output_sensitivity true and calibrate again")
    return sensitivity[name]


def model_candidates(
    model_config: ModelConfig, state_dict: dict[str, Tensor], hessians: dict[str, Tensor], cfg: QuantizeConfig,
    compress_cfg: CompressConfig, device: torch.device | str = "cpu", show_progress: bool = True,
    sensitivity: dict[str, Tensor] | None = None,
) -> tuple[dict[str, list[Candidate]], QuantizedModel]:
    """Every GPTQ tensor's candidates, and the model of the first config (for the tensors that do not vary)."""
    weights_of_rows = {name: row_weights(name, cfg, sensitivity) for name, t in state_dict.items()
               if tensor_plan(name, t, cfg).uses_gptq}
    factor_cache: FactorCache = {}
    configs = candidate_configs(cfg)
    candidates: dict[str, list[Candidate]] = {}
    base = None
    with progress_bar(total=len(configs), desc="allocate candidates", unit="config", show=show_progress) as bar:
        for trial in configs:
            qm, _ = quantize_model(model_config, state_dict, hessians, trial, device, show_progress=False,
                                   factor_cache=factor_cache, sensitivity=sensitivity)
            base = base or qm
            for name, tensor in state_dict.items():
                plan = tensor_plan(name, tensor, trial)
                if plan.uses_gptq:
                    candidates.setdefault(name, []).extend(
                        tensor_candidates(name, tensor, qm.tensors[name], plan, hessians[name], weights_of_rows[name], cfg,
                                          compress_cfg, model_config, trial.rate_lambda))
            bar.update(1)
    return candidates, base


def tensor_candidates(
    name: str, weight: Tensor, quantized: QuantizedTensor, plan: TensorPlan, hessian: Tensor,
    rows: Tensor | None, cfg: QuantizeConfig, compress_cfg: CompressConfig, model_config: ModelConfig,
    rate_lambda: float = 0.0,
) -> list[Candidate]:
    """The candidate of one quantized tensor, and (with ``lqer_rank``) the same with its correction;
    ``rows``: the distortion's row weights (None: plain H-weighted error); ``rate_lambda``: the λ it was made with."""
    def candidate(entries: dict[str, QuantizedTensor], rank: int, approx: Tensor) -> Candidate:
        return Candidate(plan.bits, plan.clip_sigmas, rate_lambda, rank, tensors_alone_bytes(model_config, entries, compress_cfg),
                         h_weighted_error(weight.float() - approx, hessian, rows), entries)

    plain_approx = quantized.dequantize()
    found = [candidate({name: quantized}, 0, plain_approx)]
    if cfg.lqer_rank:
        factors = low_rank_correction(weight.float() - plain_approx, hessian, cfg.lqer_rank, cfg.lqer_bits, cfg.damping)
        if factors is not None:
            a, b = factors
            entries = {name: quantized, **dict(zip(correction_names(name), factors))}
            found.append(candidate(entries, a.q.shape[1], plain_approx + a.dequantize() @ b.dequantize()))
    return found


def assemble(base: QuantizedModel, candidates: dict[str, list[Candidate]], allocation: Allocation) -> QuantizedModel:
    """The model with each allocated tensor's chosen entries, every other tensor as in ``base``."""
    tensors = {name: t for name, t in base.tensors.items() if name not in candidates}
    for name, index in allocation.choice.items():
        tensors.update(candidates[name][index].entries)
    names = [n for n in base.tensors if not n.endswith(LQER_SUFFIXES)]
    return QuantizedModel(base.model_config, ordered_tensors(tensors, names))


@dataclass(frozen=True)
class AllocationResult:
    """The allocated model's size and what the search did, for the quantize report."""

    total_bytes: int
    size_limit_bytes: int
    multiplier: float
    rounds: list[dict]
    tensors: list[dict]

    def summary(self, limit: int) -> dict:
        """The search's outcome for the quantize report (``limit``: as FitResult.summary takes it)."""
        return {
            "total_bytes": self.total_bytes,
            "size_limit_bytes": self.size_limit_bytes,
            "headroom_bytes": self.size_limit_bytes - self.total_bytes,
            "multiplier": self.multiplier,
            "rounds": self.rounds,
            "tensors": self.tensors,
        }


def allocate_model(
    model_config: ModelConfig, state_dict: dict[str, Tensor], hessians: dict[str, Tensor], cfg: QuantizeConfig,
    compress_cfg: CompressConfig, size_of: Callable[[QuantizedModel], int], device: torch.device | str = "cpu",
    show_progress: bool = True, sensitivity: dict[str, Tensor] | None = None,
) -> tuple[QuantizedModel, list[dict], AllocationResult]:
    """The quantized model of least total distortion whose submission (``size_of``) fits the limit."""
    candidates, base = model_candidates(model_config, state_dict, hessians, cfg, compress_cfg, device, show_progress,
                                        sensitivity)
    return allocate_within(candidates, base, state_dict, hessians, cfg, compress_cfg.size_limit_bytes, size_of,
                           show_progress)


def allocate_within(
    candidates: dict[str, list[Candidate]], base: QuantizedModel, state_dict: dict[str, Tensor],
    hessians: dict[str, Tensor], cfg: QuantizeConfig, limit: int, size_of: Callable[[QuantizedModel], int],
    show_progress: bool = True,
) -> tuple[QuantizedModel, list[dict], AllocationResult]:
    """:func:`allocate_model` on candidates already measured (a sweep of limits reuses them).

    Starts from the cheapest candidates, then re-allocates with the limit less the gap between
    the last allocation's rates and its measured submission bytes, keeping the best that fits:
    once the cheapest fits, a correction that overshoots never fails the search.
    """
    points = {name: [(c.rate, c.distortion) for c in found] for name, found in candidates.items()}
    rounds: list[dict] = []

    def measure(allocation: Allocation) -> tuple[QuantizedModel, int]:
        qm = assemble(base, candidates, allocation)
        total = size_of(qm)
        rounds.append({"rate": allocation.rate, "total_bytes": total, "fits": total <= limit,
                       "multiplier": allocation.multiplier})
        if show_progress:
            tqdm.write(f"allocate: tensors alone {allocation.rate:,} bytes -> submission {total:,} (limit {limit:,})")
        return qm, total

    cheapest_rate = sum(p[lower_hull(p)[0]][0] for p in points.values())
    allocation = allocate(points, budget=cheapest_rate)
    qm, total = measure(allocation)
    if total > limit:
        raise SizeFitError(f"quantize: allocate: even the cheapest candidates give {total:,} bytes, over "
                           f"compress.size_limit_bytes={limit:,} (allow fewer bits in allocate_bits)")
    best, tried = (allocation, qm, total), [allocation.choice]
    for _ in range(MAX_ROUNDS):
        # the limit less the gap just measured; a gap that outgrew the headroom leaves the cheapest, already measured
        following = allocate(points, max(cheapest_rate, limit - (total - allocation.rate)))
        if following.choice in tried:
            break
        allocation = following
        tried.append(allocation.choice)
        qm, total = measure(allocation)
        if total <= limit and allocation.distortion < best[0].distortion:
            best = (allocation, qm, total)
        if total <= limit and limit - total <= cfg.fit_margin_bytes:
            break
    allocation, qm, total = best
    plans = {name: tensor_plan(name, t, cfg) for name, t in state_dict.items()}
    for name, index in allocation.choice.items():
        chosen = candidates[name][index]
        plans[name] = dataclasses.replace(plans[name], bits=chosen.bits, clip_sigmas=chosen.clip_sigmas)
    chosen = [{"name": name, "bits": candidates[name][i].bits, "clip_sigmas": candidates[name][i].clip_sigmas,
               "rate_lambda": candidates[name][i].rate_lambda, "lqer_rank": candidates[name][i].lqer_rank, "rate_bytes": candidates[name][i].rate,
               "distortion": candidates[name][i].distortion} for name, i in allocation.choice.items()]
    report = model_report(qm, state_dict, hessians, plans)
    return qm, report, AllocationResult(total, limit, allocation.multiplier, rounds, chosen)
