"""LQER: a low-rank correction of a quantized matrix's error, stored beside its codes (PR #1797).

GPTQ leaves a residual ``E = W − Ŵ``; a rank-``r`` product ``A B`` of two small quantized
factors, named ``<name>.lqer_a`` [rows, r] and ``<name>.lqer_b`` [r, cols], takes part of it
back (:func:`pgolf.artifact.tensors.dequantize` adds ``A B``). ``quantize.lqer_mode`` picks how:

- ``hessian`` (pgolf's): the best rank-``r`` approximation in the norm that matters, the
  Hessian-weighted ``tr(E H Eᵀ) = ‖E L‖²`` with ``H = L Lᵀ``, from the SVD of ``E L``:
  ``A B = U_r S_r V_rᵀ L⁻¹``. Both factors are ``bits``-bit codes with one fp16 scale per row;
  ``B`` is quantized first and ``A`` refitted to the quantized ``B̂`` by least squares in the
  same norm, so the factors' own rounding costs little. The tensors with the largest
  H-weighted error are corrected, and a correction is kept only when it lowers that error.
- ``asym`` (PR #1855's, docs/ARTIFACT.md): the tensors with the largest ``‖E‖_F`` are
  corrected by the plain SVD ``E = U S Vᵀ``, ``A = U_r S_r`` and ``B = V_rᵀ``; A becomes
  int2 codes {−2..1} with one scale ``max|A| / 1.5`` (so the largest positive entry clamps
  to +1), B int4 codes {−8..7} with one scale ``max|g| / 7.5`` per group ``g`` of ``group``
  consecutive values (:class:`pgolf.artifact.tensors.GroupedTensor`). When ``group`` does not
  divide B's size the record falls back to per-row ``bits``-bit factors, and so does this.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.artifact.tensors import CodedTensor, GroupedTensor, QuantizedTensor, correction_names, grouped_code_range
from pgolf.config import QuantizeConfig
from pgolf.quant.rounding import MIN_FP16_SCALE, round_rows

ASYM_A_BITS, ASYM_B_BITS = 2, 4


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


def lqer_corrections(tensors: dict[str, QuantizedTensor], weights: dict[str, Tensor], hessians: dict[str, Tensor],
                     names: list[str], cfg: QuantizeConfig) -> dict[str, CodedTensor]:
    """The correction factors (by artifact name) ``cfg.lqer_mode`` gives the GPTQ tensors ``names``."""
    if cfg.lqer_mode == "asym":
        return frobenius_corrections(tensors, weights, names, cfg.lqer_rank, cfg.lqer_max_tensors, cfg.lqer_group,
                                     cfg.lqer_bits)
    return worst_tensor_corrections(tensors, weights, hessians, names, cfg.lqer_rank, cfg.lqer_bits,
                                    cfg.lqer_max_tensors, cfg.damping)


def frobenius_corrections(
    tensors: dict[str, QuantizedTensor], weights: dict[str, Tensor], names: list[str], rank: int,
    max_tensors: int, group: int, fallback_bits: int,
) -> dict[str, CodedTensor]:
    """PR #1855's LQER: the ``max_tensors`` (0: all) of ``names`` whose residual has the largest
    Frobenius norm (ties: the earlier name), each corrected by its packed rank-``rank`` SVD."""
    residuals = {name: weights[name].float() - tensors[name].dequantize() for name in names}  # fp32, as the record
    norms = {name: float(residuals[name].norm()) for name in names}
    chosen = sorted(names, key=lambda name: -norms[name])[: max_tensors or None]  # stable: ties keep model order
    factors: dict[str, CodedTensor] = {}
    for name in chosen:
        a, b = svd_factors(residuals[name], rank)
        factors.update(zip(correction_names(name), pack_asymmetric(a, b, group, fallback_bits)))
    return factors


def svd_factors(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A = U_r S_r`` [rows, r] and ``B = V_rᵀ`` [r, cols] of the plain SVD of ``residual``, in float32."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)  # [rows, k], [k], [k, cols]
    rank = min(rank, s.numel())
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def pack_asymmetric(a: Tensor, b: Tensor, group: int, fallback_bits: int) -> tuple[CodedTensor, CodedTensor]:
    """A as int2 {−2..1} with one scale, B as int4 {−8..7} with one scale per ``group`` values;
    per-row ``fallback_bits``-bit factors when ``group`` does not divide B's size (the record's rule)."""
    if b.numel() % group:
        return round_rows(a, fallback_bits), round_rows(b, fallback_bits)
    return grouped_codes(a, ASYM_A_BITS, a.numel()), grouped_codes(b, ASYM_B_BITS, group)


def grouped_codes(matrix: Tensor, bits: int, group: int) -> GroupedTensor:
    """Two's-complement ``bits``-bit codes of [rows, cols], one fp16 scale ``max|g| / (2^(bits-1) − ½)``
    per group ``g`` of ``group`` consecutive values: the grid's largest positive value clamps one step down."""
    low, high = grouped_code_range(bits)
    values = matrix.float().reshape(-1, group)  # [groups, group]
    scale = (values.abs().amax(dim=1) / (high + 0.5)).to(torch.float16)  # [groups]
    scale = torch.where(scale > 0, scale, torch.full_like(scale, MIN_FP16_SCALE))  # an all-zero group
    codes = torch.clamp(torch.round(values / scale.float()[:, None]), low, high).to(torch.int8)
    return GroupedTensor(codes.reshape(matrix.shape), scale, bits, group)
