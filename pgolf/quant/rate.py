"""Rate-aware GPTQ's prices: what each code of a column costs in error and in the coder's bits.

With ``quantize.rate_lambda`` λ > 0, GPTQ's column loop (:mod:`pgolf.quant.gptq`) chooses each
code from the two around the scaled weight by its H-weighted error plus λ times its bits under
the ``ans`` coder's model of its column, fitted to the codes of the pass before (docs/GPTQ.md,
"Rate-aware GPTQ"). GPTQ then spreads the chosen code's error as always, so the codes stay
ordinary codes and the decoder does not change. An option module: the quantizer imports it
only when λ > 0, so a submission that never prices codes does not ship it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pgolf.artifact.ans import code_bits
from pgolf.artifact.tensors import quant_max
from pgolf.quant.gptq import MIN_SCALE

if TYPE_CHECKING:
    from pgolf.quant.gptq import HessianFactors

RATE_PASSES = 2  # the coder's model fitted to the last pass's codes, then GPTQ again


@dataclass(frozen=True)
class RateTerms:
    """The prices, in bits: code q of column j in row r costs
    ``(x − q)² · row_weight[r] · column_weight[j] + bits[j, q + qmax]``, x the column over the step."""

    row_weight: Tensor  # [N, rows]: the row's error weight over λ
    column_weight: Tensor  # [N, cols], permuted order
    bits: Tensor  # [N, cols, 2·max qmax + 1], permuted order: each code's bits under the coder's model

    def cheapest_codes(self, x: Tensor, bound: Tensor, j: int) -> Tensor:
        """Of the two codes around ``x`` [N, rows] of column ``j`` (within ±``bound`` [N, 1]), the one of least
        error + λ·bits."""
        low = torch.floor(x).clamp_(-bound, bound)
        high = (low + 1).clamp_(max=bound)
        weight = self.row_weight * self.column_weight[:, j, None]  # [N, rows]
        bits = self.bits[:, j]  # [N, symbols]
        cost_low = (x - low).square_().mul_(weight).add_(bits.gather(1, (low + bound).long()))
        cost_high = (x - high).square_().mul_(weight).add_(bits.gather(1, (high + bound).long()))
        return torch.where(cost_high < cost_low, high, low)


def rate_terms(codes: Tensor, scale: Tensor, factors: HessianFactors, bits: list[int], rate_lambda: float,
               sensitivity: Tensor | None) -> RateTerms:
    """The prices for N matrices, from their codes [N, rows, cols] of a previous pass.

    Code q of row r, column j costs its share of tr(ΔHΔᵀ), ``(x − q)² s_r² e_j`` (``e_j``:
    ``factors.error_weight``; times the row's output sensitivity when given), in units of the
    matrix's mean ``s_r² e_j`` (so λ is the same whatever the matrix's scale), plus λ times its
    bits under the ``ans`` coder's model fitted to the previous codes (:func:`pgolf.artifact.ans.code_bits`).
    """
    device, width = codes.device, 2 * max(quant_max(b) for b in bits) + 1
    table = torch.zeros(codes.shape[0], codes.shape[2], width, dtype=torch.float32)  # [N, cols, symbols]
    for n, (matrix, b) in enumerate(zip(codes.cpu().numpy(), bits, strict=True)):
        priced = torch.from_numpy(code_bits(matrix, b)).float()  # [cols, 2 qmax + 1], original column order
        table[n, :, :priced.shape[1]] = priced
    table = torch.take_along_dim(table.to(device), factors.perm[:, :, None], dim=1)  # permuted order
    row = scale.float().square() * (1.0 if sensitivity is None else sensitivity.float())  # [N, rows]
    row = row / (row.mean(dim=-1, keepdim=True).clamp_min(MIN_SCALE) * rate_lambda)
    column = factors.error_weight / factors.error_weight.mean(dim=-1, keepdim=True)  # [N, cols], permuted order
    return RateTerms(row, column, table)
