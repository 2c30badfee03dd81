"""Quantization methods side by side at equal bytes, and their rate–distortion curves.

For a trained model and its Hessians (a run directory in the pipeline's layout: the
research preset's ``out/train/model.pt``, ``out/calibrate/hessians.pt`` and ``data/``), it
quantizes with the record's SDClip settings, takes that submission's total bytes (artifact
+ code, as the compress stage counts them) as the budget, and gives every other method the
same budget: Hessian-aware SDClip, QuantGate and LQER each with ``fit_to_size`` (the clip
bisected to fit), the rate–distortion allocator alone and with every lever, rate-aware GPTQ
(``quantize.rate_lambda``; the allocator choosing λ per tensor among RATE_LAMBDAS). It prints, per
method, the total bytes, the validation bpb of what the artifact decodes to, the
quantization tax (bpb less the trained weights' bpb) and that tax as a share of SDClip's
(scored on plain windows of the evaluate section's validation set; ``--sliding``: on
sliding windows, as the evaluate stage's headline, about twice as slow).
Further ``--run`` directories (other seeds) score the trained weights, SDClip and the
allocators of SEED_METHODS again: the spread of their taxes is the run-to-run noise. Unless
``--no-curve``, it also sweeps SDClip's clip sigmas and runs each allocator of CURVES (loss-weighted
with ``loss_sdclip`` and the ``ans`` coder, without and with rate-aware GPTQ) within each of the
resulting byte counts, and writes the points
(bytes against bpb and against the total H-weighted error) to ``OUT/rd_curve.csv`` and
``OUT/rd_curve.png``, with the taxes at SDClip's byte count read off each curve and whether
rate-aware GPTQ scores below the other allocators within every budget. Usage::

    python -m benchmarks.bench_allocate --run runs/research [--run runs/research_seed2]
        [--params presets/research.yaml] [--out rd_report] [--max-val-tokens N] [--no-curve] [--sliding]
        [--seed-methods]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from pgolf.artifact.size import submission_bytes
from pgolf.artifact.tensors import QuantizedModel, dequantize
from pgolf.atomic import csv_text, write_bytes
from pgolf.config import (
    CalibrateConfig,
    CompressConfig,
    EvaluateConfig,
    ModelConfig,
    QuantizeConfig,
    TokenizeConfig,
    TrainConfig,
    TTTConfig,
    load_params,
    section,
)
from pgolf.data.accounting import ValidationStream
from pgolf.data.shards import dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import init_distributed
from pgolf.eval.score import evaluate_model, validation_set
from pgolf.model.files import build_model, load_model
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.plots import rate_distortion_plot
from pgolf.quant.allocate import allocate_within, model_candidates
from pgolf.quant.fit import quantize_for_size
from pgolf.quant.hessians import load_hessians, load_output_sensitivity
from pgolf.quant.lqer import h_weighted_error
from pgolf.submit.bundle import code_bytes
from pgolf.submit.sections import RunConfigs, script_params

FINE_CLIPS = [7.0, 8.0, 9.0, 10.0, 11.0, 12.85, 14.0, 16.0, 18.0, 20.0, 23.0]
RATE_LAMBDA = 0.1  # rate-aware GPTQ's λ where one is fixed
RATE_LAMBDAS = [0.0, 0.05, 0.1, 0.2]  # the λ the allocator chooses among
# Each method's changes to the params' quantize section (compress keys under "compress");
# all but the first are held to SDClip's bytes.
METHODS: dict[str, dict[str, Any]] = {
    "sdclip (record settings)": {},
    "sdclip, fit to the bytes": {"fit_to_size": True},
    "hessian_sdclip (PR #1412)": {"scale_search": "hessian_sdclip", "fit_to_size": True},
    "loss_sdclip (rows by sensitivity)": {"scale_search": "loss_sdclip", "fit_to_size": True},
    "quantgate (04-22)": {"gate_int8": True, "fit_to_size": True},
    "lqer r8 int4, worst 6 (PR #1797)": {"lqer_rank": 8, "lqer_bits": 4, "lqer_max_tensors": 6, "fit_to_size": True},
    "allocate (H-weighted error)": {"method": "allocate"},
    "allocate (loss-weighted error)": {"method": "allocate", "allocate_distortion": "loss"},
    "allocate (loss) + loss_sdclip": {"method": "allocate", "allocate_distortion": "loss",
                                      "scale_search": "loss_sdclip"},
    "allocate (loss) + loss_sdclip, 11 clips": {"method": "allocate", "allocate_distortion": "loss",
                                                "scale_search": "loss_sdclip", "allocate_clip_sigmas": FINE_CLIPS},
    "allocate (loss) + loss_sdclip, ans coder": {"method": "allocate", "allocate_distortion": "loss",
                                                 "scale_search": "loss_sdclip", "compress": {"compressor": "ans"}},
    "loss_sdclip + rate-aware GPTQ, ans, fit to the bytes": {"scale_search": "loss_sdclip", "rate_lambda": RATE_LAMBDA,
                                                             "fit_to_size": True, "compress": {"compressor": "ans"}},
    "allocate (loss) + loss_sdclip + rate-aware GPTQ, ans": {"method": "allocate", "allocate_distortion": "loss",
                                                             "scale_search": "loss_sdclip",
                                                             "allocate_rate_lambdas": RATE_LAMBDAS,
                                                             "compress": {"compressor": "ans"}},
}
BEST = "allocate (loss) + loss_sdclip"
BEST_ANS = "allocate (loss) + loss_sdclip, ans coder"
RATE_AWARE = "allocate (loss) + loss_sdclip + rate-aware GPTQ, ans"
SEED_METHODS = ("sdclip (record settings)", BEST, BEST_ANS, RATE_AWARE)
# the allocators whose curves the sweep draws beside SDClip's, by their label there: the best without and
# with rate-aware GPTQ, both under the ans coder whose model rate-aware GPTQ prices codes by
CURVES = {"allocate, ans": BEST_ANS, "rate-aware allocate, ans": RATE_AWARE}
SWEEP = (9.0, 12.85, 16.0, 20.0, 26.0)


@dataclasses.dataclass
class Run:
    """One trained model, its Hessians, its validation set and the params it was made with."""

    directory: Path
    params: dict
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]
    sensitivity: dict[str, torch.Tensor]  # {} unless calibrate.output_sensitivity was on
    evaluate: EvaluateConfig
    stream: ValidationStream
    ctx: Any

    def code(self, quantize: QuantizeConfig, compress: CompressConfig) -> int:
        """The code bytes of this run's exported script with these quantize and compress settings."""
        configs = RunConfigs(model=self.model_config, train=section(self.params, "train", TrainConfig),
                             calibrate=section(self.params, "calibrate", CalibrateConfig), quantize=quantize,
                             compress=compress, evaluate=self.evaluate, ttt=section(self.params, "ttt", TTTConfig))
        return code_bytes(compress.code_files, script_params(configs), compress.script_compressor)

    def bpb(self, model: GPT, name: str) -> float:
        scores = evaluate_model(name, model.to(self.ctx.device), self.stream, self.evaluate, self.ctx)
        return scores.get("sliding_val_bpb", scores.get("val_bpb"))

    def quantized_bpb(self, qm: QuantizedModel, name: str) -> float:
        model = GPT(qm.model_config)
        model.load_state_dict(dequantize(qm))
        return self.bpb(model, name)

    def h_error(self, qm: QuantizedModel) -> float:
        """Σ tr((W − Ŵ) H (W − Ŵ)ᵀ) over the tensors with a Hessian: what the allocator minimises."""
        decoded = dequantize(qm)
        return sum(h_weighted_error(self.state_dict[n].float() - decoded[n], h) for n, h in self.hessians.items()
                   if n in decoded)


def load_run(directory: Path, params_path: Path, max_val_tokens: int | None, sliding: bool) -> Run:
    params = load_params(params_path)
    model_config, state_dict = load_model(directory / layout.TRAIN_MODEL)
    evaluate = dataclasses.replace(section(params, "evaluate", EvaluateConfig), eval_plain=not sliding,
                                   eval_sliding=sliding)
    if max_val_tokens is not None:
        evaluate = dataclasses.replace(evaluate, max_val_tokens=max_val_tokens)
    data_dir = directory / section(params, "tokenize", TokenizeConfig).data_dir
    vocab = model_config.vocab_size
    stream = validation_set(dataset_path(data_dir, vocab), tokenizer_file(data_dir, vocab), vocab, evaluate)
    hessians_path = directory / layout.CALIBRATE_HESSIANS
    return Run(directory, params, model_config, state_dict, load_hessians(hessians_path),
               load_output_sensitivity(hessians_path), evaluate, stream, init_distributed(evaluate.device))


def quantize_method(run: Run, changes: dict[str, Any], limit: int) -> tuple[QuantizedModel, int, float]:
    """The method's quantized model, its submission bytes (artifact + code) and its seconds.

    ``changes``: quantize keys, and under ``"compress"`` any compress keys.
    """
    changes = dict(changes)
    compress_changes = changes.pop("compress", {})
    quantize = dataclasses.replace(section(run.params, "quantize", QuantizeConfig), **changes)
    compress = dataclasses.replace(section(run.params, "compress", CompressConfig), size_limit_bytes=limit,
                                   **compress_changes)
    code = run.code(quantize, compress)
    sized = compress if (quantize.fit_to_size or quantize.method == "allocate") else None
    start = time.perf_counter()
    qm, _, _ = quantize_for_size(run.model_config, run.state_dict, run.hessians, quantize, sized, code,
                                 run.ctx.device, run.sensitivity)
    return qm, submission_bytes(qm, compress, code), time.perf_counter() - start


def compare_methods(run: Run, names: list[str]) -> list[dict]:
    """Each method's row; the first (SDClip at the params' settings) sets the byte budget of the rest."""
    prequant = run.bpb(build_model(run.directory / layout.TRAIN_MODEL), "trained")
    rows = []
    budget = section(run.params, "compress", CompressConfig).size_limit_bytes
    for name in names:
        qm, total, seconds = quantize_method(run, METHODS[name], budget)
        bpb = run.quantized_bpb(qm, name)
        if not rows:
            budget = total
        rows.append({"run": str(run.directory), "method": name, "total_bytes": total, "budget_bytes": budget,
                     "prequant_bpb": prequant, "bpb": bpb, "tax": bpb - prequant, "h_error": run.h_error(qm),
                     "quantize_s": round(seconds, 1)})
    for row in rows:
        row["tax_vs_sdclip"] = row["tax"] / rows[0]["tax"] if rows[0]["tax"] else float("nan")
    return rows


def curves(run: Run, sdclip_bytes: int) -> list[dict]:
    """SDClip over the clip sweep, and each allocator of CURVES at each byte count the sweep reached."""
    quantize = section(run.params, "quantize", QuantizeConfig)
    points = []
    for clip in SWEEP:
        qm, total, _ = quantize_method(run, {"matrix_clip_sigmas": clip}, 2**62)
        points.append({"method": "sdclip", "clip_sigmas": clip, "budget_bytes": total, "total_bytes": total,
                       "bpb": run.quantized_bpb(qm, f"sdclip {clip}"), "h_error": run.h_error(qm)})
    targets = sorted({p["total_bytes"] for p in points} | {sdclip_bytes})
    for label, method in CURVES.items():
        changes = dict(METHODS[method])
        compress = dataclasses.replace(section(run.params, "compress", CompressConfig), **changes.pop("compress", {}))
        allocator = dataclasses.replace(quantize, **changes)
        candidates, base = model_candidates(run.model_config, run.state_dict, run.hessians, allocator, compress,
                                            run.ctx.device, sensitivity=run.sensitivity)
        for target in targets:
            limited = dataclasses.replace(compress, size_limit_bytes=target)
            code = run.code(allocator, limited)
            try:
                qm, _, result = allocate_within(candidates, base, run.state_dict, run.hessians, allocator, target,
                                                lambda trial: submission_bytes(trial, limited, code),
                                                show_progress=False)
            except ValueError as error:  # below the cheapest candidates
                print(f"{label} at {target:,} bytes: {error}")
                continue
            points.append({"method": label, "clip_sigmas": "", "budget_bytes": target, "total_bytes": result.total_bytes,
                           "bpb": run.quantized_bpb(qm, f"{label} {target:,}"), "h_error": run.h_error(qm)})
    return points


def below_everywhere(points: list[dict], lower: str, upper: str) -> bool:
    """Whether ``lower`` scores a lower bpb than ``upper`` within every byte budget of the sweep that both met."""
    theirs = {p["budget_bytes"]: p["bpb"] for p in points if p["method"] == upper}
    ours = [(p["budget_bytes"], p["bpb"]) for p in points if p["method"] == lower and p["budget_bytes"] in theirs]
    return bool(ours) and all(bpb < theirs[budget] for budget, bpb in ours)


def read_off(points: list[dict], method: str, at_bytes: int) -> float:
    """The bpb of ``method``'s curve at ``at_bytes``, linear between the neighbouring points."""
    curve = sorted((p["total_bytes"], p["bpb"]) for p in points if p["method"] == method)
    below = [p for p in curve if p[0] <= at_bytes]
    above = [p for p in curve if p[0] >= at_bytes]
    if not below or not above:
        return float("nan")
    (x0, y0), (x1, y1) = below[-1], above[0]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (at_bytes - x0) / (x1 - x0)


def write_csv(path: Path, rows: list[dict]) -> None:
    write_bytes(path, csv_text(rows, path).encode("utf-8"))


def print_rows(rows: list[dict]) -> None:
    print(f"\n{rows[0]['run']}: trained weights {rows[0]['prequant_bpb']:.5f} bpb; budget {rows[0]['total_bytes']:,} "
          "bytes (SDClip at the record's settings)")
    print(f"{'method':56s} {'bytes':>10s} {'bpb':>9s} {'tax':>9s} {'x SDClip':>8s} {'Σ H-err':>10s} {'quant s':>7s}")
    for row in rows:
        print(f"{row['method']:56s} {row['total_bytes']:>10,} {row['bpb']:9.5f} {row['tax']:+9.5f} "
              f"{row['tax_vs_sdclip']:8.3f} {row['h_error']:10.4g} {row['quantize_s']:7.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True,
                        help="a run directory (out/train/model.pt, out/calibrate/hessians.pt, data/); repeatable")
    parser.add_argument("--params", type=Path, default=Path("presets/research.yaml"))
    parser.add_argument("--out", type=Path, default=Path("rd_report"))
    parser.add_argument("--max-val-tokens", type=int, default=None, help="override evaluate.max_val_tokens")
    parser.add_argument("--no-curve", action="store_true", help="skip the sweep (the side-by-side table only)")
    parser.add_argument("--seed-methods", action="store_true",
                        help="on every run only SDClip and the allocators the seeds compare (no sweep)")
    parser.add_argument("--sliding", action="store_true",
                        help="score by sliding windows as the evaluate stage does (about 2x slower; default: plain)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for index, directory in enumerate(args.run):
        run = load_run(directory, args.params, args.max_val_tokens, args.sliding)
        every = index == 0 and not args.seed_methods
        rows = compare_methods(run, list(METHODS) if every else list(SEED_METHODS))
        print_rows(rows)
        all_rows += rows
        if every and not args.no_curve:
            points = curves(run, rows[0]["total_bytes"])
            write_csv(args.out / "rd_curve.csv", points)
            rate_distortion_plot(args.out / "rd_curve.png", points, rows[0]["total_bytes"])
            prequant, budget = rows[0]["prequant_bpb"], rows[0]["total_bytes"]
            sd = read_off(points, "sdclip", budget) - prequant
            print(f"\nread off the curves at {budget:,} bytes: SDClip tax {sd:+.5f}; "
                  f"{args.out / 'rd_curve.csv'}, {args.out / 'rd_curve.png'}")
            for label in CURVES:
                tax = read_off(points, label, budget) - prequant
                print(f"  {label}: tax {tax:+.5f} ({tax / sd:.3f} x SDClip's)")
            below = below_everywhere(points, "rate-aware allocate, ans", "allocate, ans")
            print(f"  rate-aware allocate, ans below allocate, ans within every budget of the sweep: {below}")
    write_csv(args.out / "methods.csv", all_rows)
    if len(args.run) > 1:
        for method in SEED_METHODS:
            taxes = [r["tax"] for r in all_rows if r["method"] == method]
            print(f"{method}: taxes {', '.join(f'{t:+.5f}' for t in taxes)} over {len(taxes)} seeds "
                  f"(spread {max(taxes) - min(taxes):.5f})")
        prequants = sorted({r["prequant_bpb"] for r in all_rows})
        print(f"trained weights' bpb over the seeds: {', '.join(f'{p:.5f}' for p in prequants)}")


if __name__ == "__main__":
    main()
