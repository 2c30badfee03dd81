"""DVC stage ``ttt``: score-first test-time training of the artifact (pgolf/ttt.py).

Loads the decompressed artifact (what a submission ships), adapts and scores the validation
split with ``ttt.method``, and writes ``out/ttt/metrics.json`` (score, work, seconds, the gain
against evaluate's sliding score of the same artifact, the compliance block) and the running
bpb per chunk in ``out/ttt/plots/``. ``ttt.enabled: false`` (the record) skips the work and
says so in the metrics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pgolf.atomic import write_json
from pgolf.cli import run_stage
from pgolf.config import EvaluateConfig, TokenizeConfig, TTTConfig, section, to_dict
from pgolf.distributed import init_distributed, relaunch_under_torchrun, shutdown, under_torchrun
from pgolf.plots import line_plot, write_csv
from pgolf.provenance import log_provenance
from pgolf.ttt import check_config, ttt_metrics, run_ttt
from stages.evaluate import ARTIFACT_PATH, quantized_model, validation_data

OUT_DIR = Path("out/ttt")
METRICS_PATH = OUT_DIR / "metrics.json"
PLOTS_DIR = OUT_DIR / "plots"
EVALUATE_METRICS = Path("out/evaluate/metrics.json")
TORCHRUN_PARAMS = Path(".pgolf/ttt_params.yaml")


def run(params: dict) -> None:
    cfg = section(params, "ttt", TTTConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    check_config(cfg)
    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        for stale in PLOTS_DIR.glob("*"):  # an earlier enabled run's plots would describe a score not made now
            stale.unlink()
        write_json(METRICS_PATH, {"enabled": False, "method": cfg.method})
        print("[pgolf ttt] ttt.enabled is false: no test-time training (set ttt.enabled=true to run it)")
        return
    if cfg.nproc_per_node > 1 and not under_torchrun(os.environ):
        relaunch_under_torchrun("stages.ttt", params, cfg.nproc_per_node, TORCHRUN_PARAMS)
        return
    ctx = init_distributed(cfg.device)
    try:
        if ctx.is_main:
            log_provenance("ttt", {"ttt": to_dict(cfg), "tokenize.data_dir": data_dir, "world_size": ctx.world_size})
        model = quantized_model(ARTIFACT_PATH, ctx.device)
        model.looping_active = True
        tokens, tables = validation_data(data_dir, model.config, EvaluateConfig(
            eval_seq_len=cfg.seq_len, max_val_tokens=cfg.max_val_tokens))
        result = run_ttt(model, tokens, tables, cfg, ctx.device, ctx)
        if ctx.is_main:
            evaluated = json.loads(EVALUATE_METRICS.read_text()) if EVALUATE_METRICS.is_file() else {}
            write_json(METRICS_PATH, ttt_metrics(result, cfg, evaluated, ctx.world_size))
            write_csv(PLOTS_DIR / "chunks.csv", result.chunks)
            line_plot(PLOTS_DIR / "running_bpb.png", [r["chunk"] for r in result.chunks],
                      {"running bpb": [r["running_bpb"] for r in result.chunks]}, "chunk (style A) or document "
                      "group (style B), in scoring order", "bpb", f"TTT {cfg.method}: running bpb")
            print(f"[pgolf ttt] {cfg.method}: val_loss {result.score.loss:.8f} val_bpb {result.score.bpb:.8f} "
                  f"({result.optimizer_steps:,} steps, {result.seconds:.1f} s); metrics in {METRICS_PATH}", flush=True)
    finally:
        shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    return run_stage("ttt", run, argv)


if __name__ == "__main__":
    sys.exit(main())
