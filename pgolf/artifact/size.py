"""The challenge's size gate: compressed artifact + code bytes at most ``compress.size_limit_bytes``.

The quantize stage's size search, the compress stage and the exported runner all count here,
so a submission can never be measured one way and gated another: ``submission_bytes`` of a
quantized model, ``check_size`` of an artifact, ``pack_artifact`` (round trip checked, then
gated), the code bytes the bundle stage counted, and each tensor's share for the size plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from pgolf.artifact.compress import compress, compressed_tensor_sizes, decompress
from pgolf.artifact.format import serialize
from pgolf.artifact.tensors import CodedTensor, QuantizedModel
from pgolf.config import CompressConfig


class SizeLimitError(ValueError):
    """A submission over the size limit."""


class SizeFitError(ValueError):
    """Even the largest allowed clip sigmas gives an artifact over the limit."""


def submission_bytes(qm: QuantizedModel, cfg: CompressConfig, code: int) -> int:
    """Compressed artifact + code bytes of a quantized model, exactly as the compress stage counts."""
    return len(compress(serialize(qm), cfg)) + code


def check_size(artifact_bytes: int, code: int, limit: int) -> None:
    """The challenge's gate: compressed artifact + code bytes at most ``limit``."""
    total = artifact_bytes + code
    if total > limit:
        raise SizeLimitError(
            f"submission too large: {artifact_bytes:,} artifact + {code:,} code = {total:,} bytes, "
            f"over the limit of {limit:,} by {total - limit:,} bytes (raise quantize clip sigmas or lower bits)"
        )


def pack_artifact(raw: bytes, cfg: CompressConfig, code: int) -> bytes:
    """The artifact of a serialized model, its round trip checked and the size gate passed."""
    blob = compress(raw, cfg)
    if decompress(blob) != raw:
        raise ValueError(f"{cfg.compressor} round trip changed the data: artifact not written")
    check_size(len(blob), code, cfg.size_limit_bytes)
    return blob


def tensor_size_rows(qm: QuantizedModel, cfg: CompressConfig) -> list[dict]:
    """Each tensor's compressed size (compressed alone) and bits per weight, for the size plot."""
    rows = []
    for name, compressed in compressed_tensor_sizes(qm, cfg).items():
        tensor = qm.tensors[name]
        quantized = isinstance(tensor, CodedTensor)
        numel = tensor.q.numel() if quantized else tensor.numel()
        rows.append({
            "tensor": name,
            "kind": "quantized" if quantized else "passthrough",
            "bits": tensor.bits if quantized else 8 * tensor.element_size(),
            "numel": numel,
            "compressed_bytes": compressed,
            "bits_per_weight": round(8 * compressed / max(numel, 1), 4),
        })
    return rows


def read_code_bytes(path: Path) -> int:
    """The code bytes that the bundle stage counted (``{"code_bytes": N}``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the bundle stage first)")
    return int(json.loads(path.read_text(encoding="utf-8"))["code_bytes"])
