"""Shared fixtures: the golden data of the reference and the configs it was made with.

Parity tests take ``golden`` (and ``golden_trajectory``, ``golden_tokenizer``):
they run once against the compact set shipped in ``tests/assets/`` (always
there) and once against the full set of ``../shared/golden``. Tests that need
``../shared`` (the full golden set, FineWeb samples, tokenizers) skip with a
message naming it when it is absent; CI has it.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pgolf.config import ModelConfig, TrainConfig
from pgolf.data.shards import MANIFEST_NAME, file_sha256, validate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
ASSETS_DIR = REPO_ROOT / "tests" / "assets"

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


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the collected tests in reverse order (each test must pass in any order)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


def pytest_configure(config):
    """One thread in every process the tests run, this one and the ones it starts.

    Several tests compare runs made by different numbers of processes (1 against 2 under
    torchrun, which gives each worker one thread) or against data made with one thread;
    a float sum split over more threads rounds differently, and Newton–Schulz in bf16
    amplifies that. Tiny models also run faster on one thread.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


@functools.cache
def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@dataclass(frozen=True)
class GoldenSource:
    """Where one golden set lives: the reference's outputs, its trajectory and its tokenizer."""

    name: str
    tiny: Path
    train: Path
    tokenizer: Path
    shipped: bool  # in tests/assets: must be there, never skipped

    def path(self, kind: str) -> Path:
        path = getattr(self, kind)
        if self.shipped and not path.exists():
            raise FileNotFoundError(f"{path}: the compact golden set is missing (make it with tools/make_golden.py)")
        return path if self.shipped else _require(path)


GOLDEN_SOURCES = {
    "compact": GoldenSource("compact", ASSETS_DIR / "golden_compact.pt", ASSETS_DIR / "golden_train_compact.pt",
                            ASSETS_DIR / "fineweb_1024_bpe.model", shipped=True),
    "shared": GoldenSource("shared", SHARED_DIR / "golden" / "golden_tiny.pt",
                           SHARED_DIR / "golden" / "golden_train_tiny.pt",
                           SHARED_DIR / "tokenizers" / "fineweb_8192_bpe.model", shipped=False),
}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR)


@pytest.fixture(scope="session", params=list(GOLDEN_SOURCES))
def golden_source(request) -> GoldenSource:
    return GOLDEN_SOURCES[request.param]


@pytest.fixture(scope="session")
def golden(golden_source) -> dict:
    """The reference's outputs for a tiny model (tests/assets/README.md, ../shared/golden/README.md)."""
    return _load(golden_source.path("tiny"))


@pytest.fixture(scope="session")
def golden_trajectory(golden_source) -> dict:
    """The reference's training run from recorded batches, of the same set."""
    return _load(golden_source.path("train"))


@pytest.fixture(scope="session")
def golden_tokenizer(golden_source) -> Path:
    """The tokenizer the set's token ids come from."""
    return golden_source.path("tokenizer")


@pytest.fixture(scope="session")
def golden_config(golden) -> ModelConfig:
    return model_config_from_reference(golden["config"])


@pytest.fixture(scope="session")
def golden_tiny() -> dict:
    """The full set of ../shared only, for tests whose numbers are its model's (widths, sizes)."""
    return _load(GOLDEN_SOURCES["shared"].path("tiny"))


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


def write_manifest(dataset_dir: Path, vocab_size: int, tokenizer: Path, manifest_vocab: int | None = None) -> None:
    """The manifest the tokenize stage would write for shards made by hand (what stages check them against).

    ``tokenizer`` is the file whose sha256 the manifest records (the stages compare it byte for byte).
    """
    manifest = {"vocab_size": manifest_vocab or vocab_size, "splits": validate_dataset(dataset_dir, vocab_size),
                "tokenizer": {"sha256": file_sha256(tokenizer)}}
    (dataset_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
