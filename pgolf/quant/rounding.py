"""Round-to-nearest quantizers that need no Hessian: per-row max scales and the variants' percentile clips.

QuantGate's gate matrices and LQER's factors are rounded per row at the row's largest |w|
(:func:`round_rows`); PR #576 and PR #1218 round their embedding tables at a quantile of
each row's |w| (:func:`round_table`), and choose GPTQ's row scales among percentile clips
(:func:`best_row_percentile_scales`, docs/VARIANTS.md §5.2, §6).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pgolf.artifact.tensors import QuantizedTensor, quant_max

# The row-clip quantiles PR #576 and PR #1218 try (1.0: the row's largest |w|).
CLIP_PERCENTILES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)


def round_rows(matrix: Tensor, bits: int) -> QuantizedTensor:
    """Round-to-nearest codes with one max-|row| fp16 scale per row of [rows, cols] (QuantGate's int8)."""
    qmax = quant_max(bits)
    scale = (matrix.float().abs().amax(dim=1) / qmax).to(torch.float16)  # [rows]
    # an all-zero row: the smallest fp16 subnormal keeps the codes finite
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))
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


def percentile_scales(weights: Tensor, q: float, qmax: int) -> Tensor:
    """fp32 row scales max(quantile(|row|, q) / qmax, 1 / qmax) of [..., rows, cols] -> [..., rows]."""
    return (abs_quantile(weights, q, dim=-1) / qmax).clamp_min(1.0 / qmax)


def best_row_percentile_scales(weights: Tensor, qmax: int) -> Tensor:
    """PR #576: per row, the percentile scale whose rounding has the least squared error; [N, rows] fp32."""
    best_scale, best_error = None, None
    for q in CLIP_PERCENTILES:
        scale = percentile_scales(weights, q, qmax)  # [N, rows]
        codes = torch.clamp(torch.round(weights / scale[..., None]), -qmax, qmax)
        error = (weights - codes * scale[..., None]).pow(2).mean(dim=-1)  # [N, rows]
        if best_scale is None:
            best_scale, best_error = scale, error
        else:
            improved = error < best_error
            best_scale = torch.where(improved, scale, best_scale)
            best_error = torch.where(improved, error, best_error)
    return best_scale


def round_table(table: Tensor, bits: int, clip_quantile: float) -> QuantizedTensor:
    """The PRs' int8 tables: each row clipped at a quantile of its |w|, then rounded to nearest."""
    t32 = table.float()  # [rows, cols]
    qmax = quant_max(bits)
    clip = abs_quantile(t32, clip_quantile, dim=1)  # [rows]
    scale = (clip / qmax).clamp_min(1.0 / qmax)  # [rows]
    clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
    codes = torch.clamp(torch.round(clipped / scale[:, None]), -qmax, qmax).to(torch.int8)
    return QuantizedTensor(codes, scale.to(torch.float16), bits, 0.0)
