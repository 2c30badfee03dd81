"""DVC stage ``quantize``: trained weights + Hessians -> GPTQ-quantized model and its report.

Reads ``out/train/model.pt`` and ``out/calibrate/hessians.pt``, quantizes as
``quantize:`` in ``params.yaml`` says (docs/DESIGN.md §5) and commits
``out/quantize/quantized.bin`` (the pickle-free serialized model),
``out/quantize/report.json`` (per-tensor report and totals; DVC reads the totals
as metrics) and ``out/quantize/plots/``. With ``fit_to_size`` it also reads
``compress:`` and the bundle stage's code bytes to bisect ``matrix_clip_sigmas``
against the submission's real size.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.artifact.format import serialize
from pgolf.artifact.size import read_code_bytes
from pgolf.atomic import csv_text, stage_outputs
from pgolf.clocks import Clocks
from pgolf.config import CompressConfig, QuantizeConfig, section, to_dict
from pgolf.model.files import load_model
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage
from pgolf.quant.fit import FitResult, needs_size, quantize_for_size
from pgolf.quant.gptq import check_hessians, report_totals
from pgolf.quant.hessians import load_hessians, load_output_sensitivity
from pgolf.runtime import resolve_device


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "quantize", QuantizeConfig)
    compress_cfg = section(params, "compress", CompressConfig) if needs_size(cfg) else None
    ws = ws.begin("quantize", params)
    record = log_provenance("quantize", {"quantize": to_dict(cfg), "compress": compress_cfg and to_dict(compress_cfg)})
    model_path, hessians_path = ws.input(layout.TRAIN_MODEL), ws.input(layout.CALIBRATE_HESSIANS)
    model_config, state_dict = load_model(model_path)
    hessians = load_hessians(hessians_path)
    sensitivity = load_output_sensitivity(hessians_path) if cfg.uses_output_sensitivity else None
    check_hessians(state_dict, hessians, cfg, source=f"{hessians_path} against {model_path}")
    code = read_code_bytes(ws.input(layout.BUNDLE_CODE_BYTES)) if compress_cfg is not None else 0
    clocks = Clocks()
    with clocks.phase("quantization"):
        qm, rows, search = quantize_for_size(model_config, state_dict, hessians, cfg, compress_cfg, code,
                                             resolve_device(cfg.device), sensitivity)
    limit = compress_cfg.size_limit_bytes if compress_cfg is not None else 0
    fit = search if isinstance(search, FitResult) else None
    if fit is not None:
        print(f"[pgolf quantize] fit_to_size: matrix_clip_sigmas={fit.clip_sigmas:.4f} rate_lambda={fit.rate_lambda:.4f} "
              f"gives {fit.total_bytes:,} of {limit:,} bytes after {len(fit.points)} tries" + ("" if fit.margin_met else
              f" (more than fit_margin_bytes={cfg.fit_margin_bytes:,} to spare: the size is not smooth enough in "
              f"{fit.knob})"), flush=True)
    elif search is not None:
        print(f"[pgolf quantize] allocate: {search.total_bytes:,} of {limit:,} bytes after {len(search.rounds)} "
              f"measurements, multiplier {search.multiplier:.4g}", flush=True)
    with clocks.phase("serialization"):
        raw = serialize(qm)
    clocks.record_process("whole_process")
    record["clocks"] = clocks.seconds
    report = {"totals": {**report_totals(rows), "serialized_bytes": len(raw)}, "tensors": rows}
    if search is not None:
        report["fit" if fit is not None else "allocation"] = search.summary(limit)
    with stage_outputs() as out:
        out.write_bytes(ws.output(layout.QUANTIZE_MODEL), raw)
        plot_data(out.path(ws.output(layout.QUANTIZE_PLOTS)), rows, fit, limit)
        out.write_json(ws.output(layout.QUANTIZE_REPORT), ws.lineage.stamp(report))
        ws.lineage.commit(out, ws.output(layout.QUANTIZE_PROVENANCE), record)
    totals = report["totals"]
    print(f"[pgolf quantize] {totals['quantized_tensors']} of {totals['tensors']} tensors quantized, "
          f"{len(raw):,} serialized bytes, H-weighted error {totals['h_rel_error_weighted']:.3e}", flush=True)


def plot_data(directory: Path, rows: list[dict], fit: FitResult | None, limit: int) -> None:
    """Per-tensor error rows and, after a size search, its tries (the chosen one marked)."""
    directory.mkdir()
    tensors = [{**row, "shape": "x".join(map(str, row["shape"]))} for row in rows]
    (directory / Path(layout.QUANTIZE_TENSORS).name).write_text(csv_text(tensors, layout.QUANTIZE_TENSORS))
    if fit is not None:
        points = [{"step": step, "knob": fit.knob, "clip_sigmas": p.clip_sigmas, "rate_lambda": p.rate_lambda,
                   "total_bytes": p.total_bytes, "fits": p.fits, "size_limit_bytes": limit,
                   "chosen": (p.clip_sigmas, p.rate_lambda) == (fit.clip_sigmas, fit.rate_lambda)}
                  for step, p in enumerate(fit.points)]
        (directory / Path(layout.QUANTIZE_FIT).name).write_text(csv_text(points, layout.QUANTIZE_FIT))


def main(argv: list[str] | None = None) -> int:
    return run_stage("quantize", run, argv)


if __name__ == "__main__":
    sys.exit(main())
