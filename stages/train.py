"""DVC stage ``train``: training shards -> EMA weights, training metrics and plots.

Reads the ``model:`` and ``train:`` sections, checks the model's vocabulary
against the dataset's, and trains on one process or, under ``torchrun``, on
N (``torchrun --standalone --nproc_per_node=N -m stages.train``; ``pgolf
train`` starts torchrun itself when ``train.nproc_per_node`` > 1). Rank 0
writes ``out/train/model.pt`` (the EMA weights with their model config),
``out/train/metrics.json`` and ``out/train/plots/``. A killed run resumes from
``checkpoints/train/last.pt`` (written every ``train.checkpoint_every`` steps;
not a DVC output, removed once the run has finished).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


from pgolf.atomic import write_json
from pgolf.checkpoint import save_model
from pgolf.cli import run_stage
from pgolf.config import ModelConfig, TokenizeConfig, TrainConfig, section, to_dict
from pgolf.distributed import (
    DistContext, barrier, init_distributed, relaunch_under_torchrun, shutdown, under_torchrun,
)
from pgolf.evaluate import eval_plain
from pgolf.loader import TrainLoader
from pgolf.model import GPT, count_parameters
from pgolf.plots import line_plot, write_csv
from pgolf.provenance import log_provenance
from pgolf.runtime import enable_tf32, seed_everything
from pgolf.shards import MANIFEST_NAME, dataset_path, load_validation_tokens, shard_files, validate_dataset
from pgolf.tokenizer import byte_tables, tokenizer_file
from pgolf.train import CHECKPOINT_NAME, TrainResult, Validator, train

OUT_DIR = Path("out/train")
MODEL_PATH = OUT_DIR / "model.pt"
METRICS_PATH = OUT_DIR / "metrics.json"
PLOTS_DIR = OUT_DIR / "plots"
CSV_PATH = PLOTS_DIR / "train.csv"
LOSS_PNG_PATH = PLOTS_DIR / "train_loss.png"
VAL_CSV_PATH = PLOTS_DIR / "val.csv"
CHECKPOINT_DIR = Path("checkpoints/train")
TORCHRUN_PARAMS = Path(".pgolf/train_params.yaml")  # the resolved params, for the relaunched processes


def check_vocab(dataset_dir: Path, vocab_size: int) -> None:
    """The dataset must be tokenized with the model's vocabulary (manifest, else max id)."""
    manifest = dataset_dir / MANIFEST_NAME
    if manifest.is_file():
        data_vocab = json.loads(manifest.read_text(encoding="utf-8")).get("vocab_size")
        if data_vocab != vocab_size:
            raise ValueError(f"{manifest}: vocab_size {data_vocab} but params.yaml model.vocab_size is {vocab_size}")
        return
    validate_dataset(dataset_dir, vocab_size)  # no manifest: every id must be below vocab_size


def validator(data_dir: str, model_cfg: ModelConfig, cfg: TrainConfig, ctx: DistContext) -> Validator:
    """Plain validation loss and bpb over ``val_max_tokens`` (0: all) in training-length windows."""
    tokens = load_validation_tokens(dataset_path(data_dir, model_cfg.vocab_size), cfg.train_seq_len)  # [N]
    if cfg.val_max_tokens:
        windows = (min(cfg.val_max_tokens, tokens.numel()) - 1) // cfg.train_seq_len
        if windows <= 0:
            raise ValueError(f"train.val_max_tokens={cfg.val_max_tokens} is too few for train_seq_len {cfg.train_seq_len}")
        tokens = tokens[: windows * cfg.train_seq_len + 1]
    tables = byte_tables(tokenizer_file(data_dir, model_cfg.vocab_size), model_cfg.vocab_size)
    batch_seqs = cfg.train_batch_tokens // (cfg.grad_accum_steps * cfg.train_seq_len)  # a training micro-batch

    def validate(model: GPT) -> tuple[float, float]:
        score = eval_plain(model, tokens, tables, cfg.train_seq_len, batch_seqs, ctx.device)
        return score.loss, score.bpb

    return validate


def write_outputs(model_cfg: ModelConfig, result: TrainResult, num_params: int, ctx: DistContext) -> None:
    save_model(MODEL_PATH, model_cfg, result.ema_state)
    write_csv(CSV_PATH, result.history)
    steps = [row["step"] for row in result.history]
    line_plot(LOSS_PNG_PATH, steps, {"train loss": [row["train_loss"] for row in result.history]},
              "step", "loss (nats)", "Training loss")
    if result.val_history:
        write_csv(VAL_CSV_PATH, result.val_history)
    metrics = {
        "train_loss": result.losses[-1],
        "steps": result.steps,
        "train_time_s": result.elapsed_s,
        "tokens": result.steps * result.tokens_per_step,
        "tokens_per_s": result.steps * result.tokens_per_step / max(result.elapsed_s, 1e-9),
        "stopped_by_wallclock": result.stopped_by_wallclock,
        "model_params": num_params,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
    }
    if result.val_history:
        metrics |= {"val_loss": result.val_history[-1]["val_loss"], "val_bpb": result.val_history[-1]["val_bpb"]}
    write_json(METRICS_PATH, metrics)
    print(f"[pgolf train] wrote {MODEL_PATH}: {json.dumps(metrics)}", flush=True)


def run(params: dict) -> None:
    model_cfg = section(params, "model", ModelConfig)
    train_cfg = section(params, "train", TrainConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    if train_cfg.nproc_per_node > 1 and not under_torchrun(os.environ):
        relaunch_under_torchrun("stages.train", params, train_cfg.nproc_per_node, TORCHRUN_PARAMS)
        return
    ctx = init_distributed(train_cfg.device)
    if ctx.device.type == "cuda":
        enable_tf32()
    try:
        if ctx.is_main:
            log_provenance("train", {"model": to_dict(model_cfg), "train": to_dict(train_cfg),
                                     "data_dir": data_dir, "world_size": ctx.world_size})
        dataset_dir = dataset_path(data_dir, model_cfg.vocab_size)
        check_vocab(dataset_dir, model_cfg.vocab_size)
        loader = TrainLoader(shard_files(dataset_dir, "train"), train_cfg.train_seq_len, train_cfg.seed,
                             train_cfg.train_batch_tokens, train_cfg.grad_accum_steps, ctx.rank, ctx.world_size)
        validate = validator(data_dir, model_cfg, train_cfg, ctx) if train_cfg.val_loss_every > 0 else None
        seed_everything(train_cfg.seed)
        model = GPT(model_cfg)
        num_params = count_parameters(model)
        result = train(model, train_cfg, loader, ctx, CHECKPOINT_DIR, validate=validate)
        if ctx.is_main:
            write_outputs(model_cfg, result, num_params, ctx)
            (CHECKPOINT_DIR / CHECKPOINT_NAME).unlink(missing_ok=True)  # finished: nothing to resume
        barrier(ctx)
    finally:
        shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", run, argv)


if __name__ == "__main__":
    sys.exit(main())
