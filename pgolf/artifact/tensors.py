"""What a quantized model is in memory: integer codes with one scale per row, and fp16 passthroughs.

GPTQ (``pgolf.quant``) produces a :class:`QuantizedModel`: its matrices as int8 codes of
``bits`` bits with one fp16 scale per row (:class:`QuantizedTensor`, ``W ≈ q · scale``), the
small tensors kept as they are. A quantized tensor named ``<name>.lqer_a`` [rows, r] with a
partner ``<name>.lqer_b`` [r, cols] is a low-rank correction of tensor ``<name>``
(:mod:`pgolf.quant.lqer`): :func:`dequantize` adds their product back. Anything inconsistent
in an artifact is an :class:`ArtifactError` that says what and where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pgolf.config import ModelConfig


class ArtifactError(ValueError):
    """Bytes that are not a valid serialized model or compressed artifact."""


def quant_max(bits: int) -> int:
    """The largest code of a signed, symmetric ``bits``-bit quantizer: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedTensor:
    """A matrix as integer codes and one scale per row: ``W ≈ q · scale[:, None]``."""

    q: Tensor  # int8 [rows, cols], values in [-qmax, qmax]
    scale: Tensor  # float16 [rows]
    bits: int
    clip_sigmas: float

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {self.q.dtype} {list(self.q.shape)}")
        if self.scale.dtype != torch.float16 or list(self.scale.shape) != [self.q.shape[0]]:
            raise ValueError(
                f"scale must be float16 [{self.q.shape[0]}], got {self.scale.dtype} {list(self.scale.shape)}"
            )
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        qmax = quant_max(self.bits)
        if self.q.numel() and (int(self.q.min()) < -qmax or int(self.q.max()) > qmax):
            raise ValueError(f"codes exceed ±{qmax} (the range of {self.bits}-bit codes)")

    def dequantize(self) -> Tensor:
        """``q · scale`` per row, float32 [rows, cols]."""
        return self.q.float() * self.scale.float()[:, None]


@dataclass(frozen=True)
class QuantizedModel:
    """Everything the artifact holds: the model's shape and its (quantized) tensors."""

    model_config: ModelConfig
    tensors: dict[str, QuantizedTensor | Tensor]  # Tensor: float16/float32 passthrough


LQER_SUFFIXES = (".lqer_a", ".lqer_b")  # a tensor's low-rank correction factors


def dequantize(qm: QuantizedModel) -> dict[str, Tensor]:
    """The float32 state dict of ``qm``: ``q · scale`` per row (plus any low-rank correction),
    passthrough tensors as float32."""
    state = {}
    for name, tensor in qm.tensors.items():
        if name.endswith(LQER_SUFFIXES):
            continue
        state[name] = tensor.dequantize() if isinstance(tensor, QuantizedTensor) else tensor.float()
        factors = [qm.tensors.get(name + suffix) for suffix in LQER_SUFFIXES]
        if any(f is not None for f in factors):
            state[name] = state[name] + _correction(name, factors, tuple(state[name].shape))
    orphans = [n for n in qm.tensors if n.endswith(LQER_SUFFIXES) and n.rsplit(".", 1)[0] not in state]
    if orphans:
        raise ArtifactError(f"low-rank correction without its tensor: {orphans[0]}")
    return state


def _correction(name: str, factors: list[Any], shape: tuple[int, ...]) -> Tensor:
    """``A B`` of a tensor's LQER factors [rows, r] and [r, cols], checked against its shape."""
    a, b = factors
    if not (isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor)):
        raise ArtifactError(f"{name}: a low-rank correction needs both quantized factors {LQER_SUFFIXES}")
    rows, rank = a.q.shape
    if b.q.shape[0] != rank or (rows, b.q.shape[1]) != shape:
        raise ArtifactError(f"{name}: correction factors {list(a.q.shape)} x {list(b.q.shape)} do not make {list(shape)}")
    return a.dequantize() @ b.dequantize()
