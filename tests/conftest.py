"""Shared fixtures: the golden data of ../shared and the configs it was made with.

Tests that need ``../shared`` (the golden outputs of the reference, FineWeb
samples, tokenizers) skip with a message naming it when it is absent; CI has it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pgolf.config import ModelConfig, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# The reference's environment-variable names and ours (lower case, same meaning).
_MODEL_KEYS = {
    "VOCAB_SIZE": "vocab_size", "NUM_LAYERS": "num_layers", "MODEL_DIM": "model_dim",
    "EMBEDDING_DIM": "embedding_dim", "NUM_HEADS": "num_heads", "NUM_KV_HEADS": "num_kv_heads",
    "MLP_MULT": "mlp_mult", "ROPE_DIMS": "rope_dims", "XSA_LAST_N": "xsa_last_n",
    "NUM_LOOPS": "num_loops", "LOOP_START": "loop_start", "LOOP_END": "loop_end",
    "TRAIN_SEQ_LEN": "rope_train_seq_len", "QK_GAIN_INIT": "qk_gain_init", "LOGIT_SOFTCAP": "logit_softcap",
}
_TRAIN_KEYS = {
    "ITERATIONS": "iterations", "WARMUP_STEPS": "warmup_steps", "WARMDOWN_FRAC": "warmdown_frac",
    "ENABLE_LOOPING_AT": "enable_looping_at", "MUON_MOMENTUM_WARMUP_STEPS": "muon_momentum_warmup_steps",
    "EMA_DECAY": "ema_decay", "MAX_WALLCLOCK_SECONDS": "max_wallclock_seconds",
    "TRAIN_BATCH_TOKENS": "train_batch_tokens", "TRAIN_SEQ_LEN": "train_seq_len",
    "VAL_LOSS_EVERY": "val_loss_every", "TRAIN_LOG_EVERY": "train_log_every", "SEED": "seed",
}


@pytest.fixture(autouse=True)
def as_dvc_stage(monkeypatch):
    """Stages run as under ``dvc repro`` (which sets ``DVC_STAGE``): they read and write the pipeline's paths.

    A test of a hand run (``pgolf STAGE`` outside DVC) removes the variable.
    """
    monkeypatch.setenv("DVC_STAGE", "pytest")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared beside the checkout (CI has it)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR)


@pytest.fixture(scope="session")
def golden_tiny() -> dict:
    return torch.load(_require(SHARED_DIR / "golden" / "golden_tiny.pt"), weights_only=True)


@pytest.fixture(scope="session")
def golden_train() -> dict:
    return torch.load(_require(SHARED_DIR / "golden" / "golden_train_tiny.pt"), weights_only=True)


def model_config_from_reference(env: dict) -> ModelConfig:
    """A ModelConfig from the reference's environment-variable settings."""
    values = {ours: env[theirs] for theirs, ours in _MODEL_KEYS.items() if theirs in env}
    return ModelConfig(**values)


def train_config_from_reference(env: dict, **overrides) -> TrainConfig:
    values = {ours: env[theirs] for theirs, ours in _TRAIN_KEYS.items() if theirs in env}
    values["max_wallclock_seconds"] = float(values.get("max_wallclock_seconds", 0))
    return TrainConfig(**(values | overrides))


@pytest.fixture(scope="session")
def golden_model_config(golden_tiny) -> ModelConfig:
    return model_config_from_reference(golden_tiny["config"])
