"""The size search (``quantize.fit_to_size``): the smallest setting whose submission fits the byte limit.

``fit_clip_sigmas`` bisects ``matrix_clip_sigmas`` so that the submission (compressed
artifact + code bytes) fits ``compress.size_limit_bytes`` (compressed size falls as clip
sigmas rise: see PR #1394's page), or with ``fit_knob: rate_lambda`` rate-aware GPTQ's λ at
the configured clip (size falls as λ rises); ``fit_quantize`` runs GPTQ at each value it tries
(the Hessians factored once) and returns the fitting model. :func:`pgolf.quant.fit.quantize_for_size`
calls it when ``fit_to_size`` is on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pgolf.artifact.size import SizeFitError
from pgolf.artifact.tensors import QuantizedModel
from pgolf.config import ConfigError, ModelConfig, QuantizeConfig
from pgolf.quant.fit import FitPoint, FitResult
from pgolf.quant.gptq import FactorCache, group_overrides, quantize_model, tensor_plan


@dataclass(frozen=True)
class Knob:
    """A setting the size search moves: the submission shrinks as it rises, between ``low`` and ``high``."""

    name: str  # quantize.fit_knob's value
    low: float
    high: float
    start: float
    log_scale: bool  # bisect log(value) (the clip: size tracks bits − log2 k), else the value itself

    def middle(self, a: float, b: float) -> float:
        return math.sqrt(a * b) if self.log_scale else (a + b) / 2

    def point(self, value: float, size: int, fits: bool, cfg: QuantizeConfig) -> FitPoint:
        if self.name == "rate_lambda":
            return FitPoint(cfg.matrix_clip_sigmas, size, fits, value)
        return FitPoint(value, size, fits, cfg.rate_lambda)

    def value(self, point: FitPoint) -> float:
        return point.rate_lambda if self.name == "rate_lambda" else point.clip_sigmas


def fit_knob(cfg: QuantizeConfig) -> Knob:
    """What ``fit_to_size`` moves: ``matrix_clip_sigmas`` in its range, or ``rate_lambda`` from 0 to its maximum."""
    if cfg.fit_knob == "rate_lambda":
        return Knob("rate_lambda", 0.0, cfg.fit_max_rate_lambda, min(cfg.rate_lambda, cfg.fit_max_rate_lambda), False)
    if not 0 < cfg.fit_min_clip_sigmas < cfg.fit_max_clip_sigmas:
        raise ConfigError(
            "quantize: need 0 < fit_min_clip_sigmas < fit_max_clip_sigmas, got "
            f"{cfg.fit_min_clip_sigmas} and {cfg.fit_max_clip_sigmas}"
        )
    start = min(max(cfg.matrix_clip_sigmas, cfg.fit_min_clip_sigmas), cfg.fit_max_clip_sigmas)
    return Knob("clip_sigmas", cfg.fit_min_clip_sigmas, cfg.fit_max_clip_sigmas, start, True)


def fit_clip_sigmas(
    size_at: Callable[[float], int],
    cfg: QuantizeConfig,
    size_limit_bytes: int,
) -> FitResult:
    """Smallest value of the knob (``matrix_clip_sigmas``, or ``rate_lambda`` by ``fit_knob``) whose
    artifact fits ``size_limit_bytes``, by bisection.

    ``size_at(value)`` returns the submission bytes (compressed + code) at that
    value. Size falls as the knob rises, so the answer lies between a value
    that is over the limit and one that fits; bisection stops once the fitting
    side is within ``fit_margin_bytes`` of the limit, or the bracket is narrower
    than ``fit_tolerance`` (compressed size is not perfectly smooth in the knob).
    """
    knob = fit_knob(cfg)
    points: list[FitPoint] = []

    def evaluate(value: float) -> FitPoint:
        size = size_at(value)
        points.append(knob.point(value, size, size <= size_limit_bytes, cfg))
        return points[-1]

    def done(point: FitPoint) -> bool:
        return point.fits and size_limit_bytes - point.total_bytes <= cfg.fit_margin_bytes

    def result(point: FitPoint, margin_met: bool) -> FitResult:
        return FitResult(point.clip_sigmas, point.total_bytes, margin_met, points, point.rate_lambda, knob.name)

    first = evaluate(knob.start)
    if done(first):
        return result(first, True)
    if first.fits:
        over = first if knob.value(first) <= knob.low else evaluate(knob.low)
        if over.fits:  # even the smallest value fits: nothing to trade
            return result(over, done(over))
        fit = first
    else:
        over = first
        fit = first if knob.value(first) >= knob.high else evaluate(knob.high)
        if not fit.fits:
            raise SizeFitError(
                f"quantize: fit_to_size: even fit_max_{knob.name}={knob.high:g} gives "
                f"{fit.total_bytes:,} bytes, over the limit of {size_limit_bytes:,} by "
                f"{fit.total_bytes - size_limit_bytes:,} (lower the bits or raise fit_max_{knob.name})"
            )
    while not done(fit) and knob.value(fit) - knob.value(over) > cfg.fit_tolerance:
        middle = evaluate(knob.middle(knob.value(fit), knob.value(over)))
        if middle.fits:
            fit = middle
        else:
            over = middle
    return result(fit, done(fit))


def fit_quantize(
    model_config: ModelConfig,
    state_dict: dict[str, Tensor],
    hessians: dict[str, Tensor],
    cfg: QuantizeConfig,
    size_of: Callable[[QuantizedModel], int],
    size_limit_bytes: int,
    device: torch.device | str = "cpu",
    sensitivity: dict[str, Tensor] | None = None,
) -> tuple[QuantizedModel, list[dict], FitResult]:
    """``quantize_model`` at the clip sigmas (or ``rate_lambda``, by ``fit_knob``) that ``fit_clip_sigmas`` finds.

    ``size_of`` gives the submission bytes of a quantized model (the compress
    stage's serialize + compress + code bytes).
    """
    plans = [tensor_plan(name, t, cfg) for name, t in state_dict.items()]
    if cfg.fit_knob == "clip_sigmas" and not any(p.uses_gptq and group_overrides(p.group, cfg)[1] is None
                                                 for p in plans):
        raise ConfigError(
            "quantize: fit_to_size bisects matrix_clip_sigmas, but no quantized tensor follows it "
            "(mlp_clip_sigmas and attn_clip_sigmas both set?): unset an override"
        )
    results: dict[float, tuple[QuantizedModel, list[dict]]] = {}
    factor_cache: FactorCache = {}  # the Hessians do not change with the clip: factor them once

    key = "matrix_clip_sigmas" if cfg.fit_knob == "clip_sigmas" else cfg.fit_knob

    def size_at(value: float) -> int:
        trial = dataclasses.replace(cfg, **{key: value})
        results[value] = quantize_model(
            model_config, state_dict, hessians, trial, device, show_progress=False, factor_cache=factor_cache,
            sensitivity=sensitivity)
        size = size_of(results[value][0])
        tqdm.write(f"fit_to_size: {key}={value:.4f} -> {size:,} bytes (limit {size_limit_bytes:,})")
        return size

    fit = fit_clip_sigmas(size_at, cfg, size_limit_bytes)
    qm, rows = results[fit.rate_lambda if cfg.fit_knob == "rate_lambda" else fit.clip_sigmas]
    return qm, rows, fit
