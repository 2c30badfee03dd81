"""Model files that carry their own configuration.

The train stage (and ``pgolf import``) writes the model's weights together
with its ``ModelConfig``; later stages rebuild the model from the file alone
and never re-read the architecture from ``params.yaml``. Files hold only
tensors and plain values, and are read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pgolf.atomic import atomic_path
from pgolf.config import ConfigError, ModelConfig, from_dict, to_dict
from pgolf.model import GPT

FORMAT = "pgolf-model"
VERSION = 1


def save_model(path: str | Path, cfg: ModelConfig, state_dict: dict[str, Tensor]) -> None:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": to_dict(cfg),
        "state_dict": {name: t.detach().cpu().contiguous() for name, t in state_dict.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found (run the train stage or `pgolf import` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable pgolf model file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pgolf model file (no {FORMAT!r} marker)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: model file version {payload.get('version')!r}, this pgolf reads {VERSION}")
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
