"""The variants' percentile clips: PR #576's and PR #1218's row scales and tables (docs/VARIANTS.md §5.2, §6).

Each row's clip is a quantile of its |w| (:data:`CLIP_PERCENTILES`; 1.0: the row's largest). PR #576 keeps,
per row, the clip whose rounding has the least squared error and runs GPTQ with those scales
(:func:`best_row_percentile_scales`); PR #1218 runs GPTQ once per clip and keeps, per matrix, the run of least
error (:func:`gptq_best_matrix_percentile`); both round their embedding tables to int8 at one quantile
(:func:`round_table`). An option module: GPTQ imports it only for these ``quantize.scale_search`` choices and
``table_clip_quantile``, so a script ships it only then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pgolf.artifact.tensors import QuantizedTensor, quant_max
from pgolf.quant.gptq import gptq_quantize
from pgolf.quant.rounding import abs_quantile

if TYPE_CHECKING:
    from tqdm import tqdm

    from pgolf.quant.gptq import HessianFactors

# The row-clip quantiles PR #576 and PR #1218 try (1.0: the row's largest |w|).
CLIP_PERCENTILES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)


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


def gptq_best_matrix_percentile(
    weights: Tensor, factors: HessianFactors, bits: list[int], block_size: int, progress: tqdm | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PR #1218: a full GPTQ run per percentile clip (fp16 scales), each matrix keeping its lowest-MSE run
    (codes, scales and :func:`residual_energy`, as :func:`gptq_quantize`)."""
    weights = weights.float()  # [N, rows, cols]
    qmax = torch.tensor([quant_max(b) for b in bits], dtype=torch.float32, device=weights.device)  # [N]
    target = weights.masked_fill(factors.dead[:, None, :], 0.0)  # the PR compares with dead columns zeroed
    best, best_error = None, None
    for q in CLIP_PERCENTILES:
        clip = abs_quantile(weights, q, dim=-1) if q < 1.0 else weights.abs().amax(dim=-1)  # [N, rows]
        scale = (clip / qmax[:, None]).clamp_min(1.0 / qmax[:, None]).to(torch.float16)  # [N, rows]
        run = gptq_quantize(weights, factors, bits, [0.0] * len(bits), block_size, progress, scale=scale)
        error = (target - run[0].float() * run[1].float()[..., None]).pow(2).mean(dim=(1, 2))  # [N]
        if best is None:
            best, best_error = run, error
        else:
            improved = error < best_error  # [N]
            best = tuple(torch.where(improved.reshape(-1, *[1] * (kept.dim() - 1)), candidate, kept)
                         for candidate, kept in zip(run, best, strict=True))
            best_error = torch.where(improved, error, best_error)
    return best
