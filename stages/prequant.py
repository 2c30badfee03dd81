"""DVC stage ``prequant``: val_loss and val_bpb of the trained weights, before any quantization.

Scores ``out/train/model.pt`` with the same ``evaluate:`` settings (and code) as the
evaluate stage scores the artifact, so their difference is the quantization tax. It depends
on nothing that quantization or compression changes, so DVC keeps it cached through every
quantization experiment.
"""

from __future__ import annotations

import sys

from pgolf.clocks import Clocks
from pgolf.config import EvaluateConfig, TokenizeConfig, section, to_dict
from pgolf.data.shards import dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import init_distributed, shutdown
from pgolf.eval.score import checked_validation_set, score_validation
from pgolf.model.files import build_model
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, evaluate_processes, run_stage


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "evaluate", EvaluateConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    ws = ws.begin("prequant", params)
    ctx = init_distributed(cfg.device)
    try:
        record = log_provenance("prequant", {"evaluate": to_dict(cfg), "data_dir": data_dir,
                                             "world_size": ctx.world_size}) if ctx.is_main else {}
        clocks = Clocks.on_rank(ctx)
        model_file = ws.input(layout.TRAIN_MODEL)
        model = build_model(model_file, ctx.device)
        vocab = model.config.vocab_size
        dataset_dir = ws.input(dataset_path(data_dir, vocab))
        with clocks.phase("data_checks"):
            stream = checked_validation_set(dataset_dir, ws.input(tokenizer_file(data_dir, vocab)), vocab, cfg)
        with clocks.phase("prequant_eval"):
            metrics = score_validation("unquantized", model, model_file, stream, cfg, ctx)
        if ctx.is_main:
            clocks.record_process("whole_process")
            record["clocks"] = clocks.seconds
            ws.lineage.commit_score(ws.output(layout.PREQUANT_METRICS), metrics, dataset_dir,
                                    ws.output(layout.PREQUANT_PROVENANCE), record)
    finally:
        shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    return run_stage("prequant", run, argv, processes=evaluate_processes)


if __name__ == "__main__":
    sys.exit(main())
