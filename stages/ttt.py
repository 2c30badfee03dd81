"""DVC stage ``ttt``: score-first test-time training of the artifact (pgolf/eval/ttt.py).

Loads the decompressed artifact (what a submission ships), adapts and scores the validation
split with ``ttt.method``, and commits ``out/ttt/metrics.json`` (score, work, seconds, the
gain against evaluate's sliding score of the same artifact, the compliance block) and the
running bpb per chunk in ``out/ttt/plots/``. ``ttt.enabled: false`` (the record) skips the
work and says so in the metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pgolf.artifact.load import artifact_model
from pgolf.atomic import csv_text, stage_outputs
from pgolf.clocks import Clocks
from pgolf.config import EvaluateConfig, TokenizeConfig, TTTConfig, section, to_dict
from pgolf.data.shards import dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import init_distributed, shutdown
from pgolf.eval.score import checked_validation_set
from pgolf.eval.ttt import run_ttt, ttt_metrics
from pgolf.fingerprint import data_fingerprint
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "ttt", TTTConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    ws = ws.begin("ttt", params)
    ctx = init_distributed(cfg.device) if cfg.enabled else None
    try:
        record = log_provenance("ttt", {"ttt": to_dict(cfg), "data_dir": data_dir,
                                        "world_size": ctx.world_size if ctx else 1}) if not ctx or ctx.is_main else {}
        if ctx is None:
            print("[pgolf ttt] ttt.enabled is false: no test-time training (set ttt.enabled=true to run it)")
            commit(ws, ws.lineage.stamp({"enabled": False, "method": cfg.method}), [], record)
            return
        clocks = Clocks.on_rank(ctx)
        with clocks.phase("decompression"):
            model = artifact_model(ws.input(layout.COMPRESS_ARTIFACT), ctx.device)
        model.looping_active = True
        vocab = model.config.vocab_size
        dataset_dir, tokenizer = ws.input(dataset_path(data_dir, vocab)), ws.input(tokenizer_file(data_dir, vocab))
        with clocks.phase("data_checks"):
            stream = checked_validation_set(dataset_dir, tokenizer, vocab,
                                            EvaluateConfig(eval_seq_len=cfg.seq_len, max_val_tokens=cfg.max_val_tokens))
        with clocks.phase("ttt"):  # compile warm-up included: run_ttt compiles inside
            result = run_ttt(model, stream, cfg, ctx.device, ctx)
        if ctx.is_main:
            clocks.record_process("whole_process")
            record |= {"clocks": clocks.seconds, "fingerprint": data_fingerprint(dataset_dir, tokenizer, stream)}
            evaluated = ws.reference(layout.EVALUATE_METRICS)
            evaluated = json.loads(evaluated.read_text(encoding="utf-8")) if evaluated and evaluated.is_file() else {}
            metrics = ttt_metrics(result, cfg, evaluated, ctx.world_size)
            commit(ws, ws.lineage.stamp(metrics, result.tokens, dataset_dir), result.chunks, record)
            print(f"[pgolf ttt] {cfg.method}: val_loss {result.score.loss:.8f} val_bpb {result.score.bpb:.8f} "
                  f"({result.optimizer_steps:,} steps, {result.seconds:.1f} s)", flush=True)
    finally:
        if ctx is not None:
            shutdown(ctx)


def commit(ws: Workspace, metrics: dict, chunks: list[dict], record: dict) -> None:
    """Metrics, provenance and the per-chunk plots (empty when nothing was trained) together."""
    with stage_outputs() as out:
        plots = out.path(ws.output(layout.TTT_PLOTS))
        plots.mkdir()
        if chunks:
            (plots / Path(layout.TTT_CHUNKS).name).write_text(csv_text(chunks, layout.TTT_CHUNKS))
        out.write_json(ws.output(layout.TTT_METRICS), metrics)
        ws.lineage.commit(out, ws.output(layout.TTT_PROVENANCE), record)


def processes(params: dict) -> int:
    cfg = section(params, "ttt", TTTConfig)
    return cfg.nproc_per_node if cfg.enabled else 1


def main(argv: list[str] | None = None) -> int:
    return run_stage("ttt", run, argv, processes=processes)


if __name__ == "__main__":
    sys.exit(main())
