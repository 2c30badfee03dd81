"""DVC stage ``calibrate``: trained weights + training shards -> GPTQ Hessians.

Rebuilds the model from ``out/train/model.pt`` (its configuration travels in the
file), switches looping on, runs ``calibration_batches`` batches of
``calibration_batch_tokens`` training tokens through it, drawn from the training
shards by the training sampler with the calibration seed, and writes the
Hessians ``Σ XᵀX / batches`` (REFERENCE.md section 4) to
``out/calibrate/hessians.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor

from pgolf.checkpoint import build_model
from pgolf.cli import run_stage
from pgolf.config import CalibrateConfig, ConfigError, TokenizeConfig, section, to_dict
from pgolf.hessians import collect_hessians, save_hessians
from pgolf.loader import TrainLoader
from pgolf.provenance import log_provenance
from pgolf.runtime import resolve_device, seed_everything
from pgolf.shards import dataset_path, shard_files

MODEL_PATH = Path("out/train/model.pt")
HESSIANS_PATH = Path("out/calibrate/hessians.pt")


def calibration_batches(files: list[Path], cfg: CalibrateConfig) -> list[Tensor]:
    """The input ids [B, T] of each calibration batch, from the training sampler."""
    if cfg.calibration_batches < 1:
        raise ConfigError(f"calibrate.calibration_batches must be at least 1, got {cfg.calibration_batches}")
    if cfg.seq_len < 1 or cfg.calibration_batch_tokens % cfg.seq_len or cfg.calibration_batch_tokens < cfg.seq_len:
        raise ConfigError(
            f"calibrate.calibration_batch_tokens={cfg.calibration_batch_tokens} must be a positive "
            f"multiple of calibrate.seq_len={cfg.seq_len}"
        )
    loader = TrainLoader(files, cfg.seq_len, cfg.seed, cfg.calibration_batch_tokens, grad_accum_steps=1)
    return [loader.micro_batch(index)[0] for index in range(cfg.calibration_batches)]


def run(params: dict) -> None:
    cfg = section(params, "calibrate", CalibrateConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    log_provenance("calibrate", {"calibrate": to_dict(cfg), "tokenize.data_dir": data_dir})
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_model(MODEL_PATH, device)
    files = shard_files(dataset_path(data_dir, model.config.vocab_size), "train")
    hessians = collect_hessians(model, calibration_batches(files, cfg), device)
    save_hessians(HESSIANS_PATH, hessians)
    print(f"[pgolf calibrate] {len(hessians)} Hessians from {cfg.calibration_batches} batches "
          f"-> {HESSIANS_PATH}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_stage("calibrate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
