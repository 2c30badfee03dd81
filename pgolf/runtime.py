"""Where and how a stage computes: device choice, seeding, compilation and the bf16 autocast rule."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the GPU when there is one; ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but no CUDA GPU is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_compile(setting: bool | str, device: torch.device, key: str) -> bool:
    """``auto`` compiles on the GPU only; YAML's on/off arrive as booleans."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"{key} must be auto, true or false (on/off), got {setting!r}")


def enable_tf32() -> None:
    """TF32 for the float32 matmuls left outside autocast on the GPU, as the record ran."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def mixed_precision(device: torch.device) -> bool:
    """Whether ``device`` runs the record's bf16 mixed precision by default: the GPU does, the CPU float32."""
    return device.type == "cuda"


def autocast(device: torch.device, bf16: bool | None = None) -> AbstractContextManager:
    """bf16 autocast on ``device`` when it runs mixed precision (``bf16`` None: the device's default).

    The one rule for training, calibration and evaluation; ``bf16=True`` on the CPU
    runs the GPU's precision there (tests check it so without a GPU).
    """
    enabled = mixed_precision(device) if bf16 is None else bf16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
