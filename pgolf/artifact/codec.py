"""The quantized model in memory, its pickle-free byte format, and the compressed artifact.

GPTQ produces a :class:`QuantizedModel` (int codes with one fp16 scale per row, and small
fp16 tensors kept as they are). :func:`serialize` turns it into plain bytes that only
describe arrays, so reading an artifact can never run code; :func:`compress` byte-shuffles
those bytes (docs/DESIGN.md §6) and codes them with brotli, lzma or zstd, or codes the
model's arrays under explicit probability models (``ans``, :mod:`pgolf.artifact.ans`), inside a
small container that names the coder and its version, so :func:`decompress` needs no
parameters. Decompression stops once the output passes the declared raw length. Anything
wrong with a file is an :class:`ArtifactError` that says what and where.

Serialized model ("PGQM", version 1), all integers little-endian::

    b"PGQM" | u32 version | u32 header_len | header (UTF-8 JSON, space padded) | payload

The header is ``{"model_config": {...ModelConfig...}, "tensors": [entry, ...]}`` with, per
entry, ``name``, ``kind`` ("quantized" or "passthrough"), ``dtype`` ("int8", "float16" or
"float32"), ``shape``, ``offset`` and ``nbytes`` of its data array in the payload; quantized
entries add ``bits``, ``clip_sigmas`` and ``scale_offset``/``scale_nbytes`` of their
float16 ``[rows]`` scales. Arrays are raw little-endian, C order: first every int8 code
array, then every 16/32-bit array, each at an even offset from an even payload start, so
that the stride-2 shuffle puts all low bytes of the fp16 values together and all high
bytes together.

A quantized entry named ``<name>.lqer_a`` [rows, r] with a partner ``<name>.lqer_b`` [r, cols]
is a low-rank correction of tensor ``<name>`` (:mod:`pgolf.quant.lqer`): dequantized, ``<name>``
is its own ``q · scale`` plus the product of the two.

Compressed artifact ("PGAZ", version 2)::

    b"PGAZ" | u8 version | u8 compressor | u8 coder version | u64 raw_len | u32 crc32(raw) | stream

with compressor 1 brotli, 2 lzma, 3 zstd (coder version 1: ``stream`` is the library's
stream of the shuffle ``b"BSHF" | u8 stride | shuffled bytes``, the reference's shuffle
header, written for stride 1 as well so that a stream always says how to undo it) or 4
ans (``stream`` as :mod:`pgolf.artifact.ans` describes, coder version
:data:`pgolf.artifact.ans.CODER_VERSION`). Version 1, written before the coder version byte,
is ``b"PGAZ" | u8 1 | u8 compressor (1 or 2) | u64 raw_len | u32 crc32 | stream`` and
still loads.
"""

from __future__ import annotations

import json
from pathlib import Path
import lzma
import math
import struct
import zlib
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import brotli
import numpy as np
import torch
import zstandard
from torch import Tensor

from pgolf.artifact import ans  
from pgolf.model.files import check_finite, check_state_dict
from pgolf.config import CompressConfig, ConfigError, ModelConfig, from_dict, to_dict
from pgolf.model.gpt import GPT


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


def round_rows(matrix: Tensor, bits: int) -> QuantizedTensor:
    """Round-to-nearest codes with one max-|row| fp16 scale per row of [rows, cols] (QuantGate's int8)."""
    qmax = quant_max(bits)
    scale = (matrix.float().abs().amax(dim=1) / qmax).to(torch.float16)  # [rows]
    # an all-zero row: the smallest fp16 subnormal keeps the codes finite
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))
    codes = torch.clamp(torch.round(matrix.float() / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return QuantizedTensor(codes, scale, bits, 0.0)


@dataclass(frozen=True)
class QuantizedModel:
    """Everything the artifact holds: the model's shape and its (quantized) tensors."""

    model_config: ModelConfig
    tensors: dict[str, QuantizedTensor | Tensor]  # Tensor: float16/float32 passthrough


LQER_SUFFIXES = (".lqer_a", ".lqer_b")  # a tensor's low-rank correction factors
MODEL_MAGIC = b"PGQM"
MODEL_VERSION = 1
ARTIFACT_MAGIC = b"PGAZ"
ARTIFACT_VERSION = 2
SHUFFLE_MAGIC = b"BSHF"
COMPRESSORS = {"brotli": 1, "lzma": 2, "zstd": 3, "ans": 4}
GENERAL_CODER_VERSION = 1  # the coder version of brotli / lzma / zstd: the library's stream of the shuffle

_MODEL_PREFIX = struct.Struct("<4sII")  # magic, version, header_len
_ARTIFACT_PREFIX = struct.Struct("<4sBBBQI")  # magic, version, compressor, coder version, raw_len, crc32
_ARTIFACT_PREFIX_V1 = struct.Struct("<4sBBQI")  # version 1: magic, version, compressor, raw_len, crc32
_SHUFFLE_HEADER_LEN = 5  # b"BSHF" + stride
_PIECE = 1 << 20  # bytes per step of bounded decompression
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "int8": (torch.int8, np.dtype("<i1")),
    "float16": (torch.float16, np.dtype("<f2")),
    "float32": (torch.float32, np.dtype("<f4")),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}


# ---------------------------------------------------------------------------- serialize


def serialize(qm: QuantizedModel) -> bytes:
    """The pickle-free bytes of ``qm`` (format in the module docstring)."""
    # int8 codes first, then scales and passthrough tensors, each at an even offset
    codes: list[tuple[tuple[str, str], bytes]] = []  # ((tensor name, "data" | "scale"), little-endian bytes)
    others: list[tuple[tuple[str, str], bytes]] = []
    for name, tensor in qm.tensors.items():
        if isinstance(tensor, QuantizedTensor):
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
        else:
            entries.append({
                "name": name, "kind": "passthrough", "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape), "offset": offset, "nbytes": nbytes,
            })
    text = json.dumps({"model_config": to_dict(qm.model_config), "tensors": entries}).encode("utf-8")
    # pad so the payload starts at an even offset (keeps fp16 values byte-aligned for the shuffle)
    return text + b" " * ((_MODEL_PREFIX.size + len(text)) % 2)


# -------------------------------------------------------------------------- deserialize


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
        if kind != "quantized":
            raise ArtifactError(f"unknown kind {kind!r} (expected 'quantized' or 'passthrough')")
        rows = shape[0] if len(shape) == 2 else 0
        scale = _read_array(payload, entry["scale_dtype"], [rows], entry["scale_offset"], entry["scale_nbytes"])
        return name, QuantizedTensor(q=data, scale=scale, bits=entry["bits"], clip_sigmas=float(entry["clip_sigmas"]))
    except KeyError as exc:
        raise ArtifactError(f"tensor {name!r}: header entry lacks {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"tensor {name!r}: {exc}") from None


def _read_array(payload: memoryview, dtype: Any, shape: Any, offset: Any, nbytes: Any) -> Tensor:
    _check_array(dtype, shape, offset, nbytes, len(payload))
    torch_dtype, np_dtype = _DTYPES[dtype]
    array = np.frombuffer(payload, dtype=np_dtype, count=math.prod(shape), offset=offset)
    return torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True)).reshape(shape).to(torch_dtype)


def _check_array(dtype: Any, shape: Any, offset: Any, nbytes: Any, payload_len: int) -> None:
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


# --------------------------------------------------------------------------- dequantize


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


# ------------------------------------------------------------------ shuffle and compress


def byte_shuffle(data: bytes, stride: int) -> bytes:
    """``BSHF | stride | bytes at offsets ≡ 0 (mod stride), then ≡ 1, ...`` (the reference's shuffle)."""
    if not 1 <= stride <= 255:
        raise ValueError(f"shuffle stride must be in 1..255, got {stride}")
    src = np.frombuffer(data, dtype=np.uint8)
    shuffled = np.concatenate([src[pos::stride] for pos in range(stride)]) if len(src) else src
    return SHUFFLE_MAGIC + bytes([stride]) + shuffled.tobytes()


def byte_unshuffle(data: bytes) -> bytes:
    """Undo :func:`byte_shuffle`."""
    if len(data) < 5 or data[:4] != SHUFFLE_MAGIC or data[4] == 0:
        raise ArtifactError("decompressed stream does not start with a valid 'BSHF' shuffle header")
    stride = data[4]
    payload = np.frombuffer(data, dtype=np.uint8, offset=5)
    out = np.empty_like(payload)
    start = 0
    for pos in range(stride):
        lane = out[pos::stride]  # a view: writing it fills every stride-th byte
        lane[:] = payload[start:start + len(lane)]
        start += len(lane)
    return out.tobytes()


def compress(raw: bytes, cfg: CompressConfig) -> bytes:
    """Code ``raw`` (a serialized model) into a self-describing artifact with ``cfg.compressor``."""
    if cfg.compressor not in COMPRESSORS:
        raise ValueError(f"compress.compressor: unknown {cfg.compressor!r} (known: {', '.join(COMPRESSORS)})")
    if cfg.compressor == "ans":
        stream, coder_version = _ans_compress(raw), ans.CODER_VERSION
    else:
        stream, coder_version = _general_compress(byte_shuffle(raw, cfg.shuffle_stride), cfg), GENERAL_CODER_VERSION
    prefix = _ARTIFACT_PREFIX.pack(
        ARTIFACT_MAGIC, ARTIFACT_VERSION, COMPRESSORS[cfg.compressor], coder_version, len(raw), zlib.crc32(raw)
    )
    return prefix + stream


def _general_compress(shuffled: bytes, cfg: CompressConfig) -> bytes:
    if cfg.compressor == "brotli":
        return brotli.compress(shuffled, quality=cfg.brotli_quality)
    if cfg.compressor == "lzma":
        return lzma.compress(shuffled, preset=cfg.lzma_preset)
    return zstandard.ZstdCompressor(level=cfg.zstd_level).compress(shuffled)


def decompress(blob: bytes) -> bytes:
    """The raw bytes inside an artifact made by :func:`compress`, checked against its length and CRC.

    Decoding stops as soon as the output would pass the declared raw length, so a small
    artifact cannot make the reader allocate more than it declares.
    """
    compressor, coder_version, raw_len, crc, stream = _read_prefix(blob)
    names = {code: name for name, code in COMPRESSORS.items()}
    if compressor not in names:
        raise ArtifactError(f"artifact names unknown compressor id {compressor} (known: {names})")
    name = names[compressor]
    expected_version = ans.CODER_VERSION if name == "ans" else GENERAL_CODER_VERSION
    if coder_version != expected_version:
        raise ArtifactError(
            f"artifact's {name} coder version {coder_version} is not supported (this code reads {expected_version})"
        )
    if name == "ans":
        raw = _ans_decompress(stream, raw_len)
    else:
        raw = byte_unshuffle(_inflate_bounded(name, stream, raw_len + _SHUFFLE_HEADER_LEN))
    if len(raw) != raw_len or zlib.crc32(raw) != crc:
        raise ArtifactError(
            f"artifact corrupt: decompressed {len(raw)} bytes (crc {zlib.crc32(raw):08x}), "
            f"header promises {raw_len} bytes (crc {crc:08x})"
        )
    return raw


def _read_prefix(blob: bytes) -> tuple[int, int, int, int, bytes]:
    """``(compressor id, coder version, raw_len, crc, stream)`` of an artifact of version 1 or 2."""
    if len(blob) < _ARTIFACT_PREFIX_V1.size:
        raise ArtifactError(
            f"artifact truncated: {len(blob)} bytes, shorter than its {_ARTIFACT_PREFIX.size}-byte prefix"
        )
    magic, version = blob[:4], blob[4]
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"not a pgolf artifact: magic {magic!r}, expected {ARTIFACT_MAGIC!r}")
    if version == 1:  # written before the coder version byte: brotli or lzma over the shuffle
        _, _, compressor, raw_len, crc = _ARTIFACT_PREFIX_V1.unpack_from(blob)
        if compressor not in (COMPRESSORS["brotli"], COMPRESSORS["lzma"]):
            raise ArtifactError(f"artifact names unknown compressor id {compressor} for version 1 (known: 1, 2)")
        return compressor, GENERAL_CODER_VERSION, raw_len, crc, blob[_ARTIFACT_PREFIX_V1.size:]
    if version != ARTIFACT_VERSION:
        raise ArtifactError(
            f"artifact version {version} is not supported (this code reads versions 1 and {ARTIFACT_VERSION})"
        )
    if len(blob) < _ARTIFACT_PREFIX.size:
        raise ArtifactError(
            f"artifact truncated: {len(blob)} bytes, shorter than its {_ARTIFACT_PREFIX.size}-byte prefix"
        )
    _, _, compressor, coder_version, raw_len, crc = _ARTIFACT_PREFIX.unpack_from(blob)
    return compressor, coder_version, raw_len, crc, blob[_ARTIFACT_PREFIX.size:]


def _inflate_bounded(name: str, stream: bytes, limit: int) -> bytes:
    """The output of a brotli / lzma / zstd ``stream``, refused once it passes ``limit`` bytes."""
    pieces = {"brotli": ans.brotli_pieces, "lzma": _lzma_pieces, "zstd": _zstd_pieces}[name](stream)
    out = bytearray()
    try:
        for piece in pieces:
            out += piece
            if len(out) > limit:
                raise ArtifactError(
                    f"artifact's {name} stream inflates beyond the {limit:,} bytes its header declares: refused"
                )
    except (brotli.error, lzma.LZMAError, zstandard.ZstdError, ans.StreamError) as exc:
        raise ArtifactError(f"artifact's {name} stream is corrupt or truncated: {exc}") from None
    if len(out) < limit:
        raise ArtifactError(
            f"artifact's {name} stream is corrupt or truncated: it inflates to {len(out):,} bytes, "
            f"its header declares {limit:,}"
        )
    return bytes(out)


def _lzma_pieces(stream: bytes) -> Iterator[bytes]:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    chunk = stream
    while not decoder.eof:
        if decoder.needs_input and not chunk:
            raise ans.StreamError("it ends before its last block (truncated or corrupt)")
        yield decoder.decompress(chunk, max_length=_PIECE)
        chunk = b""


def _zstd_pieces(stream: bytes) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(stream)
    while piece := reader.read(_PIECE):
        yield piece


def _ans_compress(raw: bytes) -> bytes:
    """pgolf.artifact.ans's stream of a serialized model: its header, then every array under its own model."""
    deserialize(raw)  # the entropy coder reads the layout: refuse anything that is not a valid model
    payload_start, header = _split_header(raw)
    payload = memoryview(raw)[payload_start:]
    specs = _array_specs(header, len(payload))
    end = max((spec.offset + spec.nbytes for spec in specs), default=0)
    if end != len(payload) or ans.rebuild_payload(specs, payload, len(payload)) != payload:
        raise ValueError("the serialized model has bytes between or after its arrays: not pgolf.artifact.codec.serialize output")
    return ans.encode_model(raw[:payload_start], specs, payload)


def _ans_decompress(stream: bytes, raw_len: int) -> bytes:
    try:
        head, body = ans.decode_head(stream)
        if len(head) > raw_len:
            raise ans.StreamError(f"its model header of {len(head):,} bytes exceeds the declared {raw_len:,}")
        payload_start, header = _split_header(head)
        specs = _array_specs(header, raw_len - payload_start)
        end = max((spec.offset + spec.nbytes for spec in specs), default=0)
        if payload_start + end != raw_len:  # serialize ends the payload with its last array
            raise ans.StreamError(f"the header's arrays end at byte {payload_start + end:,}, "
                                      f"the artifact declares {raw_len:,}")
        payload = ans.decode_payload(body, specs, end)
    except (ans.StreamError, ArtifactError) as exc:
        raise ArtifactError(f"artifact's ans stream is corrupt or truncated: {exc}") from None
    return head + payload


def _split_header(raw: bytes) -> tuple[int, dict[str, Any]]:
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


def _array_specs(header: dict[str, Any], payload_len: int) -> list[ans.ArraySpec]:
    """Every array of the payload as the entropy coder sees it, validated against ``payload_len``."""
    specs = []
    for index, entry in enumerate(header["tensors"]):
        try:
            shape = entry["shape"]
            if entry["kind"] == "quantized":
                _check_array(entry["dtype"], shape, entry["offset"], entry["nbytes"], payload_len)
                rows = shape[0] if len(shape) == 2 else 0
                _check_array(entry["scale_dtype"], [rows], entry["scale_offset"], entry["scale_nbytes"], payload_len)
                if entry["dtype"] != "int8" or len(shape) != 2 or entry["bits"] not in range(2, 9):
                    raise ArtifactError(f"codes must be 2-D int8 of 2..8 bits, got {entry['dtype']} {shape}")
                specs.append(ans.ArraySpec("codes", "int8", tuple(shape), entry["offset"], entry["bits"]))
                specs.append(ans.ArraySpec("scale", entry["scale_dtype"], (rows,), entry["scale_offset"], 0))
            else:
                _check_array(entry["dtype"], shape, entry["offset"], entry["nbytes"], payload_len)
                specs.append(ans.ArraySpec("passthrough", entry["dtype"], tuple(shape), entry["offset"], 0))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"header tensor #{index}: bad or missing field {exc}") from None
    return specs


def compressed_tensor_sizes(qm: QuantizedModel, cfg: CompressConfig) -> dict[str, int]:
    """Each tensor's compressed bytes alone, to attribute the artifact's bytes to tensors.

    A tensor's size is that of an artifact holding it alone less that of an artifact
    holding no tensor (the header's share). Each stream starts without the others'
    statistics, so the sizes add up to a little more than the whole artifact.
    """
    return {name: tensors_alone_bytes(qm.model_config, {name: tensor}, cfg) for name, tensor in qm.tensors.items()}


def tensors_alone_bytes(model_config: ModelConfig, tensors: dict[str, QuantizedTensor | Tensor],
                        cfg: CompressConfig) -> int:
    """The compressed bytes of an artifact holding only ``tensors``, less those of one holding none."""
    def artifact_bytes(held: dict[str, QuantizedTensor | Tensor]) -> int:
        return len(compress(serialize(QuantizedModel(model_config, held)), cfg))

    return artifact_bytes(tensors) - artifact_bytes({})


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
