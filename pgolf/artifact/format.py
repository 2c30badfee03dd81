"""The quantized model's pickle-free byte format ("PGQM"): plain bytes that only describe arrays.

Reading an artifact can never run code. All integers little-endian::

    b"PGQM" | u32 version | u32 header_len | header (UTF-8 JSON, space padded) | payload

The header is ``{"model_config": {...ModelConfig...}, "tensors": [entry, ...]}`` with, per
entry, ``name``, ``kind`` ("quantized", "grouped" or "passthrough"), ``dtype`` ("int8",
"float16" or "float32"), ``shape``, ``offset`` and ``nbytes`` of its data array in the
payload; quantized entries add ``bits``, ``clip_sigmas`` and ``scale_offset``/``scale_nbytes``
of their float16 ``[rows]`` scales, grouped entries (:class:`GroupedTensor`, PR #1855's LQER
factors) ``bits``, ``group_size`` and the extent of their float16 ``[numel / group_size]``
scales. Arrays are raw little-endian, C order: first every int8 code array, then every
16/32-bit array, each at an even offset from an even payload start, so that the stride-2
shuffle puts all low bytes of the fp16 values together and all high bytes together. The
"grouped" kind came after the first artifacts; a model without it serializes to the same
bytes as before, and a reader that predates it refuses it as an unknown kind.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pgolf.artifact.tensors import ArtifactError, CodedTensor, GroupedTensor, QuantizedModel, QuantizedTensor
from pgolf.config import ConfigError, ModelConfig, from_dict, to_dict

MODEL_MAGIC = b"PGQM"


MODEL_VERSION = 1


_MODEL_PREFIX = struct.Struct("<4sII")  # magic, version, header_len


_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "int8": (torch.int8, np.dtype("<i1")),
    "float16": (torch.float16, np.dtype("<f2")),
    "float32": (torch.float32, np.dtype("<f4")),
}


_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}


def serialize(qm: QuantizedModel) -> bytes:
    """The pickle-free bytes of ``qm`` (format in the module docstring)."""
    # int8 codes first, then scales and passthrough tensors, each at an even offset
    codes: list[tuple[tuple[str, str], bytes]] = []  # ((tensor name, "data" | "scale"), little-endian bytes)
    others: list[tuple[tuple[str, str], bytes]] = []
    for name, tensor in qm.tensors.items():
        if isinstance(tensor, CodedTensor):
            codes.append(((name, "data"), _array_bytes(tensor.q)))
            others.append(((name, "scale"), _array_bytes(tensor.scale)))
        else:
            others.append(((name, "data"), _array_bytes(tensor)))
    placed: dict[tuple[str, str], tuple[int, int]] = {}  # -> (offset, nbytes)
    offset = 0
    for key, data in codes + others:
        offset += offset % 2
        placed[key] = (offset, len(data))
        offset += len(data)
    header = _header_bytes(qm, placed)
    payload = bytearray(offset)
    for key, data in codes + others:
        start, size = placed[key]
        payload[start:start + size] = data
    return _MODEL_PREFIX.pack(MODEL_MAGIC, MODEL_VERSION, len(header)) + header + bytes(payload)


def _array_bytes(tensor: Tensor) -> bytes:
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot serialize dtype {tensor.dtype} (supported: {', '.join(_DTYPES)})")
    _, np_dtype = _DTYPES[_DTYPE_NAMES[tensor.dtype]]
    return tensor.detach().cpu().contiguous().numpy().astype(np_dtype, copy=False).tobytes()


def _header_bytes(qm: QuantizedModel, placed: dict[tuple[str, str], tuple[int, int]]) -> bytes:
    entries = []
    for name, tensor in qm.tensors.items():
        offset, nbytes = placed[(name, "data")]
        if isinstance(tensor, QuantizedTensor):
            scale_offset, scale_nbytes = placed[(name, "scale")]
            entries.append({
                "name": name, "kind": "quantized", "dtype": "int8", "shape": list(tensor.q.shape),
                "offset": offset, "nbytes": nbytes, "bits": tensor.bits,
                "clip_sigmas": tensor.clip_sigmas, "scale_dtype": "float16",
                "scale_offset": scale_offset, "scale_nbytes": scale_nbytes,
            })
        elif isinstance(tensor, GroupedTensor):
            scale_offset, scale_nbytes = placed[(name, "scale")]
            entries.append({
                "name": name, "kind": "grouped", "dtype": "int8", "shape": list(tensor.q.shape),
                "offset": offset, "nbytes": nbytes, "bits": tensor.bits, "group_size": tensor.group_size,
                "scale_dtype": "float16", "scale_offset": scale_offset, "scale_nbytes": scale_nbytes,
            })
        else:
            entries.append({
                "name": name, "kind": "passthrough", "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape), "offset": offset, "nbytes": nbytes,
            })
    text = json.dumps({"model_config": to_dict(qm.model_config), "tensors": entries}).encode("utf-8")
    # pad so the payload starts at an even offset (keeps fp16 values byte-aligned for the shuffle)
    return text + b" " * ((_MODEL_PREFIX.size + len(text)) % 2)


def deserialize(data: bytes) -> QuantizedModel:
    """Rebuild a :class:`QuantizedModel` from :func:`serialize`'s bytes, validating everything."""
    if len(data) < _MODEL_PREFIX.size:
        raise ArtifactError(
            f"serialized model truncated: {len(data)} bytes, shorter than its {_MODEL_PREFIX.size}-byte prefix"
        )
    magic, version, header_len = _MODEL_PREFIX.unpack_from(data)
    if magic != MODEL_MAGIC:
        raise ArtifactError(f"not a serialized pgolf model: magic {magic!r}, expected {MODEL_MAGIC!r}")
    if version != MODEL_VERSION:
        raise ArtifactError(
            f"serialized model version {version} is not supported (this code reads version {MODEL_VERSION})"
        )
    payload_start = _MODEL_PREFIX.size + header_len
    if len(data) < payload_start:
        present = len(data) - _MODEL_PREFIX.size
        raise ArtifactError(f"serialized model truncated: header needs {header_len} bytes, {present} present")
    header = _parse_header(data[_MODEL_PREFIX.size:payload_start])
    payload = memoryview(data)[payload_start:]
    config = _model_config(header)
    tensors = {}
    for index, entry in enumerate(header["tensors"]):
        name, tensor = _read_entry(entry, index, payload)
        if name in tensors:
            raise ArtifactError(f"tensor {name!r} appears twice in the header")
        tensors[name] = tensor
    return QuantizedModel(model_config=config, tensors=tensors)


def split_header(raw: bytes) -> tuple[int, dict[str, Any]]:
    """Where the payload of a serialized model starts, and its parsed header."""
    if len(raw) < _MODEL_PREFIX.size:
        raise ArtifactError(f"serialized model truncated: {len(raw)} bytes, shorter than its prefix")
    magic, version, header_len = _MODEL_PREFIX.unpack_from(raw)
    if magic != MODEL_MAGIC or version != MODEL_VERSION:
        raise ArtifactError(f"not a serialized pgolf model of version {MODEL_VERSION}: {magic!r} version {version}")
    payload_start = _MODEL_PREFIX.size + header_len
    if len(raw) < payload_start:
        raise ArtifactError(f"serialized model header truncated: needs {header_len} bytes")
    return payload_start, _parse_header(raw[_MODEL_PREFIX.size:payload_start])


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"serialized model header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ArtifactError("serialized model header must be an object with a 'tensors' list")
    if not isinstance(header.get("model_config"), dict):
        raise ArtifactError("serialized model header lacks its 'model_config' object")
    return header


def _model_config(header: dict[str, Any]) -> ModelConfig:
    try:
        return from_dict(ModelConfig, header["model_config"], "artifact header: model_config")
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from None


def _read_entry(entry: Any, index: int, payload: memoryview) -> tuple[str, QuantizedTensor | Tensor]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ArtifactError(f"header tensor #{index} has no name")
    name = entry["name"]
    try:
        kind = entry["kind"]
        shape = entry["shape"]
        data = _read_array(payload, entry["dtype"], shape, entry["offset"], entry["nbytes"])
        if kind == "passthrough":
            return name, data
        if kind not in ("quantized", "grouped"):
            raise ArtifactError(f"unknown kind {kind!r} (expected 'quantized', 'grouped' or 'passthrough')")
        scale_count = scale_length(entry)
        scale = _read_array(payload, entry["scale_dtype"], [scale_count], entry["scale_offset"], entry["scale_nbytes"])
        if kind == "grouped":
            return name, GroupedTensor(q=data, scale=scale, bits=entry["bits"], group_size=entry["group_size"])
        return name, QuantizedTensor(q=data, scale=scale, bits=entry["bits"], clip_sigmas=float(entry["clip_sigmas"]))
    except KeyError as exc:
        raise ArtifactError(f"tensor {name!r}: header entry lacks {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"tensor {name!r}: {exc}") from None


def scale_length(entry: dict[str, Any]) -> int:
    """How many scales a quantized (one per row) or grouped (one per group) entry declares."""
    shape = entry["shape"]
    if entry["kind"] == "quantized":
        return shape[0] if len(shape) == 2 else 0
    group_size, numel = entry["group_size"], math.prod(shape)
    if not isinstance(group_size, int) or group_size <= 0 or numel % group_size:
        raise ArtifactError(f"group size {group_size!r} does not divide the {numel} codes of shape {shape}")
    return numel // group_size


def _read_array(payload: memoryview, dtype: Any, shape: Any, offset: Any, nbytes: Any) -> Tensor:
    check_array(dtype, shape, offset, nbytes, len(payload))
    torch_dtype, np_dtype = _DTYPES[dtype]
    array = np.frombuffer(payload, dtype=np_dtype, count=math.prod(shape), offset=offset)
    return torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True)).reshape(shape).to(torch_dtype)


def check_array(dtype: Any, shape: Any, offset: Any, nbytes: Any, payload_len: int) -> None:
    """Refuse an array entry whose dtype, shape and extent do not agree or do not fit the payload."""
    if dtype not in _DTYPES:
        raise ArtifactError(f"unknown dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArtifactError(f"shape {shape!r} is not a list of non-negative integers")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, nbytes)):
        raise ArtifactError(f"offset {offset!r} / nbytes {nbytes!r} must be non-negative integers")
    expected = math.prod(shape) * _DTYPES[dtype][1].itemsize
    if nbytes != expected:
        raise ArtifactError(f"declared {nbytes} bytes but shape {shape} of {dtype} needs {expected}")
    if offset + nbytes > payload_len:
        raise ArtifactError(
            f"data at bytes {offset}..{offset + nbytes} lies beyond the payload's {payload_len} bytes (truncated?)"
        )
