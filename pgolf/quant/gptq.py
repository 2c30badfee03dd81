"""GPTQ with SDClip: the quantizer of docs/DESIGN.md §5, per tensor and per model.

Each weight matrix is quantized row-wise to signed ``bits``-bit codes with one
fp16 scale per row, ``scale = clip_sigmas * std(row) / qmax``, column by column
in the order of the Hessian's descending diagonal, each column's rounding error
spread onto the columns still to do through the upper Cholesky factor of H⁻¹.
Matrices of the same shape are quantized together as one batch (the
reference's per-column loop, run once for all of them, on contiguous columns),
which gives the reference's codes up to float rounding in the error updates. Small tensors stay fp16; the
embedding, the MLP and the attention groups take their own bits and clip
sigmas. The variants (docs/VARIANTS.md §4.6, §5.2, §6) are options: PR #576's
per-row best-of-five percentile scales with the columns in ascending Hessian order
and its dense H⁻¹, PR #1218's five whole-matrix percentile clips each with a full GPTQ
run and int8 per-row percentile rounding of the embedding tables (those three in
:mod:`pgolf.quant.percentiles`), and magnitude pruning before any of it. Fitting a byte budget is
:mod:`pgolf.quant.fit`; rate-aware code choice (``quantize.rate_lambda``) is :mod:`pgolf.quant.rate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from pgolf.artifact.tensors import QuantizedModel, QuantizedTensor, correction_names, dequantize, quant_max
from pgolf.config import ConfigError, ModelConfig, QuantizeConfig
from pgolf.quant.rounding import MIN_FP16_SCALE, abs_quantile, round_rows
from pgolf.runtime import progress_bar

if TYPE_CHECKING:
    from pgolf.quant.rate import RateTerms

MIN_SCALE = 1e-10  # 0 in fp16: a row's fp16 scale is at least MIN_FP16_SCALE
SUPPORTED_BITS = range(2, 9)  # codes are stored as int8
# Columns per rank-1-update sub-block inside a GPTQ block: a speed knob only.
SUB_BLOCK = 16
TABLE_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is stored: GPTQ codes (``bits`` > 0) or fp16 passthrough."""

    group: str  # embed | mlp | attn | matrix | gate
    bits: int  # 0: fp16 passthrough
    clip_sigmas: float
    # gptq; table: int8 per-row percentile rounding (the PRs' tables); row_max: int8 per-row
    # max-|w| rounding (QuantGate's gates). Neither of the last two uses a Hessian.
    rounding: str = "gptq"

    @property
    def uses_gptq(self) -> bool:
        return self.bits > 0 and self.rounding == "gptq"


def check_bits(bits: int) -> int:
    """``bits`` if GPTQ supports it (codes are int8), else a ConfigError."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"quantize: bits must be in 2..8 (codes are int8), got {bits}")
    return bits


def tensor_group(name: str) -> str:
    """The override group of a parameter name, as PR #1586 split them."""
    if "tok_emb" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "matrix"


def group_overrides(group: str, cfg: QuantizeConfig) -> tuple[int | None, float | None]:
    """A group's own (bits, clip sigmas); None where it follows the matrix_* settings."""
    return {
        "embed": (cfg.embed_bits, cfg.embed_clip_sigmas),
        "mlp": (cfg.mlp_bits, cfg.mlp_clip_sigmas),
        "attn": (cfg.attn_bits, cfg.attn_clip_sigmas),
        "matrix": (None, None),
    }[group]


RECORD_GATE_NUMEL = (32, 8192)  # PR #1855's QuantGate: from the 8×12 sparse gate to a dense 8×512 one
RECORD_GATE_SUFFIX = ".attn_gate_w"


def is_gate_matrix(name: str, tensor: Tensor, cfg: QuantizeConfig) -> bool:
    """A gate matrix QuantGate stores as int8 rows, by ``cfg.gate_rule``: ``small_gates``, any 2-D
    float tensor named ``*gate*`` of at most ``passthrough_max_numel`` elements (``skip_gates``,
    ``attn_gate_w``); ``attn_gate_w``, the record's, only ``*.attn_gate_w`` of 32..8192 elements."""
    if tensor.ndim != 2 or not tensor.is_floating_point():
        return False
    if cfg.gate_rule == "attn_gate_w":
        low, high = RECORD_GATE_NUMEL
        return name.endswith(RECORD_GATE_SUFFIX) and low <= tensor.numel() <= high
    return "gate" in name.rsplit(".", 1)[-1] and tensor.numel() <= cfg.passthrough_max_numel


def tensor_plan(name: str, tensor: Tensor, cfg: QuantizeConfig) -> TensorPlan:
    """GPTQ for the large weight matrices of linear layers and the embedding; fp16 for the rest.

    Control tensors (gains, scales, mixes, skip weights) are never quantized,
    whatever ``passthrough_max_numel`` says: they have no Hessian. With ``gate_int8``
    the gate matrices of ``gate_rule`` are rounded to int8 rows (QuantGate), a rule
    checked before the passthrough one.
    """
    group = tensor_group(name)
    if cfg.gate_int8 and is_gate_matrix(name, tensor, cfg):
        return TensorPlan("gate", 8, 0.0, rounding="row_max")
    is_weight_matrix = name.endswith(".weight") and tensor.ndim == 2 and tensor.is_floating_point()
    if not is_weight_matrix or tensor.numel() <= cfg.passthrough_max_numel:
        return TensorPlan(group, 0, 0.0)
    if cfg.table_clip_quantile > 0 and name in TABLE_NAMES:
        return TensorPlan(group, check_bits(cfg.embed_bits), 0.0, rounding="table")
    bits, clip_sigmas = group_overrides(group, cfg)
    bits = cfg.matrix_bits if bits is None else bits
    clip_sigmas = cfg.matrix_clip_sigmas if clip_sigmas is None else clip_sigmas
    check_bits(bits)
    if not clip_sigmas > 0:
        raise ConfigError(f"quantize: clip sigmas of {name} must be positive, got {clip_sigmas}")
    return TensorPlan(group, bits, clip_sigmas)


# ---------------------------------------------------------------- GPTQ kernel


def row_scales(weights: Tensor, clip_sigmas: Tensor, qmax: Tensor) -> Tensor:
    """fp16 SDClip scales ``clip_sigmas * std(row) / qmax`` of [N, rows, cols] weights -> [N, rows].

    ``clip_sigmas`` is [N] (one clip per matrix) or [N, rows] (one per row).
    """
    clip = clip_sigmas if clip_sigmas.dim() == 2 else clip_sigmas[:, None]  # [N, rows] or [N, 1]
    scale = (clip * weights.std(dim=-1) / qmax[:, None]).clamp_min(MIN_SCALE)  # [N, rows]
    scale = scale.to(torch.float16)
    return torch.where(scale > 0, scale, torch.full_like(scale, MIN_FP16_SCALE))


def hessian_row_factors(weights: Tensor, diag: Tensor, strength: float) -> Tensor:
    """PR #1412's per-row clip factors ``1 + λ(r − 1)`` of [N, rows, cols] weights -> [N, rows].

    ``r`` is a row's share of the layer's output energy under the Hessian's diagonal,
    ``Σ_j H_jj w_ij²``, relative to the mean row (so the factors average 1): rows that
    matter more clip later. r is capped at 4 so that no row's step grows without bound.
    """
    energy = (weights.float().pow(2) * diag[:, None, :]).sum(dim=-1)  # [N, rows]
    ratio = energy / energy.mean(dim=-1, keepdim=True).clamp_min(MIN_SCALE)  # [N, rows]
    return 1.0 + strength * (ratio.clamp(max=4.0) - 1.0)


SENSITIVITY_FACTOR_RANGE = (1 / 3, 3.0)  # how far loss_sdclip may move a row's step from the tensor's


def sensitivity_row_factors(weights: Tensor, sensitivity: Tensor) -> Tensor:
    """loss_sdclip's per-row clip factors of [N, rows, cols] weights from output sensitivities [N, rows].

    A row's GPTQ error is about its step² times a factor of H that all rows share, and it costs
    ``G_i`` times that in loss, while its bytes fall as log2 of the step: the least loss for the
    bytes makes ``G_i · step_i²`` equal across rows (reverse water-filling), so ``step_i ∝
    G_i^(-1/2)``. As SDClip's step is ``k σ_i / qmax``, the factor is ``(G_i σ_i²)^(-1/2)``,
    normalised to a geometric mean of 1 within the tensor (the tensor's bytes stay about the
    same) and kept within SENSITIVITY_FACTOR_RANGE so that no row clips away its weights.
    """
    energy = (sensitivity.float() * weights.float().var(dim=-1)).clamp_min(1e-30)  # [N, rows]
    log_factor = -0.5 * energy.log()
    log_factor = log_factor - log_factor.mean(dim=-1, keepdim=True)
    low, high = SENSITIVITY_FACTOR_RANGE
    return log_factor.exp().clamp(low, high)


@dataclass(frozen=True)
class HessianFactors:
    """What GPTQ needs of N Hessians, independent of bits and clip sigmas (so reusable).

    Column j's rounding error, ``(base_j − q_j·s) / divisor_j``, is subtracted from each later
    column k times ``spread[j, k]``. The record's GPTQ spreads the error of the updated column
    through the upper Cholesky factor U of H⁻¹ (divisor U_jj); pgolf computes the same codes
    from one Cholesky factor of H, H = R Rᵀ with R upper (U = R⁻¹), by spreading the error of
    the *original* weight, ``w_j − q_j·s``, with ``spread[j, k] = −R_jk / R_kk`` (divisor 1):
    ``w'_k = w_k + Σ_{j<k} (w_j − q_j s) R_jk / R_kk`` is the same sum, and it needs neither
    H⁻¹ nor its factor, a third of the factoring work. PR #576 spreads the updated column's
    error through H⁻¹ itself (``gptq_dense_inverse``).
    """

    diag: Tensor  # [N, cols]: the damped diagonal, original column order
    dead: Tensor  # [N, cols] bool: columns no calibration input reached
    perm: Tensor  # [N, cols]: columns by descending (or ascending) damped diagonal
    spread: Tensor  # [N, cols, cols]: upper triangle used, permuted order
    divisor: Tensor  # [N, cols]
    from_original: bool  # the errors spread are those of the original weights (else of the updated columns)
    error_weight: Tensor  # [N, cols]: e² = (w' − q s)² · this is the column's share of tr(ΔHΔᵀ) (damped H)
    damp: Tensor  # [N]: what damping added to the diagonal

    def upper(self, index: int) -> Tensor:
        """R of matrix ``index``: the damped, permuted H = R Rᵀ (only when ``from_original``)."""
        return -self.spread[index] * self.error_weight[index].sqrt()[None, :]  # [cols, cols]


def permuted_squares(matrices: Tensor, perm: Tensor) -> Tensor:
    """[N, n, n] matrices with rows and columns in each matrix's order ``perm`` [N, n]."""
    return torch.stack([m.index_select(0, p).index_select(1, p) for m, p in zip(matrices, perm, strict=True)])


def prepare_hessians(hessians: Tensor, damping: float, ascending: bool = False,
                     dense_inverse: bool = False) -> HessianFactors:
    """Dead columns, damping, ordering and the factor GPTQ spreads its errors with, of [N, cols, cols].

    ``ascending`` and ``dense_inverse`` are PR #576's GPTQ: columns by ascending
    diagonal, errors spread through the rows of H⁻¹ rather than of its Cholesky factor.
    """
    hessians = hessians.float().clone()  # [N, cols, cols]
    diag = hessians.diagonal(dim1=-2, dim2=-1)  # [N, cols], a view
    dead = diag == 0
    diag[dead] = 1.0
    damp = damping * diag.mean(dim=-1)  # [N]
    diag += damp[:, None]
    perm = torch.argsort(diag, dim=-1, descending=not ascending)  # [N, cols]
    # H = R Rᵀ, R upper: the lower factor of H with its rows and columns reversed, reversed back;
    # permuting in the reversed order gives that reversed H in the same copy
    factor, info = torch.linalg.cholesky_ex(permuted_squares(hessians, perm if dense_inverse else perm.flip(-1)))
    if bool(info.any()):
        raise ValueError("quantize: a damped Hessian is not positive definite (not a Σ XᵀX matrix?)")
    if dense_inverse:
        hinv = torch.cholesky_inverse(factor)  # [N, cols, cols]
        divisor = hinv.diagonal(dim1=-2, dim2=-1).clone()  # [N, cols]
        return HessianFactors(diag.clone(), dead, perm, hinv, divisor, False, divisor.pow(-2), damp)
    upper = factor.flip(-2, -1)  # R [N, cols, cols]
    r_diag = upper.diagonal(dim1=-2, dim2=-1).clone()  # [N, cols]
    spread = upper.div_(r_diag[:, None, :]).neg_()  # −R_jk / R_kk
    return HessianFactors(diag.clone(), dead, perm, spread, torch.ones_like(r_diag), True, r_diag.square(), damp)


def quantize_block(block: Tensor, base: Tensor, spread: Tensor, divisor: Tensor, scale: Tensor, bound: Tensor,
                   codes: Tensor, rate: RateTerms | None, start: int) -> Tensor:
    """Quantize the columns of one block in order, each error spread onto the block's later columns.

    ``block`` [N, B, rows] (column-major, updated in place), ``base`` [N, B, rows] the values
    whose error spreads (``block`` itself, or the original weights), ``spread`` [N, B, B],
    ``divisor`` [N, B], ``scale`` [N, rows], ``bound`` [N, 1]; writes ``codes`` [N, B, rows] and
    returns the spread errors [N, B, rows]. ``rate``: rate-aware choice (columns from ``start``).
    Within a block the rank-1 updates run over sub-blocks of SUB_BLOCK columns and a batched
    matmul carries each sub-block's errors to the rest: the same arithmetic as the
    reference's column loop, summed in another order.
    """
    errors = torch.empty_like(block)  # [N, B, rows]
    width = block.shape[1]
    for sub_start in range(0, width, SUB_BLOCK):
        sub_end = min(sub_start + SUB_BLOCK, width)
        for j in range(sub_start, sub_end):
            x = block[:, j] / scale  # [N, rows]; a column is contiguous
            code = torch.round(x).clamp_(-bound, bound) if rate is None else rate.cheapest_codes(x, bound, start + j)
            codes[:, j] = code
            error = (base[:, j] - code * scale) / divisor[:, j, None]  # [N, rows]
            errors[:, j] = error
            block[:, j + 1:sub_end] -= spread[:, j, j + 1:sub_end, None] * error[:, None, :]
        if sub_end < width:
            carry = spread[:, sub_start:sub_end, sub_end:].transpose(1, 2)  # [N, B - sub_end, S]
            block[:, sub_end:] -= torch.bmm(carry, errors[:, sub_start:sub_end])  # [N, B - sub_end, rows]
    return errors


def permuted_columns(weights: Tensor, perm: Tensor) -> Tensor:
    """[N, rows, cols] -> [N, cols, rows] in each matrix's column order ``perm``: one column contiguous."""
    return torch.stack([w.T.index_select(0, p) for w, p in zip(weights, perm, strict=True)])


def gptq_quantize(
    weights: Tensor,
    factors: HessianFactors,
    bits: list[int],
    clip_sigmas: list[float],
    block_size: int = 128,
    progress: tqdm | None = None,
    scale: Tensor | None = None,
    rate: RateTerms | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ + SDClip of N same-shape matrices [N, rows, cols], given their Hessians' factors.

    ``bits`` and ``clip_sigmas`` hold one value per matrix. Runs on the weights'
    device. Returns the int8 codes [N, rows, cols] (in the original column order),
    the row scales [N, rows] (fp16 SDClip scales, or ``scale`` when given) and the
    error the codes leave [N] (float64, :func:`residual_energy`).
    ``rate``: choose each code by error + λ·bits (rate-aware GPTQ) rather than the nearest.
    """
    if block_size < 1:
        raise ConfigError(f"quantize: block_size must be at least 1, got {block_size}")
    count, rows, cols = weights.shape
    weights = weights.float()
    qmax = torch.tensor([quant_max(b) for b in bits], dtype=torch.float32, device=weights.device)  # [N]
    clip = torch.tensor(clip_sigmas, dtype=torch.float32, device=weights.device)  # [N]
    scale = row_scales(weights, clip, qmax) if scale is None else scale.to(weights.device)  # [N, rows]
    step = scale.float()
    work = permuted_columns(weights, factors.perm)  # [N, cols, rows]
    work.masked_fill_(torch.take_along_dim(factors.dead, factors.perm, dim=1)[:, :, None], 0.0)
    base = work.clone() if factors.from_original else work
    codes = torch.empty_like(work)  # [N, cols, rows]
    spread, divisor = factors.spread, factors.divisor
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        errors = quantize_block(work[:, start:end], base[:, start:end], spread[:, start:end, start:end],
                                divisor[:, start:end], step, qmax[:, None], codes[:, start:end], rate, start)
        if end < cols:
            work[:, end:] -= torch.bmm(spread[:, start:end, end:].transpose(1, 2), errors)  # [N, cols - end, rows]
        if progress is not None:
            progress.update(count * (end - start))
    energy = residual_energy(work, codes, step, factors.error_weight)  # [N]
    inverse = torch.argsort(factors.perm, dim=-1)  # [N, cols]
    codes = permuted_columns(codes.transpose(1, 2), inverse)  # [N, cols, rows], original order
    return codes.transpose(1, 2).to(torch.int8), scale, energy  # [N, rows, cols], [N, rows], [N]


def residual_energy(updated: Tensor, codes: Tensor, step: Tensor, error_weight: Tensor) -> Tensor:
    """The damped error ``tr(Δ(H + δI)Δᵀ)`` [N] that GPTQ's codes leave, from its own residuals.

    ``updated`` [N, cols, rows] holds each column as it was when quantized (w′), ``codes`` the
    same columns' codes, ``step`` [N, rows] the scales; all in GPTQ's column order. With
    H + δI = R Rᵀ (R upper) and Δ = W − q·s, GPTQ's update makes ``(w′_k − q_k s)·R_kk`` the
    k-th column of ΔR, so ``‖ΔR‖² = Σ_k (w′_k − q_k s)²·R_kk²``: the report's error term with
    no product by R (``error_weight`` is R_kk²; with PR #576's dense H⁻¹ the sum is not the
    error, and the report measures that through H). Consumes ``updated``.
    """
    residual = updated.sub_(codes * step[:, None, :])  # [N, cols, rows]
    per_column = residual.square_().sum(dim=-1)  # [N, cols]
    return (per_column * error_weight.double()).sum(dim=-1)  # [N]


# ---------------------------------------------------------------- PR #576's pruning, and the scales of one batch


def prune_smallest(state_dict: dict[str, Tensor], fraction: float, min_numel: int) -> dict[str, Tensor]:
    """PR #576's pruning (docs/VARIANTS.md §5.2): in each 2-D tensor of more than ``min_numel`` elements,
    zero the weights below the ``fraction`` quantile of |w|. Returns new tensors; the input is untouched."""
    if fraction <= 0:
        return state_dict
    pruned = {}
    for name, tensor in state_dict.items():
        if tensor.ndim == 2 and tensor.is_floating_point() and tensor.numel() > min_numel:
            threshold = abs_quantile(tensor, fraction).to(tensor.dtype)
            tensor = tensor.masked_fill(tensor.abs() < threshold, 0.0)
        pruned[name] = tensor
    return pruned


def quantize_batch(weights: Tensor, factors: HessianFactors, plans: list[TensorPlan], cfg: QuantizeConfig,
                   progress: tqdm | None, sensitivity: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Codes [N, rows, cols] and fp16 scales [N, rows] of one same-shape batch, by ``cfg.scale_search``
    (``sensitivity`` [N, rows]: the output sensitivities loss_sdclip needs; rate-aware GPTQ weights
    the rows' errors by them when given, which ``quantize_model`` does when ``cfg`` uses them), and
    the damped error they leave [N] (:func:`residual_energy`), None where the stored fp16 scales are
    not those GPTQ quantized with (PR #576's fp32 scales)."""
    bits = [plan.bits for plan in plans]
    if cfg.scale_search == "matrix_percentiles":
        from pgolf.quant.percentiles import gptq_best_matrix_percentile  # an option module: shipped with PR #1218's

        return gptq_best_matrix_percentile(weights, factors, bits, cfg.block_size, progress)
    scale = None
    clip_sigmas = torch.tensor([plan.clip_sigmas for plan in plans], dtype=torch.float32, device=weights.device)
    if cfg.scale_search in ("hessian_sdclip", "loss_sdclip"):
        qmax = torch.tensor([quant_max(b) for b in bits], dtype=torch.float32, device=weights.device)  # [N]
        row_factors = (hessian_row_factors(weights, factors.diag, cfg.hessian_clip_lambda)
                       if cfg.scale_search == "hessian_sdclip" else sensitivity_row_factors(weights, sensitivity))
        scale = row_scales(weights.float(), clip_sigmas[:, None] * row_factors, qmax)  # [N, rows]
    if cfg.scale_search == "row_percentiles":
        from pgolf.quant.percentiles import best_row_percentile_scales  # an option module: shipped with PR #576's

        # PR #576 quantizes with the fp32 scales and stores them in fp16.
        scale = torch.stack([best_row_percentile_scales(w[None].float(), quant_max(b))[0]
                             for w, b in zip(weights, bits, strict=True)])  # [N, rows]
    codes, used, energy = gptq_quantize(weights, factors, bits, clip_sigmas.tolist(), cfg.block_size, progress,
                                        scale=scale)
    if cfg.rate_lambda > 0:
        from pgolf.quant.rate import RATE_PASSES, rate_terms  # an option module: a script ships it when rate-aware

        for _ in range(RATE_PASSES):
            rate = rate_terms(codes, used, factors, bits, cfg.rate_lambda, sensitivity)
            codes, used, energy = gptq_quantize(weights, factors, bits, clip_sigmas.tolist(), cfg.block_size,
                                                scale=scale, rate=rate)
    return codes, used.to(torch.float16), energy if used.dtype == torch.float16 else None


# ---------------------------------------------------------------- report


def hessian_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ): the share of the layer's output energy lost.

    With H = Σ XᵀX this is Σ‖(W − Ŵ)x‖² / Σ‖Wx‖² over the calibration inputs x,
    so 0 is exact and 1 means the error is as large as the signal.
    """
    weight, approx = weight.to(hessian.device, torch.float32), approx.to(hessian.device, torch.float32)
    both = torch.cat([weight, weight - approx])  # [2 rows, cols]: the signal's rows, then the error's
    energy = ((both @ hessian.float()) * both).sum(dim=-1, dtype=torch.float64)  # [2 rows]; float32 products
    signal, error = float(energy[:len(weight)].sum()), float(energy[len(weight):].sum())
    return error / signal if signal > 0 else 0.0


def factor_error(weight: Tensor, approx: Tensor, factors: HessianFactors, index: int,
                 damped_error: float | None = None, block: int = 128) -> float:
    """:func:`hessian_error` through the factor GPTQ used, H + δI = R Rᵀ (permuted; dead columns zeroed,
    where H has nothing): ``tr(X H Xᵀ) = ‖X R‖² − δ‖X‖²``, by blocks of R's upper triangle, half
    the products of ``X @ H``. ``damped_error``: the error's ``‖ΔR‖²`` when GPTQ gave it
    (:func:`residual_energy`), which leaves only the signal's product by R to do. Computed where the
    factor lives (GPTQ's device), whatever device the tensors come from."""
    live = ~factors.dead[index]  # [cols]
    weight, approx = weight.to(live.device, torch.float32), approx.to(live.device, torch.float32)
    both = torch.cat([weight, weight - approx]) * live  # [2 rows, cols]
    energy = -float(factors.damp[index]) * both.square().sum(dim=-1, dtype=torch.float64)  # [2 rows]
    products = both[:len(weight)] if damped_error is not None else both
    products = products.index_select(1, factors.perm[index])  # [rows or 2 rows, cols]
    upper = factors.upper(index)  # [cols, cols]
    for start in range(0, products.shape[1], block):
        end = min(start + block, products.shape[1])
        energy[:len(products)] += (products[:, :end] @ upper[:end, start:end]).square().sum(dim=-1, dtype=torch.float64)
    signal, error = float(energy[:len(weight)].sum()), float(energy[len(weight):].sum())
    error += damped_error or 0.0
    return error / signal if signal > 0 else 0.0


def tensor_report(
    name: str, weight: Tensor, plan: TensorPlan, approx: Tensor, h_rel_error: float | None, codes: Tensor | None
) -> dict:
    """One row of the quantize report: what was done to ``name`` and what it cost (``h_rel_error``:
    :func:`hessian_error`'s, None without a Hessian)."""
    weight = weight.float()
    diff = weight - approx.float()
    return {
        "name": name,
        "shape": list(weight.shape),
        "numel": weight.numel(),
        "group": plan.group,
        "method": f"{'gptq' if plan.uses_gptq else 'round'} int{plan.bits}" if plan.bits else "fp16",
        "bits": plan.bits if plan.bits else 16,
        "clip_sigmas": plan.clip_sigmas,
        "weight_rms": float(weight.pow(2).mean().sqrt()),
        "error_rms": float(diff.pow(2).mean().sqrt()),
        "h_rel_error": h_rel_error,
        "clipped_fraction": (
            float((codes.abs() == quant_max(plan.bits)).float().mean()) if codes is not None else 0.0
        ),
    }


def report_totals(rows: list[dict]) -> dict:
    """Model-level figures: counts, parameter-weighted mean error, average bits per weight."""
    quantized = [r for r in rows if r["method"] != "fp16"]
    scored = [r for r in quantized if r["h_rel_error"] is not None]  # rounded tables may have no Hessian
    numel = sum(r["numel"] for r in rows)
    q_numel = sum(r["numel"] for r in quantized)
    scored_numel = sum(r["numel"] for r in scored)
    return {
        "tensors": len(rows),
        "quantized_tensors": len(quantized),
        "parameters": numel,
        "quantized_parameters": q_numel,
        "mean_bits": sum(r["bits"] * r["numel"] for r in rows) / numel if numel else 0.0,
        "h_rel_error_weighted": (
            sum(r["h_rel_error"] * r["numel"] for r in scored) / scored_numel if scored_numel else 0.0
        ),
    }


# ---------------------------------------------------------------- model


def check_hessians(
    state_dict: dict[str, Tensor], hessians: dict[str, Tensor], cfg: QuantizeConfig, source: str = "quantize"
) -> None:
    """An error naming ``source`` for each tensor to quantize whose Hessian is missing, misshapen or not finite."""
    problems = []
    for name, tensor in state_dict.items():
        if not tensor_plan(name, tensor, cfg).uses_gptq:
            continue
        cols = state_dict[name].shape[1]
        if name not in hessians:
            problems.append(f"no Hessian for {name}")
        elif tuple(hessians[name].shape) != (cols, cols):
            problems.append(f"{name}: Hessian shape {tuple(hessians[name].shape)}, expected {(cols, cols)}")
        elif not bool(torch.isfinite(hessians[name]).all()):
            problems.append(f"{name}: Hessian has non-finite entries")
    if problems:
        raise ValueError(f"{source}: Hessians do not fit the model: " + "; ".join(problems[:10]))


def check_sensitivity(state_dict: dict[str, Tensor], plans: dict[str, TensorPlan],
                      sensitivity: dict[str, Tensor] | None) -> None:
    """An error unless every GPTQ tensor has an output sensitivity of one value per row."""
    for name, plan in plans.items():
        found = (sensitivity or {}).get(name)
        if plan.uses_gptq and (found is None or tuple(found.shape) != (state_dict[name].shape[0],)):
            raise ValueError(f"quantize: scale_search loss_sdclip needs the output sensitivity of {name} "
                             f"[{state_dict[name].shape[0]}], and the Hessians file has "
                             f"{'none' if found is None else list(found.shape)}: set calibrate.output_sensitivity "
                             "true and calibrate again")


def round_without_hessian(tensor: Tensor, plan: TensorPlan, cfg: QuantizeConfig) -> QuantizedTensor:
    """A coded tensor GPTQ leaves out: an embedding table clipped at ``cfg.table_clip_quantile`` (the PRs' int8
    tables), or rows rounded at their largest |w| (QuantGate's gates)."""
    if plan.rounding == "table":
        from pgolf.quant.percentiles import round_table  # an option module: shipped with table_clip_quantile

        return round_table(tensor, plan.bits, cfg.table_clip_quantile)
    return round_rows(tensor, plan.bits)


def shape_batches(names: list[str], state_dict: dict[str, Tensor]) -> list[list[str]]:
    """Tensor names grouped by shape, so each group runs as one GPTQ batch."""
    batches: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        batches.setdefault(tuple(state_dict[name].shape), []).append(name)
    return list(batches.values())


FactorCache = dict[tuple[str, ...], HessianFactors]


def gptq_hessian(name: str, hessians: dict[str, Tensor], plan: TensorPlan, cfg: QuantizeConfig) -> Tensor:
    """The Hessian GPTQ uses; identity for the embedding when ``embed_gptq`` is off.

    With H = I nothing is propagated between columns, so GPTQ reduces to rounding
    to nearest with the same SDClip scales (PR #1218's embedding).
    """
    if not own_hessian(plan, cfg):
        return torch.eye(hessians[name].shape[0], dtype=hessians[name].dtype)
    return hessians[name]


def own_hessian(plan: TensorPlan, cfg: QuantizeConfig) -> bool:
    """Whether GPTQ quantizes the tensor with its own Hessian (not the identity of ``embed_gptq`` off)."""
    return not (plan.group == "embed" and not cfg.embed_gptq)


# Where GPTQ quantized a tensor: its batch's Hessian factors, its index in the batch, and the damped
# error its codes leave (``residual_energy``; None where the stored scales are not those it used).
GPTQError = tuple[HessianFactors, int, float | None]


def quantize_model(
    model_config: ModelConfig,
    state_dict: dict[str, Tensor],
    hessians: dict[str, Tensor],
    cfg: QuantizeConfig,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    factor_cache: FactorCache | None = None,
    sensitivity: dict[str, Tensor] | None = None,
) -> tuple[QuantizedModel, list[dict]]:
    """Quantize a whole state dict: GPTQ where planned, fp16 elsewhere; plus the report rows.

    Same-shape matrices run as one batch on ``device``. ``factor_cache`` keeps each
    batch's Hessian factors for later calls with other bits or clip sigmas. ``sensitivity``:
    calibrate's output sensitivities by weight name (scale_search loss_sdclip needs them).
    """
    plans = {name: tensor_plan(name, t, cfg) for name, t in state_dict.items()}
    check_hessians(state_dict, hessians, cfg)
    if cfg.scale_search == "loss_sdclip":
        check_sensitivity(state_dict, plans, sensitivity)
    weights = prune_smallest(state_dict, cfg.prune_fraction, cfg.passthrough_max_numel)
    gptq_names = [name for name, plan in plans.items() if plan.uses_gptq]
    factor_cache = {} if factor_cache is None else factor_cache
    tensors: dict[str, QuantizedTensor | Tensor] = {name: round_without_hessian(weights[name], plan, cfg)
                                                    for name, plan in plans.items() if plan.bits and not plan.uses_gptq}
    total_columns = sum(state_dict[n].shape[1] for n in gptq_names)
    own_factors: dict[str, GPTQError] = {}  # the report measures errors through these
    with progress_bar(total=total_columns, desc="gptq columns", unit="col", show=show_progress) as bar:
        for names in shape_batches(gptq_names, state_dict):
            key = tuple(names)
            if key not in factor_cache:
                stacked = torch.stack([gptq_hessian(n, hessians, plans[n], cfg) for n in names])  # [N, cols, cols]
                stacked = stacked.to(device)
                factor_cache[key] = prepare_hessians(stacked, cfg.damping, cfg.gptq_column_order == "ascending",
                                                     cfg.gptq_dense_inverse)
            # by cfg alone, whatever the caller passes: the stage and the exported runner make one artifact
            rows = torch.stack([sensitivity[n] for n in names]).to(device) if cfg.uses_output_sensitivity else None
            codes, scales, energy = quantize_batch(torch.stack([weights[n] for n in names]).to(device),
                                                   factor_cache[key], [plans[n] for n in names], cfg, bar, rows)
            for index, (name, code, scale) in enumerate(zip(names, codes.cpu(), scales.cpu())):
                clip_sigmas = plans[name].clip_sigmas if "sdclip" in cfg.scale_search else 0.0  # percentile scales
                tensors[name] = QuantizedTensor(code, scale, plans[name].bits, clip_sigmas)
                if factor_cache[key].from_original and own_hessian(plans[name], cfg):
                    own_factors[name] = (factor_cache[key], index, None if energy is None else float(energy[index]))
    if cfg.lqer_rank:
        from pgolf.quant.lqer import lqer_corrections  # here, not above: an exported script ships LQER only when on

        tensors.update(lqer_corrections(tensors, weights, hessians, gptq_names, cfg))
    for name, tensor in state_dict.items():
        tensors.setdefault(name, weights[name].detach().to(torch.float16) if tensor.is_floating_point() else tensor)
    qm = QuantizedModel(model_config, ordered_tensors(tensors, list(state_dict)))
    return qm, model_report(qm, state_dict, hessians, plans, own_factors)


def ordered_tensors(tensors: dict[str, QuantizedTensor | Tensor], names: list[str]) -> dict[str, QuantizedTensor | Tensor]:
    """``tensors`` in the model's order, each tensor's correction factors (if any) right after it."""
    ordered = {}
    for name in names:
        ordered[name] = tensors[name]
        ordered.update({n: tensors[n] for n in correction_names(name) if n in tensors})
    return ordered


def model_report(qm: QuantizedModel, state_dict: dict[str, Tensor], hessians: dict[str, Tensor],
                 plans: dict[str, TensorPlan], factors: dict[str, GPTQError] | None = None) -> list[dict]:
    """One report row per tensor of the model, its error measured on what the artifact decodes to
    (through the Hessian factor GPTQ used where ``factors`` has the tensor's; with GPTQ's own error
    term unless a low-rank correction changes what the tensor decodes to)."""
    decoded = dequantize(qm)
    factors = factors or {}
    rows = []
    for name, tensor in state_dict.items():
        stored = qm.tensors[name]
        codes = stored.q if isinstance(stored, QuantizedTensor) else None
        correction = qm.tensors.get(correction_names(name)[0])
        if name in factors:
            batch, index, damped_error = factors[name]
            h_rel_error = factor_error(tensor, decoded[name], batch, index,
                                       damped_error if correction is None else None)
        else:
            h_rel_error = hessian_error(tensor, decoded[name], hessians[name]) if name in hessians else None
        row = tensor_report(name, tensor, plans[name], decoded[name], h_rel_error, codes)
        row["lqer_rank"] = correction.q.shape[1] if correction is not None else 0
        rows.append(row)
    return rows
