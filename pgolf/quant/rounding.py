"""Round-to-nearest with per-row max scales, the quantizer that needs no Hessian, and |w| quantiles.

QuantGate's gate matrices and LQER's factors are rounded per row at the row's largest |w|
(:func:`round_rows`); :func:`abs_quantile` serves PR #576's pruning and the variants' percentile
clips (:mod:`pgolf.quant.percentiles`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pgolf.artifact.tensors import QuantizedTensor, quant_max

# The smallest fp16 subnormal: the scale of an all-zero row or group, so that its codes stay finite.
MIN_FP16_SCALE = 2.0**-24


def round_rows(matrix: Tensor, bits: int) -> QuantizedTensor:
    """Round-to-nearest codes with one max-|row| fp16 scale per row of [rows, cols] (QuantGate's int8)."""
    qmax = quant_max(bits)
    scale = (matrix.float().abs().amax(dim=1) / qmax).to(torch.float16)  # [rows]
    scale = torch.where(scale > 0, scale, torch.full_like(scale, MIN_FP16_SCALE))  # an all-zero row
    codes = torch.clamp(torch.round(matrix.float() / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return QuantizedTensor(codes, scale, bits, 0.0)


def abs_quantile(tensor: Tensor, q: float, dim: int | None = None) -> Tensor:
    """The ``q`` quantile of |tensor| (linear interpolation, as torch.quantile); q = 1: the maximum."""
    magnitude = tensor.abs().float()
    if q >= 1.0:
        return magnitude.amax() if dim is None else magnitude.amax(dim=dim)
    if dim is None:
        magnitude = magnitude.flatten()
        dim = 0
    if magnitude.numel() <= 2**24:  # torch.quantile's limit
        return torch.quantile(magnitude, q, dim=dim)
    ranked = magnitude.sort(dim=dim).values
    position = q * (ranked.size(dim) - 1)
    low = ranked.select(dim, math.floor(position))
    return low + (ranked.select(dim, math.ceil(position)) - low) * (position - math.floor(position))
