"""Model files that carry their own configuration, and the tagged tensor files under them.

The train stage (and ``pgolf import``) writes the model's weights together
with its ``ModelConfig``; later stages rebuild the model from the file alone
and never re-read the architecture from ``params.yaml``. Every torch file that
pgolf writes (models, Hessians, resume checkpoints) holds only tensors and
plain values under a format tag and version, is written atomically and is read
with ``weights_only=True``, so a wrong or foreign file is a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pgolf.atomic import atomic_path
from pgolf.config import ConfigError, ModelConfig, from_dict, to_dict
from pgolf.model import GPT

FORMAT = "pgolf-model"
VERSION = 1


def save_tagged(path: str | Path, tag: str, version: int, payload: dict[str, Any]) -> None:
    """``torch.save`` of ``payload`` under a format tag, whole or not at all."""
    with atomic_path(path) as tmp:
        torch.save({"format": tag, "version": version, **payload}, tmp)


def load_tagged(path: str | Path, tag: str, version: int, what: str, missing_hint: str = "") -> dict[str, Any]:
    """Read a file of ``save_tagged`` without unpickling code; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found{missing_hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable {what}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ValueError(f"{path}: not a {what} (no {tag!r} marker)")
    if payload.get("version") != version:
        raise ValueError(f"{path}: {what} version {payload.get('version')!r}, this pgolf reads {version}")
    return payload


def save_model(path: str | Path, cfg: ModelConfig, state_dict: dict[str, Tensor]) -> None:
    state_dict = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    save_tagged(path, FORMAT, VERSION, {"model_config": to_dict(cfg), "state_dict": state_dict})


def load_model(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    payload = load_tagged(path, FORMAT, VERSION, "model file",
                          " (run the train stage or `pgolf import` first)")
    try:
        cfg = from_dict(ModelConfig, payload["model_config"], f"{path}: model_config")
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    return cfg, payload["state_dict"]


def check_state_dict(model: GPT, state_dict: dict[str, Tensor], source: str) -> None:
    """Raise a ValueError naming every missing, unexpected or misshapen tensor."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {name: tuple(t.shape) for name, t in state_dict.items()}
    problems = [f"missing {n}" for n in sorted(expected.keys() - given.keys())]
    problems += [f"unexpected {n}" for n in sorted(given.keys() - expected.keys())]
    problems += [
        f"{n}: shape {given[n]} but the model has {expected[n]}"
        for n in sorted(expected.keys() & given.keys())
        if expected[n] != given[n]
    ]
    if problems:
        raise ValueError(f"{source}: weights do not fit the model config: " + "; ".join(problems[:10]))


def build_model(path: str | Path, device: torch.device | str = "cpu") -> GPT:
    """The model of a checkpoint, weights loaded, in float32 on ``device``."""
    cfg, state_dict = load_model(path)
    model = GPT(cfg)
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict({name: t.float() for name, t in state_dict.items()})
    return model.to(device)

