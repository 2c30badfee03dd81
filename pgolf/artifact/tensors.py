"""What a quantized model is in memory: integer codes with their scales, and fp16 passthroughs.

GPTQ (``pgolf.quant``) produces a :class:`QuantizedModel`: its matrices as int8 codes of
``bits`` bits with one fp16 scale per row (:class:`QuantizedTensor`, ``W ≈ q · scale``), the
small tensors kept as they are. PR #1855's LQER factors are codes of the full two's-complement
range of ``bits`` bits with one fp16 scale per group of consecutive values
(:class:`GroupedTensor`). A tensor named ``<name>.lqer_a`` [rows, r] with a partner
``<name>.lqer_b`` [r, cols], both quantized one way or the other, is a low-rank correction of
tensor ``<name>`` (:mod:`pgolf.quant.lqer`): :func:`dequantize` adds their product back.
Anything inconsistent in an artifact is an :class:`ArtifactError` that says what and where.
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
class GroupedTensor:
    """Codes with one scale per group of ``group_size`` consecutive values (row-major):
    ``W ≈ q · scale[group]``, the codes in the two's-complement range of ``bits`` bits
    (PR #1855's LQER factors: A in {-2..1} with one scale, B in {-8..7} per 64 values)."""

    q: Tensor  # int8 [rows, cols], values in [-2^(bits-1), 2^(bits-1) - 1]
    scale: Tensor  # float16 [rows · cols / group_size]
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {self.q.dtype} {list(self.q.shape)}")
        if self.group_size <= 0 or self.q.numel() % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the {self.q.numel()} codes")
        groups = self.q.numel() // self.group_size
        if self.scale.dtype != torch.float16 or list(self.scale.shape) != [groups]:
            raise ValueError(f"scale must be float16 [{groups}], got {self.scale.dtype} {list(self.scale.shape)}")
        if not 2 <= self.bits <= 7:  # ans codes them in the symmetric range of bits + 1 <= 8
            raise ValueError(f"bits of grouped codes must be in 2..7, got {self.bits}")
        low, high = grouped_code_range(self.bits)
        if self.q.numel() and (int(self.q.min()) < low or int(self.q.max()) > high):
            raise ValueError(f"codes exceed {low}..{high} (the range of {self.bits}-bit two's-complement codes)")

    def dequantize(self) -> Tensor:
        """``q · scale`` per group, float32 [rows, cols]."""
        groups = self.q.float().reshape(-1, self.group_size) * self.scale.float()[:, None]  # [groups, size]
        return groups.reshape(self.q.shape)


def grouped_code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest code of a two's-complement ``bits``-bit grid."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


CodedTensor = QuantizedTensor | GroupedTensor  # a tensor stored as integer codes and fp16 scales


@dataclass(frozen=True)
class QuantizedModel:
    """Everything the artifact holds: the model's shape and its (quantized) tensors."""

    model_config: ModelConfig
    tensors: dict[str, CodedTensor | Tensor]  # Tensor: float16/float32 passthrough


LQER_SUFFIXES = (".lqer_a", ".lqer_b")  # a tensor's low-rank correction factors


def correction_names(name: str) -> tuple[str, str]:
    """The artifact names of ``name``'s correction factors (A, B)."""
    return tuple(name + suffix for suffix in LQER_SUFFIXES)


def dequantize(qm: QuantizedModel) -> dict[str, Tensor]:
    """The float32 state dict of ``qm``: ``q · scale`` per row (plus any low-rank correction),
    passthrough tensors as float32."""
    state = {}
    for name, tensor in qm.tensors.items():
        if name.endswith(LQER_SUFFIXES):
            continue
        state[name] = tensor.dequantize() if isinstance(tensor, CodedTensor) else tensor.float()
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
    if not (isinstance(a, CodedTensor) and isinstance(b, CodedTensor)):
        raise ArtifactError(f"{name}: a low-rank correction needs both quantized factors {LQER_SUFFIXES}")
    rows, rank = a.q.shape
    if b.q.shape[0] != rank or (rows, b.q.shape[1]) != shape:
        raise ArtifactError(f"{name}: correction factors {list(a.q.shape)} x {list(b.q.shape)} do not make {list(shape)}")
    return a.dequantize() @ b.dequantize()
