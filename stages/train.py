"""DVC stage ``train``: training shards -> EMA weights, training metrics and plots.

Reads the ``model:`` and ``train:`` sections, checks the model's vocabulary
against the dataset's and that no validation document is among the training ones
(``pgolf.data.leakage``), and trains on one process or, under ``torchrun``, on N
(``pgolf train`` starts torchrun itself when ``train.nproc_per_node`` > 1).
Rank 0 commits the model (the EMA weights with their model config), the curves,
the plot, the provenance and the metrics together. A killed run resumes from
``checkpoints/train/last.pt`` (written every ``train.checkpoint_every`` steps;
not a DVC output, removed once the run has finished).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pgolf.atomic import csv_text, stage_outputs
from pgolf.clocks import Clocks
from pgolf.config import ModelConfig, TokenizeConfig, TrainConfig, section, to_dict
from pgolf.data.leakage import check_no_leaks
from pgolf.data.shards import check_dataset, dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import barrier, init_distributed, shutdown
from pgolf.model.files import save_model
from pgolf.model.gpt import count_parameters
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage
from pgolf.runtime import enable_tf32
from pgolf.train.checkpoint import CHECKPOINT_NAME
from pgolf.train.loop import TrainResult, run_metrics, train_model


def run(params: dict, ws: Workspace) -> None:
    model_cfg, cfg = section(params, "model", ModelConfig), section(params, "train", TrainConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    ws = ws.begin("train", params)
    ctx = init_distributed(cfg.device)
    if ctx.device.type == "cuda":
        enable_tf32()
    try:
        record = log_provenance("train", {"model": to_dict(model_cfg), "train": to_dict(cfg), "data_dir": data_dir,
                                          "world_size": ctx.world_size}) if ctx.is_main else {}
        clocks = Clocks.on_rank(ctx)
        dataset_dir = ws.input(dataset_path(data_dir, model_cfg.vocab_size))
        tokenizer = ws.input(tokenizer_file(data_dir, model_cfg.vocab_size))
        with clocks.phase("data_checks"):
            check_dataset(dataset_dir, tokenizer, model_cfg.vocab_size)
            check_no_leaks(dataset_dir)
        checkpoints = ws.output(layout.TRAIN_CHECKPOINTS)
        start = time.perf_counter()
        model, result = train_model(model_cfg, cfg, dataset_dir, tokenizer, ctx, checkpoints)
        clocks.record_training(time.perf_counter() - start, result.elapsed_s)
        if ctx.is_main:
            clocks.record_process("whole_process")
            record["clocks"] = clocks.seconds
            write_outputs(ws, model_cfg, result, run_metrics(result, count_parameters(model), ctx), record)
            (checkpoints / CHECKPOINT_NAME).unlink(missing_ok=True)  # finished: nothing to resume
        barrier(ctx)
    finally:
        shutdown(ctx)


def write_outputs(ws: Workspace, model_cfg: ModelConfig, result: TrainResult, metrics: dict, record: dict) -> None:
    with stage_outputs() as out:
        save_model(out.path(ws.output(layout.TRAIN_MODEL)), model_cfg, result.final_state)
        plots = out.path(ws.output(layout.TRAIN_PLOTS))
        plots.mkdir()
        write_curve(plots, layout.TRAIN_CURVE, result.history)
        if result.val_history:
            write_curve(plots, layout.TRAIN_VAL_CURVE, result.val_history)
        out.write_json(ws.output(layout.TRAIN_METRICS), ws.lineage.stamp(metrics))
        ws.lineage.commit(out, ws.output(layout.TRAIN_PROVENANCE), record)
    print(f"[pgolf train] wrote {ws.output(layout.TRAIN_MODEL)}: {json.dumps(metrics)}", flush=True)


def write_curve(plots: Path, curve: str, rows: list[dict]) -> None:
    (plots / Path(curve).name).write_text(csv_text(rows, curve), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", run, argv, processes=lambda params: section(params, "train", TrainConfig).nproc_per_node)


if __name__ == "__main__":
    sys.exit(main())
