"""Resume checkpoints of the training loop: everything a killed run needs to finish with the same weights.

A checkpoint holds the model, optimisers, EMA/SWA state, loader position and random
generators under the tagged, checksummed tensor-file format of ``pgolf.model.files``; a
resumed run refuses a checkpoint of another model or of settings that change the
trajectory (only ``RESUMABLE_CHANGES`` may differ).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pgolf.config import TrainConfig, to_dict
from pgolf.model.files import load_tagged, save_tagged
from pgolf.model.gpt import GPT

CHECKPOINT_FORMAT = "pgolf-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "last.pt"
# Settings a resumed run may change: they do not alter the trajectory.
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "train_log_every", "val_loss_every",
                               "nproc_per_node", "device", "compile"})


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a resume checkpoint whole or not at all."""
    save_tagged(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, state)


def load_checkpoint(path: Path) -> dict:
    return load_tagged(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "training checkpoint")


def check_resumable(state: dict, model: GPT, cfg: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint of another model or of settings that change the trajectory."""
    if state["model_config"] != to_dict(model.config):
        raise ValueError(f"{path}: checkpoint of another model config; delete it to start afresh")
    saved, now = state["train_config"], to_dict(cfg)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        details = ", ".join(f"train.{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"{path}: settings changed since this checkpoint ({details}); delete it to start afresh")


def rng_state() -> dict[str, Tensor | list[Tensor]]:
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)
