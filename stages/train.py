"""DVC stage ``train``: training shards -> EMA weights, training metrics and plots.

Reads the ``model:`` and ``train:`` sections, checks the model's vocabulary
against the dataset's, and trains on one process or, under ``torchrun``, on N
(``pgolf train`` starts torchrun itself when ``train.nproc_per_node`` > 1).
Rank 0 commits the model (the EMA weights with their model config), the curves,
the plot, the provenance and the metrics together. A killed run resumes from
``checkpoints/train/last.pt`` (written every ``train.checkpoint_every`` steps;
not a DVC output, removed once the run has finished).
"""

from __future__ import annotations

import json
import sys

from pgolf import layout
from pgolf.atomic import stage_outputs
from pgolf.checkpoint import save_model
from pgolf.config import ModelConfig, TokenizeConfig, TrainConfig, section, to_dict
from pgolf.distributed import barrier, init_distributed, shutdown
from pgolf.loader import TrainLoader
from pgolf.model import GPT, count_parameters
from pgolf.plots import training_plot, write_csv
from pgolf.provenance import log_provenance
from pgolf.runtime import enable_tf32, seed_everything
from pgolf.shards import check_dataset, dataset_path, load_validation_tokens, shard_files
from pgolf.stage import Workspace, run_stage
from pgolf.tokenizer import byte_tables, tokenizer_file
from pgolf.train import CHECKPOINT_NAME, TrainResult, plain_validator, run_metrics, train


def run(params: dict, ws: Workspace) -> None:
    model_cfg, cfg = section(params, "model", ModelConfig), section(params, "train", TrainConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    ctx = init_distributed(cfg.device)
    if ctx.device.type == "cuda":
        enable_tf32()
    try:
        record = log_provenance("train", {"model": to_dict(model_cfg), "train": to_dict(cfg), "data_dir": data_dir,
                                          "world_size": ctx.world_size}) if ctx.is_main else {}
        dataset_dir = ws.input(dataset_path(data_dir, model_cfg.vocab_size))
        check_dataset(dataset_dir, ws.input(tokenizer_file(data_dir, model_cfg.vocab_size)), model_cfg.vocab_size)
        loader = TrainLoader(shard_files(dataset_dir, "train"), cfg.train_seq_len, cfg.seed,
                             cfg.train_batch_tokens, cfg.grad_accum_steps, ctx.rank, ctx.world_size)
        validate = None
        if cfg.val_loss_every > 0:
            tokens = load_validation_tokens(dataset_dir, cfg.train_seq_len, cfg.val_max_tokens)  # [N]
            tables = byte_tables(ws.input(tokenizer_file(data_dir, model_cfg.vocab_size)), model_cfg.vocab_size)
            validate = plain_validator(tokens, tables, cfg, ctx.device)
        seed_everything(cfg.seed)
        model = GPT(model_cfg)
        checkpoints = ws.output(layout.TRAIN_CHECKPOINTS)
        result = train(model, cfg, loader, ctx, checkpoints, validate=validate)
        if ctx.is_main:
            write_outputs(ws, model_cfg, result, run_metrics(result, count_parameters(model), ctx), record)
            (checkpoints / CHECKPOINT_NAME).unlink(missing_ok=True)  # finished: nothing to resume
        barrier(ctx)
    finally:
        shutdown(ctx)


def write_outputs(ws: Workspace, model_cfg: ModelConfig, result: TrainResult, metrics: dict, record: dict) -> None:
    with stage_outputs() as out:
        save_model(out.path(ws.output(layout.TRAIN_MODEL)), model_cfg, result.ema_state)
        write_csv(out.path(ws.output(layout.TRAIN_CURVE)), result.history)
        if result.val_history:
            write_csv(out.path(ws.output(layout.TRAIN_VAL_CURVE)), result.val_history)
        training_plot(out.path(ws.output(layout.TRAIN_PLOT)), result.history, result.val_history)
        out.write_json(ws.output(layout.TRAIN_PROVENANCE), record)
        out.write_json(ws.output(layout.TRAIN_METRICS), metrics)
    print(f"[pgolf train] wrote {ws.output(layout.TRAIN_MODEL)}: {json.dumps(metrics)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", run, argv, processes=lambda params: section(params, "train", TrainConfig).nproc_per_node)


if __name__ == "__main__":
    sys.exit(main())
