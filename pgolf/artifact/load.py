"""From artifact bytes back to a model: what a submission scores.

:func:`artifact_model` decompresses, deserializes and dequantizes an artifact and loads it
into a ``GPT`` of the configuration the artifact carries, checking every tensor against the
model and refusing non-finite weights. Only the stages that score an artifact (evaluate,
ttt) and the runner need it; the compress stage does not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pgolf.artifact.compress import decompress
from pgolf.artifact.format import deserialize
from pgolf.artifact.tensors import QuantizedModel, dequantize
from pgolf.model.files import check_finite, check_state_dict
from pgolf.model.gpt import GPT


def load_artifact(blob: bytes) -> QuantizedModel:
    """Decompress and deserialize an artifact in one step."""
    return deserialize(decompress(blob))


def artifact_model(path: str | Path, device: torch.device | str = "cpu") -> GPT:
    """The model a submission scores: the artifact decompressed, deserialized and dequantized."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: artifact not found (run the compress stage first)")
    qm = load_artifact(path.read_bytes())
    model = GPT(qm.model_config)
    state = dequantize(qm)
    check_state_dict(model, state, str(path))
    check_finite(state, str(path))
    model.load_state_dict(state)
    return model.to(device)
