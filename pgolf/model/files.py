"""Model files that carry their own configuration, and the tagged tensor files under them.

The train stage (and ``pgolf import``) writes the model's weights together
with its ``ModelConfig``; later stages rebuild the model from the file alone
and never re-read the architecture from ``params.yaml``. Every torch file that
pgolf writes (models, Hessians, resume checkpoints) holds only tensors and
plain values under a format tag and version, is written atomically and is read
with ``weights_only=True``, so a wrong or foreign file is a clear error. Each
file carries a sha256 of its whole payload (every tensor's bytes, dtype and
shape, and every plain value, in key order), verified on load: torch does not
check its zip's CRCs, so without it a flipped bit in tensor data would load
silently. Model files also refuse non-finite weights, on saving and on loading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from pgolf.atomic import atomic_open, recover
from pgolf.config import ConfigError, ModelConfig, from_dict, to_dict
from pgolf.model.gpt import GPT

FORMAT = "pgolf-model"
VERSION = 2  # 2: with a payload checksum; version 1 files (without one) are still read
CHECKSUM_KEY = "checksum"


def payload_checksum(payload: dict[str, Any]) -> str:
    """sha256 of every value of ``payload`` (tensors: dtype, shape and bytes), keys in sorted order."""
    digest = hashlib.sha256()
    _digest_value(digest, "", {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return "sha256:" + digest.hexdigest()


def _digest_value(digest: Any, where: str, value: Any) -> None:
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{where}:tensor:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            _digest_value(digest, f"{where}/{key!r}", value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{where}:seq:{len(value)};".encode())
        for index, item in enumerate(value):
            _digest_value(digest, f"{where}[{index}]", item)
    else:
        digest.update(f"{where}={value!r};".encode())


def save_tagged(path: str | Path, tag: str, version: int, payload: dict[str, Any]) -> None:
    """``torch.save`` of ``payload`` under a format tag, with its checksum, whole or not at all."""
    payload = {"format": tag, "version": version, **payload}
    payload[CHECKSUM_KEY] = payload_checksum(payload)
    with atomic_open(path, "wb") as handle:
        kept = _WriteErrors(handle)
        try:
            torch.save(payload, kept)
        except RuntimeError:
            if kept.error is None:
                raise
            raise kept.error from None  # disk full or file too large: atomic_open names the file


class _WriteErrors:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write.

    torch reports a failed write as an unrelated ``RuntimeError`` ("enforce fail at
    inline_container.cc"); the error the operating system gave is what the user needs.
    """

    def __init__(self, handle: BinaryIO):
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_tagged(
    path: str | Path, tag: str, version: int | tuple[int, ...], what: str, missing_hint: str = ""
) -> dict[str, Any]:
    """Read a file of ``save_tagged`` without unpickling code, its checksum verified when it has one.

    ``version`` is the version (or the versions) this reader accepts.
    """
    path = Path(path)
    recover(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found{missing_hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable {what}: {' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ValueError(f"{path}: not a {what} (no {tag!r} marker)")
    versions = (version,) if isinstance(version, int) else version
    if payload.get("version") not in versions:
        raise ValueError(f"{path}: {what} version {payload.get('version')!r}, this pgolf reads "
                         f"{' or '.join(map(str, versions))}")
    if CHECKSUM_KEY in payload and payload[CHECKSUM_KEY] != payload_checksum(payload):
        raise ValueError(f"{path}: {what} is corrupt: its contents do not match the checksum stored with them "
                         "(a damaged copy or disk?); restore or re-create it")
    return payload


def check_finite(state_dict: dict[str, Tensor], source: str) -> None:
    """Refuse weights with a NaN or an infinity, naming the tensors (floating-point ones are checked)."""
    counts = {name: t.numel() - int(torch.isfinite(t).sum()) for name, t in state_dict.items() if t.is_floating_point()}
    bad = [(name, count) for name, count in counts.items() if count]
    if bad:
        listed = ", ".join(f"{name} ({count} of {state_dict[name].numel()})" for name, count in bad[:5])
        more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
        raise ValueError(f"{source}: non-finite weights (NaN or inf) in {listed}{more}")


def save_model(path: str | Path, cfg: ModelConfig, state_dict: dict[str, Tensor]) -> None:
    state_dict = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    check_finite(state_dict, f"{path}: refusing to save")
    save_tagged(path, FORMAT, VERSION, {"model_config": to_dict(cfg), "state_dict": state_dict})


def load_model(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A model file's config and weights: checksum verified, every weight finite."""
    payload = load_tagged(path, FORMAT, (1, VERSION), "model file",
                          " (run the train stage or `pgolf import` first)")
    if payload["version"] >= 2 and CHECKSUM_KEY not in payload:
        raise ValueError(f"{path}: model file of version {payload['version']} without its checksum: damaged")
    try:
        cfg = from_dict(ModelConfig, payload["model_config"], f"{path}: model_config")
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    check_finite(payload["state_dict"], str(path))
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

