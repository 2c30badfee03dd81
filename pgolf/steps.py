"""The pipeline's steps as functions of configs and paths: what a stage computes, without its files.

Each DVC stage and the single-process runner of an exported submission (``pgolf.submit``)
call the same function here for the same step, with the same seeds, so the runner's
artifact is byte for byte the pipeline's. Checking the data is the caller's: a stage holds
it to the tokenize stage's manifest, the runner to the challenge's shard format. A stage adds only its provenance, plots and
committed outputs; the size-gated steps (quantize to fit, compress) are in
``pgolf.submission``, the scoring in ``pgolf.evaluate``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from pgolf.checkpoint import build_model
from pgolf.config import CalibrateConfig, ModelConfig, TrainConfig
from pgolf.distributed import DistContext
from pgolf.hessians import calibration_batches, collect_hessians, collect_output_sensitivity
from pgolf.loader import make_loader
from pgolf.model import GPT
from pgolf.runtime import resolve_device, seed_everything
from pgolf.shards import load_validation_tokens, shard_files
from pgolf.tokenizer import byte_tables
from pgolf.train import TrainResult, plain_validator, train


def train_model(model_cfg: ModelConfig, cfg: TrainConfig, dataset_dir: Path, tokenizer_path: Path,
                ctx: DistContext, checkpoints: Path | None) -> tuple[GPT, TrainResult]:
    """A model of ``model_cfg`` trained on the shards of ``dataset_dir`` (this rank's share; checked by the caller)."""
    loader = make_loader(cfg.loader, shard_files(dataset_dir, "train"), cfg.train_seq_len, cfg.seed,
                         cfg.train_batch_tokens, cfg.grad_accum_steps, ctx.rank, ctx.world_size)
    validate = None
    if cfg.val_loss_every > 0:
        tokens = load_validation_tokens(dataset_dir, cfg.train_seq_len, cfg.val_max_tokens)  # [N]
        validate = plain_validator(tokens, byte_tables(tokenizer_path, model_cfg.vocab_size), cfg, ctx.device)
    seed_everything(cfg.seed)
    model = GPT(model_cfg)
    return model, train(model, cfg, loader, ctx, checkpoints, validate=validate)


def calibration_model(model_path: Path, cfg: CalibrateConfig) -> GPT:
    """The trained model of ``model_path`` on the calibration device, the calibration seed set."""
    seed_everything(cfg.seed)
    return build_model(model_path, resolve_device(cfg.device))


def calibration_hessians(model: GPT, dataset_dir: Path, cfg: CalibrateConfig
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """GPTQ Hessians of ``model`` (on its device) from the training shards of ``dataset_dir`` (checked by
    the caller), and with ``cfg.output_sensitivity`` the weights' output sensitivities (else {})."""
    batches = calibration_batches(shard_files(dataset_dir, "train"), cfg)
    device = next(model.parameters()).device
    hessians = collect_hessians(model, batches, device)
    return hessians, collect_output_sensitivity(model, batches, device) if cfg.output_sensitivity else {}
