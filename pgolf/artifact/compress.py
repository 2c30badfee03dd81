"""The compressed artifact ("PGAZ"): a serialized model coded by brotli, lzma, zstd, ``ans`` or ``pergroup``.

:func:`compress` byte-shuffles a serialized model (docs/DESIGN.md §6) and codes it with
brotli, lzma or zstd, or codes the model's arrays under explicit probability models
(``ans``, :mod:`pgolf.artifact.ans`), or codes its code matrices group by group with the
lrzip program and the rest with brotli (``pergroup``, :mod:`pgolf.artifact.pergroup`), inside
a small container that names the coder and its version, so :func:`decompress` needs no
parameters. Decompression stops once the output passes the declared raw length. Each coder's
own container code lives in its module, imported in the coder's branch only, so an exported
script ships the coder it uses and no other (:mod:`pgolf.submit.bundle`).

Compressed artifact ("PGAZ", version 2)::

    b"PGAZ" | u8 version | u8 compressor | u8 coder version | u64 raw_len | u32 crc32(raw) | stream

with compressor 1 brotli, 2 lzma, 3 zstd (coder version 1: ``stream`` is the library's
stream of the shuffle ``b"BSHF" | u8 stride | shuffled bytes``, the reference's shuffle
header, written for stride 1 as well so that a stream always says how to undo it) or 4
ans (``stream`` as :mod:`pgolf.artifact.ans` describes, coder version
:data:`pgolf.artifact.ans.CODER_VERSION`) or 5 pergroup (coder version 1: the container of
:mod:`pgolf.artifact.pergroup`, its remainder stream brotli of the remainder's shuffle, its
permutations stream brotli of the uint16 permutations). Version 1, written before the coder version byte,
is ``b"PGAZ" | u8 1 | u8 compressor (1 or 2) | u64 raw_len | u32 crc32 | stream`` and
still loads.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterator

import brotli
import numpy as np
import zstandard
from torch import Tensor

from pgolf.artifact.format import serialize
from pgolf.artifact.tensors import ArtifactError, CodedTensor, QuantizedModel
from pgolf.config import CompressConfig, ModelConfig

ARTIFACT_MAGIC = b"PGAZ"


ARTIFACT_VERSION = 2


SHUFFLE_MAGIC = b"BSHF"


COMPRESSORS = {"brotli": 1, "lzma": 2, "zstd": 3, "ans": 4, "pergroup": 5}


GENERAL_CODER_VERSION = 1  # the coder version of brotli / lzma / zstd: the library's stream of the shuffle


PERGROUP_CODER_VERSION = 1


_ARTIFACT_PREFIX = struct.Struct("<4sBBBQI")  # magic, version, compressor, coder version, raw_len, crc32


_ARTIFACT_PREFIX_V1 = struct.Struct("<4sBBQI")  # version 1: magic, version, compressor, raw_len, crc32


SHUFFLE_HEADER_LEN = 5  # b"BSHF" + stride


_PIECE = 1 << 20  # bytes per step of bounded decompression


# What an artifact's bytes may declare: at most MAX_EXPANSION raw bytes per artifact byte, plus
# EXPANSION_FLOOR. Checked before anything is allocated or decoded; compress refuses to write more.
# An entropy coder can code a constant run in no bytes at all (a one-symbol table, or ANS's empty
# state), so what a stream can hold cannot be read off its length: this is the bound, far above
# any model (a real artifact expands about 2.5 times; ans codes an all-zero matrix in a few bytes,
# which the floor covers up to 16 MiB).
MAX_EXPANSION = 256
EXPANSION_FLOOR = 1 << 24


def check_declared_size(raw_len: int, artifact_len: int) -> None:
    """Refuse a raw length beyond what an artifact of ``artifact_len`` bytes may hold (before any allocation)."""
    most = MAX_EXPANSION * artifact_len + EXPANSION_FLOOR
    if raw_len > most:
        raise ArtifactError(
            f"artifact of {artifact_len:,} bytes declares {raw_len:,} raw bytes, more than such an artifact may "
            f"hold ({MAX_EXPANSION} per byte + {EXPANSION_FLOOR:,}): corrupt or crafted, refused before decoding"
        )


class StreamError(ValueError):
    """A coder's stream that does not decode to what it declares (truncated, corrupt or too long)."""


def brotli_pieces(stream: bytes, piece: int = _PIECE) -> Iterator[bytes]:
    """The output of a brotli ``stream`` in pieces of about ``piece`` bytes (bounded memory).

    The decoder may keep input and output for later calls, so it is drained with empty
    input; a call that yields nothing with nothing left to give means the stream ended early.
    """
    decoder = brotli.Decompressor()
    position = 0
    while not decoder.is_finished():
        chunk = b""
        if decoder.can_accept_more_data() and position < len(stream):
            chunk, position = stream[position:position + piece], position + piece
        output = decoder.process(chunk, output_buffer_limit=piece)
        if not output and not chunk and not decoder.is_finished():
            raise StreamError("it ends before its last block (truncated or corrupt)")
        yield output
    if position < len(stream):
        raise StreamError(f"{len(stream) - position:,} bytes after its end (corrupt)")


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
    coder_version = coder_version_of(cfg.compressor)
    if cfg.compressor == "ans":  # each coder imported in its branch: an exported script ships only its own
        from pgolf.artifact import ans

        stream = ans.compress_serialized(raw)
    elif cfg.compressor == "pergroup":
        from pgolf.artifact import pergroup

        stream = pergroup.compress_serialized(raw, cfg)
    else:
        stream = _general_compress(byte_shuffle(raw, cfg.shuffle_stride), cfg)
    prefix = _ARTIFACT_PREFIX.pack(
        ARTIFACT_MAGIC, ARTIFACT_VERSION, COMPRESSORS[cfg.compressor], coder_version, len(raw), zlib.crc32(raw)
    )
    try:
        check_declared_size(len(raw), len(prefix) + len(stream))
    except ArtifactError as exc:  # never write what decompress would refuse
        raise ValueError(f"compress.compressor {cfg.compressor}: {exc}") from None
    return prefix + stream


def coder_version_of(compressor: str) -> int:
    """The coder version this code writes and reads for ``compressor``."""
    if compressor == "ans":
        from pgolf.artifact import ans  # here, not above: an exported script ships the coder only when it uses it

        return ans.CODER_VERSION
    return PERGROUP_CODER_VERSION if compressor == "pergroup" else GENERAL_CODER_VERSION


def _general_compress(shuffled: bytes, cfg: CompressConfig) -> bytes:
    if cfg.compressor == "brotli":
        return brotli.compress(shuffled, quality=cfg.brotli_quality)
    if cfg.compressor == "lzma":
        return lzma.compress(shuffled, preset=cfg.lzma_preset)
    return zstandard.ZstdCompressor(level=cfg.zstd_level).compress(shuffled)


def decompress(blob: bytes) -> bytes:
    """The raw bytes inside an artifact made by :func:`compress`, checked against its length and CRC.

    The declared raw length is first held to what an artifact of this length may hold
    (:func:`check_declared_size`), and decoding stops as soon as the output would pass it, so a
    small artifact cannot make the reader allocate more than a bounded multiple of its bytes.
    """
    compressor, coder_version, raw_len, crc, stream = _read_prefix(blob)
    check_declared_size(raw_len, len(blob))
    names = {code: name for name, code in COMPRESSORS.items()}
    if compressor not in names:
        raise ArtifactError(f"artifact names unknown compressor id {compressor} (known: {names})")
    name = names[compressor]
    expected_version = coder_version_of(name)
    if coder_version != expected_version:
        raise ArtifactError(
            f"artifact's {name} coder version {coder_version} is not supported (this code reads {expected_version})"
        )
    if name == "ans":
        from pgolf.artifact import ans

        raw = ans.decompress_serialized(stream, raw_len)
    elif name == "pergroup":
        from pgolf.artifact import pergroup

        raw = pergroup.decompress_serialized(stream, raw_len)
    else:
        raw = byte_unshuffle(inflate_bounded(name, stream, raw_len + SHUFFLE_HEADER_LEN))
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


def inflate_bounded(name: str, stream: bytes, limit: int) -> bytes:
    """The output of a brotli / lzma / zstd ``stream``, exactly ``limit`` bytes or refused."""
    out = inflate_at_most(name, stream, limit)
    if len(out) < limit:
        raise ArtifactError(
            f"artifact's {name} stream is corrupt or truncated: it inflates to {len(out):,} bytes, "
            f"its header declares {limit:,}"
        )
    return out


def inflate_at_most(name: str, stream: bytes, limit: int) -> bytes:
    """The output of a brotli / lzma / zstd ``stream``, refused once it passes ``limit`` bytes."""
    pieces = {"brotli": brotli_pieces, "lzma": _lzma_pieces, "zstd": _zstd_pieces}[name](stream)
    out = bytearray()
    try:
        for piece in pieces:
            out += piece
            if len(out) > limit:
                raise ArtifactError(
                    f"artifact's {name} stream inflates beyond the {limit:,} bytes its header declares: refused"
                )
    except (brotli.error, lzma.LZMAError, zstandard.ZstdError, StreamError) as exc:
        raise ArtifactError(f"artifact's {name} stream is corrupt or truncated: {exc}") from None
    return bytes(out)


def _lzma_pieces(stream: bytes) -> Iterator[bytes]:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    chunk = stream
    while not decoder.eof:
        if decoder.needs_input and not chunk:
            raise StreamError("it ends before its last block (truncated or corrupt)")
        yield decoder.decompress(chunk, max_length=_PIECE)
        chunk = b""


def _zstd_pieces(stream: bytes) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(stream)
    while piece := reader.read(_PIECE):
        yield piece


def compressed_tensor_sizes(qm: QuantizedModel, cfg: CompressConfig) -> dict[str, int]:
    """Each tensor's compressed bytes alone, to attribute the artifact's bytes to tensors.

    A tensor's size is that of an artifact holding it alone less that of an artifact
    holding no tensor (the header's share). Each stream starts without the others'
    statistics, so the sizes add up to a little more than the whole artifact.
    """
    return {name: tensors_alone_bytes(qm.model_config, {name: tensor}, cfg) for name, tensor in qm.tensors.items()}


def tensors_alone_bytes(model_config: ModelConfig, tensors: dict[str, CodedTensor | Tensor],
                        cfg: CompressConfig) -> int:
    """The compressed bytes of an artifact holding only ``tensors``, less those of one holding none."""
    def artifact_bytes(held: dict[str, CodedTensor | Tensor]) -> int:
        return len(compress(serialize(QuantizedModel(model_config, held)), cfg))

    return artifact_bytes(tensors) - artifact_bytes({})




