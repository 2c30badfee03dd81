"""LQER: a low-rank correction of a quantized matrix's error, stored beside its codes (PR #1797).

GPTQ leaves a residual ``E = W − Ŵ``. Its best rank-``r`` approximation in the norm that
matters, the Hessian-weighted ``tr(E H Eᵀ) = ‖E L‖²`` with ``H = L Lᵀ``, comes from the
SVD of ``E L``: ``A B = U_r S_r V_rᵀ L⁻¹``. The factors travel as two small quantized
tensors (``bits``-bit codes, one fp16 scale per row) named ``<name>.lqer_a`` [rows, r] and
``<name>.lqer_b`` [r, cols], and :func:`pgolf.artifact.codec.dequantize` adds ``A B`` back. ``B`` is
quantized first and ``A`` then refitted to the quantized ``B̂`` by least squares in the
same norm, so the factors' own rounding costs little. A correction is kept only when it
lowers the tensor's H-weighted error: it can never make a tensor worse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.artifact.tensors import LQER_SUFFIXES, QuantizedTensor
from pgolf.quant.rounding import round_rows


def h_weighted_error(diff: Tensor, hessian: Tensor, row_weights: Tensor | None = None) -> float:
    """``tr(D H Dᵀ)`` of a difference [rows, cols] under [cols, cols]: the output energy it costs.

    With ``row_weights`` [rows] (output sensitivities) each row's share is weighted: ``Σ_i w_i (D H Dᵀ)_ii``.
    """
    diff = diff.double()
    per_row = ((diff @ hessian.double()) * diff).sum(dim=1)  # [rows]
    return float(per_row.sum() if row_weights is None else (per_row * row_weights.double()).sum())


def damped(hessian: Tensor, damping: float) -> Tensor:
    """``H + damping · mean(diag H) · I`` in float64, dead columns given a unit diagonal."""
    hessian = hessian.double().clone()  # [cols, cols]
    diag = hessian.diagonal()
    diag[diag == 0] = 1.0
    diag += damping * diag.mean()
    return hessian


def low_rank_correction(
    residual: Tensor, hessian: Tensor, rank: int, bits: int, damping: float = 0.01
) -> tuple[QuantizedTensor, QuantizedTensor] | None:
    """Quantized factors (A [rows, r], B [r, cols]) of ``residual`` ≈ A B in the H-weighted norm.

    None when ``rank`` is 0 or the quantized correction would not lower ``tr(E H Eᵀ)``.
    """
    rows, cols = residual.shape
    rank = min(rank, rows, cols)
    if rank <= 0:
        return None
    h = damped(hessian, damping)  # [cols, cols]
    lower = torch.linalg.cholesky(h)  # H = L Lᵀ
    e = residual.double()  # [rows, cols]
    u, s, vh = torch.linalg.svd(e @ lower, full_matrices=False)  # [rows, k], [k], [k, cols]
    root = s[:rank].sqrt()  # [r]
    # B = S^½ Vᵀ L⁻¹, solved rather than inverted: Lᵀ Bᵀ = V S^½.
    b = torch.linalg.solve_triangular(lower.T, (vh[:rank].T * root), upper=True).T  # [r, cols]
    b_q = round_rows(b.float(), bits)
    b_hat = b_q.dequantize().double()  # [r, cols]
    gram = b_hat @ h @ b_hat.T  # [r, r]
    if not bool(torch.isfinite(gram).all()) or float(gram.diagonal().min()) <= 0:
        return None
    a = torch.linalg.solve(gram, b_hat @ h @ e.T).T  # [rows, r]: argmin ‖(E − A B̂) L‖
    a_q = round_rows(a.float(), bits)
    corrected = e - a_q.dequantize().double() @ b_hat
    if h_weighted_error(corrected, hessian) >= h_weighted_error(e, hessian):
        return None
    return a_q, b_q


def correction_names(name: str) -> tuple[str, str]:
    """The artifact names of ``name``'s correction factors (A, B)."""
    return tuple(name + suffix for suffix in LQER_SUFFIXES)


def worst_tensor_corrections(
    tensors: dict[str, QuantizedTensor], weights: dict[str, Tensor], hessians: dict[str, Tensor],
    names: list[str], rank: int, bits: int, max_tensors: int = 0, damping: float = 0.01,
) -> dict[str, QuantizedTensor]:
    """The correction factors (by artifact name) of the ``max_tensors`` (0: all) of ``names``
    whose quantized residual has the largest H-weighted error; ties go by name."""
    residuals = {name: weights[name].float() - tensors[name].dequantize() for name in names}
    errors = {name: h_weighted_error(residuals[name], hessians[name]) for name in names}
    chosen = sorted(names, key=lambda name: (-errors[name], name))[: max_tensors or None]
    factors: dict[str, QuantizedTensor] = {}
    for name in chosen:
        correction = low_rank_correction(residuals[name], hessians[name], rank, bits, damping)
        if correction is not None:
            factors.update(zip(correction_names(name), correction))
    return factors
