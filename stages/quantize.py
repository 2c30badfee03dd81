"""DVC stage ``quantize``: trained weights + Hessians -> GPTQ-quantized model and its report.

Reads ``out/train/model.pt`` and ``out/calibrate/hessians.pt``, quantizes as
``quantize:`` in ``params.yaml`` says (REFERENCE.md section 5) and writes
``out/quantize/quantized.bin`` (the pickle-free serialized model),
``out/quantize/report.json`` (per-tensor report and totals; DVC reads the totals
as metrics) and ``out/quantize/plots/`` (per-tensor error as CSV and PNG). With
``fit_to_size`` it also reads ``compress:`` (compressor, its settings, the size
limit and the code files) to bisect ``matrix_clip_sigmas`` against the real
compressed size, and adds the search to the plots.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor

from pgolf.atomic import atomic_path, write_bytes, write_json
from pgolf.checkpoint import load_model
from pgolf.cli import run_stage
from pgolf.codec import QuantizedModel, code_bytes, compress, serialize
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig, section, to_dict
from pgolf.gptq import FitResult, check_hessians, fit_quantize, quantize_model, report_totals
from pgolf.hessians import load_hessians
from pgolf.plots import bar_plot, line_plot, write_csv
from pgolf.provenance import log_provenance
from pgolf.runtime import resolve_device


MODEL_PATH = Path("out/train/model.pt")
HESSIANS_PATH = Path("out/calibrate/hessians.pt")
QUANTIZED_PATH = Path("out/quantize/quantized.bin")
REPORT_PATH = Path("out/quantize/report.json")
PLOTS_DIR = Path("out/quantize/plots")


def submission_size(qm: QuantizedModel, cfg: CompressConfig, code: int) -> int:
    """Compressed artifact bytes + code bytes, exactly as the compress stage counts them."""
    return len(compress(serialize(qm), cfg)) + code


def quantize(
    model_config: ModelConfig, state_dict: dict[str, Tensor], hessians: dict[str, Tensor],
    cfg: QuantizeConfig, compress_cfg: CompressConfig | None,
) -> tuple[QuantizedModel, list[dict], FitResult | None]:
    device = resolve_device(cfg.device)
    if compress_cfg is None:
        return (*quantize_model(model_config, state_dict, hessians, cfg, device), None)
    code = code_bytes(compress_cfg.code_files, compress_cfg.compress_code)
    return fit_quantize(
        model_config, state_dict, hessians, cfg,
        lambda qm: submission_size(qm, compress_cfg, code), compress_cfg.size_limit_bytes, device,
    )


def fit_summary(fit: FitResult, limit: int) -> dict:
    return {
        "matrix_clip_sigmas": fit.clip_sigmas,
        "total_bytes": fit.total_bytes,
        "size_limit_bytes": limit,
        "headroom_bytes": limit - fit.total_bytes,
        "margin_met": fit.margin_met,
        "evaluations": len(fit.points),
    }


def write_plots(directory: Path, rows: list[dict], fit: FitResult | None, limit: int) -> None:
    """Per-tensor error (CSV + bar chart) and, after a size search, its points."""
    write_csv(directory / "tensors.csv", [{**row, "shape": "x".join(map(str, row["shape"]))} for row in rows])
    quantized = [row for row in rows if row["h_rel_error"] is not None and row["method"] != "fp16"]
    if quantized:
        bar_plot(directory / "tensor_errors.png", [row["name"] for row in quantized],
                 [row["h_rel_error"] for row in quantized], "tensor",
                 "tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)", "H-weighted relative quantization error")
    if fit is None:
        return
    points = sorted(fit.points, key=lambda p: p.clip_sigmas)
    write_csv(directory / "fit_search.csv", [
        {"step": fit.points.index(p), "clip_sigmas": p.clip_sigmas, "total_bytes": p.total_bytes,
         "fits": p.fits, "size_limit_bytes": limit} for p in points
    ])
    line_plot(directory / "fit_search.png", [p.clip_sigmas for p in points],
              {"submission bytes": [p.total_bytes for p in points], "size limit": [limit] * len(points)},
              "matrix_clip_sigmas", "bytes", f"Size search: chose {fit.clip_sigmas:.4f}")


def run(params: dict) -> None:
    cfg = section(params, "quantize", QuantizeConfig)
    compress_cfg = section(params, "compress", CompressConfig) if cfg.fit_to_size else None
    log_provenance("quantize", {"quantize": to_dict(cfg), "compress": compress_cfg and to_dict(compress_cfg)})
    model_config, state_dict = load_model(MODEL_PATH)
    hessians = load_hessians(HESSIANS_PATH)
    check_hessians(state_dict, hessians, cfg, source=f"{HESSIANS_PATH} against {MODEL_PATH}")
    qm, rows, fit = quantize(model_config, state_dict, hessians, cfg, compress_cfg)
    raw = serialize(qm)
    limit = compress_cfg.size_limit_bytes if compress_cfg else 0
    report = {"totals": {**report_totals(rows), "serialized_bytes": len(raw)}, "tensors": rows}
    if fit is not None:
        report["fit"] = fit_summary(fit, limit)
    with atomic_path(PLOTS_DIR) as tmp:
        write_plots(tmp, rows, fit, limit)
    write_json(REPORT_PATH, report)
    write_bytes(QUANTIZED_PATH, raw)
    totals = report["totals"]
    if fit is not None:
        print(f"[pgolf quantize] fit_to_size: matrix_clip_sigmas={fit.clip_sigmas:.4f} gives {fit.total_bytes:,} of "
              f"{limit:,} bytes after {len(fit.points)} tries"
              + ("" if fit.margin_met else f" (more than fit_margin_bytes={cfg.fit_margin_bytes:,} to spare: "
                 "the size is not smooth enough in the clip to get closer)"), flush=True)
    print(f"[pgolf quantize] {totals['quantized_tensors']} of {totals['tensors']} tensors quantized, "
          f"{len(raw):,} serialized bytes, H-weighted error {totals['h_rel_error_weighted']:.3e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_stage("quantize", run, argv)


if __name__ == "__main__":
    sys.exit(main())
