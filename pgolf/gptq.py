"""GPTQ with SDClip: the quantizer of docs/DESIGN.md §5, per tensor and per model.

Each weight matrix is quantized row-wise to signed ``bits``-bit codes with one
fp16 scale per row, ``scale = clip_sigmas * std(row) / qmax``, column by column
in the order of the Hessian's descending diagonal, each column's rounding error
spread onto the columns still to do through the upper Cholesky factor of H⁻¹.
Matrices of the same shape are quantized together as one batch (the
reference's per-column loop, run once for all of them, on contiguous columns),
which gives the reference's codes up to float rounding in the error updates. Small tensors stay fp16; the
embedding, the MLP and the attention groups take their own bits and clip
sigmas. ``fit_clip_sigmas`` bisects ``matrix_clip_sigmas`` so that the
compressed artifact fits a byte budget (compressed size falls as clip sigmas
rise: see the seed page of PR #1394).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pgolf.codec import QuantizedModel, QuantizedTensor, quant_max
from pgolf.config import ConfigError, ModelConfig, QuantizeConfig

MIN_SCALE = 1e-10
# A scale of MIN_SCALE is 0 in fp16; the smallest fp16 subnormal keeps codes finite.
MIN_FP16_SCALE = 2.0**-24
SUPPORTED_BITS = range(2, 9)  # codes are stored as int8
# Columns per rank-1-update sub-block inside a GPTQ block: a speed knob only.
SUB_BLOCK = 16


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is stored: GPTQ codes (``bits`` > 0) or fp16 passthrough."""

    group: str  # embed | mlp | attn | matrix
    bits: int  # 0: fp16 passthrough
    clip_sigmas: float


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


def tensor_plan(name: str, tensor: Tensor, cfg: QuantizeConfig) -> TensorPlan:
    """GPTQ for the large weight matrices of linear layers and the embedding; fp16 for the rest.

    Control tensors (gains, scales, mixes, skip weights) are never quantized,
    whatever ``passthrough_max_numel`` says: they have no Hessian.
    """
    group = tensor_group(name)
    is_weight_matrix = name.endswith(".weight") and tensor.ndim == 2 and tensor.is_floating_point()
    if not is_weight_matrix or tensor.numel() <= cfg.passthrough_max_numel:
        return TensorPlan(group, 0, 0.0)
    bits, clip_sigmas = group_overrides(group, cfg)
    bits = cfg.matrix_bits if bits is None else bits
    clip_sigmas = cfg.matrix_clip_sigmas if clip_sigmas is None else clip_sigmas
    check_bits(bits)
    if not clip_sigmas > 0:
        raise ConfigError(f"quantize: clip sigmas of {name} must be positive, got {clip_sigmas}")
    return TensorPlan(group, bits, clip_sigmas)


# ---------------------------------------------------------------- GPTQ kernel


def row_scales(weights: Tensor, clip_sigmas: Tensor, qmax: Tensor) -> Tensor:
    """fp16 SDClip scales ``clip_sigmas * std(row) / qmax`` of [N, rows, cols] weights -> [N, rows]."""
    scale = (clip_sigmas[:, None] * weights.std(dim=-1) / qmax[:, None]).clamp_min(MIN_SCALE)  # [N, rows]
    scale = scale.to(torch.float16)
    return torch.where(scale > 0, scale, torch.full_like(scale, MIN_FP16_SCALE))


@dataclass(frozen=True)
class HessianFactors:
    """What GPTQ needs of N Hessians, independent of bits and clip sigmas (so reusable)."""

    dead: Tensor  # [N, cols] bool: columns no calibration input reached
    perm: Tensor  # [N, cols]: columns by descending damped diagonal
    hinv_upper: Tensor  # [N, cols, cols]: upper Cholesky factor of H⁻¹, permuted order


def prepare_hessians(hessians: Tensor, damping: float) -> HessianFactors:
    """Dead columns, damping, ordering and the upper Cholesky factor of H⁻¹ of [N, cols, cols]."""
    hessians = hessians.float().clone()  # [N, cols, cols]
    diag = hessians.diagonal(dim1=-2, dim2=-1)  # [N, cols], a view
    dead = diag == 0
    diag[dead] = 1.0
    diag += damping * diag.mean(dim=-1, keepdim=True)
    perm = torch.argsort(diag, dim=-1, descending=True)  # [N, cols]
    hessians = torch.take_along_dim(hessians, perm[:, :, None], dim=1)
    hessians = torch.take_along_dim(hessians, perm[:, None, :], dim=2)  # [N, cols, cols]
    factor, info = torch.linalg.cholesky_ex(hessians)
    if bool(info.any()):
        raise ValueError("quantize: a damped Hessian is not positive definite (not a Σ XᵀX matrix?)")
    hinv = torch.cholesky_inverse(factor)  # [N, cols, cols]
    return HessianFactors(dead, perm, torch.linalg.cholesky(hinv, upper=True))


def quantize_block(block: Tensor, hinv_block: Tensor, scale: Tensor, bound: Tensor, codes: Tensor) -> Tensor:
    """Quantize the columns of one block in order, each error spread onto the block's later columns.

    ``block`` [N, B, rows] (column-major, updated in place), ``hinv_block`` [N, B, B],
    ``scale`` [N, rows], ``bound`` [N, 1]; writes ``codes`` [N, B, rows] and returns the
    scaled errors [N, B, rows]. Within a block the rank-1 updates run over sub-blocks of
    SUB_BLOCK columns and a batched matmul carries each sub-block's errors to the rest:
    the same arithmetic as the reference's column loop, summed in another order.
    """
    errors = torch.empty_like(block)  # [N, B, rows]
    width = block.shape[1]
    for sub_start in range(0, width, SUB_BLOCK):
        sub_end = min(sub_start + SUB_BLOCK, width)
        for j in range(sub_start, sub_end):
            column = block[:, j]  # [N, rows], contiguous
            code = torch.round(column / scale).clamp_(-bound, bound)  # [N, rows]
            codes[:, j] = code
            error = (column - code * scale) / hinv_block[:, j, j, None]  # [N, rows]
            errors[:, j] = error
            block[:, j + 1:sub_end] -= hinv_block[:, j, j + 1:sub_end, None] * error[:, None, :]
        if sub_end < width:
            spread = hinv_block[:, sub_start:sub_end, sub_end:].transpose(1, 2)  # [N, B - sub_end, S]
            block[:, sub_end:] -= torch.bmm(spread, errors[:, sub_start:sub_end])  # [N, B - sub_end, rows]
    return errors


def gptq_quantize(
    weights: Tensor,
    factors: HessianFactors,
    bits: list[int],
    clip_sigmas: list[float],
    block_size: int = 128,
    progress: tqdm | None = None,
) -> tuple[Tensor, Tensor]:
    """GPTQ + SDClip of N same-shape matrices [N, rows, cols], given their Hessians' factors.

    ``bits`` and ``clip_sigmas`` hold one value per matrix. Runs on the weights'
    device. Returns the int8 codes [N, rows, cols] (in the original column order)
    and fp16 row scales [N, rows].
    """
    if block_size < 1:
        raise ConfigError(f"quantize: block_size must be at least 1, got {block_size}")
    count, rows, cols = weights.shape
    weights = weights.float()
    qmax = torch.tensor([quant_max(b) for b in bits], dtype=torch.float32, device=weights.device)  # [N]
    clip = torch.tensor(clip_sigmas, dtype=torch.float32, device=weights.device)  # [N]
    scale = row_scales(weights, clip, qmax)  # [N, rows]
    perm, hinv = factors.perm, factors.hinv_upper
    work = torch.take_along_dim(weights, perm[:, None, :], dim=2)  # [N, rows, cols]
    work.masked_fill_(torch.take_along_dim(factors.dead, perm, dim=1)[:, None, :], 0.0)
    work = work.transpose(1, 2).contiguous()  # [N, cols, rows]: one column is contiguous
    codes = torch.empty_like(work)  # [N, cols, rows]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        errors = quantize_block(
            work[:, start:end], hinv[:, start:end, start:end], scale.float(), qmax[:, None], codes[:, start:end]
        )  # [N, B, rows]
        if end < cols:
            work[:, end:] -= torch.bmm(hinv[:, start:end, end:].transpose(1, 2), errors)  # [N, cols - end, rows]
        if progress is not None:
            progress.update(count * (end - start))
    inverse = torch.argsort(perm, dim=-1)  # [N, cols]
    codes = torch.take_along_dim(codes, inverse[:, :, None], dim=1)  # [N, cols, rows]
    return codes.transpose(1, 2).to(torch.int8), scale  # [N, rows, cols], [N, rows]


# ---------------------------------------------------------------- report


def hessian_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ): the share of the layer's output energy lost.

    With H = Σ XᵀX this is Σ‖(W − Ŵ)x‖² / Σ‖Wx‖² over the calibration inputs x,
    so 0 is exact and 1 means the error is as large as the signal.
    """
    weight, hessian = weight.double(), hessian.double()
    diff = weight - approx.double()  # [rows, cols]
    signal = float(((weight @ hessian) * weight).sum())
    return float(((diff @ hessian) * diff).sum()) / signal if signal > 0 else 0.0


def tensor_report(
    name: str, weight: Tensor, plan: TensorPlan, approx: Tensor, hessian: Tensor | None, codes: Tensor | None
) -> dict:
    """One row of the quantize report: what was done to ``name`` and what it cost."""
    weight = weight.float()
    diff = weight - approx.float()
    return {
        "name": name,
        "shape": list(weight.shape),
        "numel": weight.numel(),
        "group": plan.group,
        "method": f"gptq int{plan.bits}" if plan.bits else "fp16",
        "bits": plan.bits if plan.bits else 16,
        "clip_sigmas": plan.clip_sigmas,
        "weight_rms": float(weight.pow(2).mean().sqrt()),
        "error_rms": float(diff.pow(2).mean().sqrt()),
        "h_rel_error": hessian_error(weight, approx, hessian) if hessian is not None else None,
        "clipped_fraction": (
            float((codes.abs() == quant_max(plan.bits)).float().mean()) if codes is not None else 0.0
        ),
    }


def report_totals(rows: list[dict]) -> dict:
    """Model-level figures: counts, parameter-weighted mean error, average bits per weight."""
    quantized = [r for r in rows if r["method"] != "fp16"]
    numel = sum(r["numel"] for r in rows)
    q_numel = sum(r["numel"] for r in quantized)
    return {
        "tensors": len(rows),
        "quantized_tensors": len(quantized),
        "parameters": numel,
        "quantized_parameters": q_numel,
        "mean_bits": sum(r["bits"] * r["numel"] for r in rows) / numel if numel else 0.0,
        "h_rel_error_weighted": (
            sum(r["h_rel_error"] * r["numel"] for r in quantized) / q_numel if q_numel else 0.0
        ),
    }


# ---------------------------------------------------------------- model


def check_hessians(
    state_dict: dict[str, Tensor], hessians: dict[str, Tensor], cfg: QuantizeConfig, source: str = "quantize"
) -> None:
    """An error naming ``source`` for each tensor to quantize whose Hessian is missing, misshapen or not finite."""
    problems = []
    for name, tensor in state_dict.items():
        if not tensor_plan(name, tensor, cfg).bits:
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
    if plan.group == "embed" and not cfg.embed_gptq:
        return torch.eye(hessians[name].shape[0], dtype=hessians[name].dtype)
    return hessians[name]


def quantize_model(
    model_config: ModelConfig,
    state_dict: dict[str, Tensor],
    hessians: dict[str, Tensor],
    cfg: QuantizeConfig,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    factor_cache: FactorCache | None = None,
) -> tuple[QuantizedModel, list[dict]]:
    """Quantize a whole state dict: GPTQ where planned, fp16 elsewhere; plus the report rows.

    Same-shape matrices run as one batch on ``device``. ``factor_cache`` keeps each
    batch's Hessian factors for later calls with other bits or clip sigmas.
    """
    plans = {name: tensor_plan(name, t, cfg) for name, t in state_dict.items()}
    check_hessians(state_dict, hessians, cfg)
    gptq_names = [name for name, plan in plans.items() if plan.bits]
    factor_cache = {} if factor_cache is None else factor_cache
    tensors: dict[str, QuantizedTensor | Tensor] = {}
    total_columns = sum(state_dict[n].shape[1] for n in gptq_names)
    with tqdm(total=total_columns, desc="gptq columns", unit="col", disable=not show_progress) as bar:
        for names in shape_batches(gptq_names, state_dict):
            key = tuple(names)
            if key not in factor_cache:
                stacked = torch.stack([gptq_hessian(n, hessians, plans[n], cfg) for n in names])  # [N, cols, cols]
                stacked = stacked.to(device)
                factor_cache[key] = prepare_hessians(stacked, cfg.damping)
            codes, scales = gptq_quantize(
                torch.stack([state_dict[n] for n in names]).to(device),
                factor_cache[key],
                [plans[n].bits for n in names],
                [plans[n].clip_sigmas for n in names],
                cfg.block_size,
                bar,
            )
            for name, code, scale in zip(names, codes.cpu(), scales.cpu()):
                tensors[name] = QuantizedTensor(code, scale, plans[name].bits, plans[name].clip_sigmas)
    rows = []
    for name, tensor in state_dict.items():
        stored = tensors.setdefault(name, tensor.detach().to(torch.float16) if tensor.is_floating_point() else tensor)
        quantized = isinstance(stored, QuantizedTensor)
        approx, codes = (stored.dequantize(), stored.q) if quantized else (stored, None)
        rows.append(tensor_report(name, tensor, plans[name], approx, hessians.get(name), codes))
    return QuantizedModel(model_config, {name: tensors[name] for name in state_dict}), rows


# ---------------------------------------------------------------- size targeting


@dataclass(frozen=True)
class FitPoint:
    """One evaluation of the size search."""

    clip_sigmas: float
    total_bytes: int
    fits: bool


@dataclass(frozen=True)
class FitResult:
    clip_sigmas: float  # the chosen matrix_clip_sigmas (fits the limit)
    total_bytes: int
    margin_met: bool  # limit - total_bytes <= margin
    points: list[FitPoint]

    def summary(self, limit: int) -> dict:
        """The search's outcome, for the quantize report."""
        return {
            "matrix_clip_sigmas": self.clip_sigmas,
            "total_bytes": self.total_bytes,
            "size_limit_bytes": limit,
            "headroom_bytes": limit - self.total_bytes,
            "margin_met": self.margin_met,
            "evaluations": len(self.points),
        }


class SizeFitError(ValueError):
    """Even the largest allowed clip sigmas gives an artifact over the limit."""


def fit_clip_sigmas(
    size_at: Callable[[float], int],
    cfg: QuantizeConfig,
    size_limit_bytes: int,
) -> FitResult:
    """Smallest ``matrix_clip_sigmas`` whose artifact fits ``size_limit_bytes``, by bisection.

    ``size_at(clip_sigmas)`` returns the submission bytes (compressed + code) at
    that clip. Size falls as clip sigmas rise, so the answer lies between a clip
    that is over the limit and one that fits; bisection stops once the fitting
    side is within ``fit_margin_bytes`` of the limit, or the bracket is narrower
    than ``fit_tolerance`` (compressed size is not perfectly smooth in the clip).
    """
    if not 0 < cfg.fit_min_clip_sigmas < cfg.fit_max_clip_sigmas:
        raise ConfigError(
            "quantize: need 0 < fit_min_clip_sigmas < fit_max_clip_sigmas, got "
            f"{cfg.fit_min_clip_sigmas} and {cfg.fit_max_clip_sigmas}"
        )
    points: list[FitPoint] = []

    def evaluate(clip_sigmas: float) -> FitPoint:
        size = size_at(clip_sigmas)
        points.append(FitPoint(clip_sigmas, size, size <= size_limit_bytes))
        return points[-1]

    def done(point: FitPoint) -> bool:
        return point.fits and size_limit_bytes - point.total_bytes <= cfg.fit_margin_bytes

    start = min(max(cfg.matrix_clip_sigmas, cfg.fit_min_clip_sigmas), cfg.fit_max_clip_sigmas)
    first = evaluate(start)
    if done(first):
        return FitResult(first.clip_sigmas, first.total_bytes, True, points)
    if first.fits:
        over = first if first.clip_sigmas <= cfg.fit_min_clip_sigmas else evaluate(cfg.fit_min_clip_sigmas)
        if over.fits:  # even the smallest clip fits: nothing to trade
            return FitResult(over.clip_sigmas, over.total_bytes, done(over), points)
        fit = first
    else:
        over = first
        fit = first if first.clip_sigmas >= cfg.fit_max_clip_sigmas else evaluate(cfg.fit_max_clip_sigmas)
        if not fit.fits:
            raise SizeFitError(
                f"quantize: fit_to_size: even fit_max_clip_sigmas={cfg.fit_max_clip_sigmas:g} gives "
                f"{fit.total_bytes:,} bytes, over the limit of {size_limit_bytes:,} by "
                f"{fit.total_bytes - size_limit_bytes:,} (lower the bits or raise fit_max_clip_sigmas)"
            )
    while not done(fit) and fit.clip_sigmas - over.clip_sigmas > cfg.fit_tolerance:
        # Bisect in log space: size tracks bits - log2(clip sigmas).
        middle = evaluate(math.sqrt(fit.clip_sigmas * over.clip_sigmas))
        if middle.fits:
            fit = middle
        else:
            over = middle
    return FitResult(fit.clip_sigmas, fit.total_bytes, done(fit), points)


def fit_quantize(
    model_config: ModelConfig,
    state_dict: dict[str, Tensor],
    hessians: dict[str, Tensor],
    cfg: QuantizeConfig,
    size_of: Callable[[QuantizedModel], int],
    size_limit_bytes: int,
    device: torch.device | str = "cpu",
) -> tuple[QuantizedModel, list[dict], FitResult]:
    """``quantize_model`` at the clip sigmas that ``fit_clip_sigmas`` finds.

    ``size_of`` gives the submission bytes of a quantized model (the compress
    stage's serialize + compress + code bytes).
    """
    plans = [tensor_plan(name, t, cfg) for name, t in state_dict.items()]
    if not any(p.bits and group_overrides(p.group, cfg)[1] is None for p in plans):
        raise ConfigError(
            "quantize: fit_to_size bisects matrix_clip_sigmas, but no quantized tensor follows it "
            "(mlp_clip_sigmas and attn_clip_sigmas both set?): unset an override"
        )
    results: dict[float, tuple[QuantizedModel, list[dict]]] = {}
    factor_cache: FactorCache = {}  # the Hessians do not change with the clip: factor them once

    def size_at(clip_sigmas: float) -> int:
        trial = dataclasses.replace(cfg, matrix_clip_sigmas=clip_sigmas)
        results[clip_sigmas] = quantize_model(
            model_config, state_dict, hessians, trial, device, show_progress=False, factor_cache=factor_cache
        )
        size = size_of(results[clip_sigmas][0])
        tqdm.write(f"fit_to_size: matrix_clip_sigmas={clip_sigmas:.4f} -> {size:,} bytes (limit {size_limit_bytes:,})")
        return size

    fit = fit_clip_sigmas(size_at, cfg, size_limit_bytes)
    qm, rows = results[fit.clip_sigmas]
    return qm, rows, fit
