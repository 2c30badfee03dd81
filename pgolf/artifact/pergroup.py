"""Per-group lrzip ("pergroup"): PR #1855's layout of GPTQ's code matrices, coded by the lrzip program.

A serialized model's code matrices are gathered by role into seven groups (:data:`GROUPS`: the
embedding, then the six kinds of block matrix, each group layer by layer). In the "hot" groups
(:data:`SORTED_GROUPS`) the rows of each matrix are first put in a greedy nearest-neighbour chain
by L1 distance (:func:`l1_chain`), and every matrix is written column-major, so that neighbouring
bytes come from similar rows. Each group's bytes are then coded by ``lrzip -z -L 9`` (rzip's
long-range matching, then ZPAQ context mixing; :mod:`pgolf.artifact.lrzip`). Everything
else of the serialized model (its header, the scales, the passthroughs, QuantGate's and LQER's
codes: the *remainder*) and the row permutations (uint16) are left to brotli by
:mod:`pgolf.artifact.compress`, which also holds the container's prefix.

The remainder is the serialized model with the groups' code arrays cut out, so its header still
describes every array: the decoder reads it first and knows from it the exact size of each group
and of the permutations before it runs lrzip. Container (all integers little-endian)::

    b"PGRP" | u32 n (= 9) | n × u32 stream length | the 7 groups' lrzip streams (empty for an empty group),
    the remainder's stream, the permutations' stream (empty when no matrix was sorted)

The groups' raw bytes are the record's (``_serialize_pergroup``) byte for byte; lrzip's output
depends on its version (0.651 on Debian 12).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import brotli
import numpy as np

from pgolf.artifact.compress import SHUFFLE_HEADER_LEN, byte_shuffle, byte_unshuffle, inflate_at_most, inflate_bounded
from pgolf.artifact.format import check_array, deserialize, split_header
from pgolf.artifact.lrzip import lrzip_compress, lrzip_decompress
from pgolf.artifact.tensors import ArtifactError
from pgolf.config import CompressConfig

GROUPS = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
          "mlp.fc.weight", "mlp.proj.weight")
TOP_LEVEL_GROUPS = frozenset({"tok_emb.weight"})  # every other group gathers ``blocks.<i>.<key>``
SORTED_GROUPS = frozenset({"tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight"})
CONTAINER_MAGIC = b"PGRP"
STREAM_COUNT = len(GROUPS) + 2  # the groups, the remainder, the permutations
REMAINDER, PERMUTATIONS = len(GROUPS), len(GROUPS) + 1
MAX_SORTED_ROWS = 1 << 16  # a permutation entry is a uint16
_COUNT = struct.Struct("<I")
BROTLI_WINDOW = 24  # lgwin of the remainder's brotli, as the record's


@dataclass(frozen=True)
class Member:
    """One code matrix of a group: where its int8 codes lie in the serialized model."""

    name: str
    layer: int
    rows: int
    cols: int
    start: int  # byte offset in the serialized model

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class Layout:
    """Which bytes of a serialized model go to which stream, read from its header alone."""

    groups: tuple[tuple[Member, ...], ...]  # per group of GROUPS, in layer order

    def group_bytes(self) -> list[int]:
        return [sum(member.nbytes for member in group) for group in self.groups]

    def permutation_bytes(self) -> int:
        return 2 * sum(member.rows for key, group in zip(GROUPS, self.groups) if key in SORTED_GROUPS
                       for member in group)

    def spans(self) -> list[tuple[int, int]]:
        """The groups' code arrays as (start, end) in the serialized model, ascending."""
        return sorted((m.start, m.start + m.nbytes) for group in self.groups for m in group)


@dataclass(frozen=True)
class Parts:
    """A serialized model taken apart: each group's bytes, the permutations, the remainder."""

    groups: list[bytes]
    permutations: bytes
    remainder: bytes


def group_of(name: str) -> tuple[str, int] | None:
    """(group, layer) of a code matrix's name, or None when it belongs to the remainder."""
    if name in TOP_LEVEL_GROUPS:
        return name, 0
    block, _, rest = name.partition(".")
    layer, _, key = rest.partition(".")
    if block == "blocks" and layer.isdigit() and key in GROUPS and key not in TOP_LEVEL_GROUPS:
        return key, int(layer)
    return None


def model_layout(header: dict[str, Any], payload_start: int, payload_len: int) -> Layout:
    """The groups of a serialized model's (parsed) header, every array checked against ``payload_len``."""
    groups: list[list[Member]] = [[] for _ in GROUPS]
    for index, entry in enumerate(header["tensors"]):
        try:
            found = group_of(entry["name"]) if entry.get("kind") == "quantized" else None
            if found is None:
                continue
            shape = entry["shape"]
            check_array(entry["dtype"], shape, entry["offset"], entry["nbytes"], payload_len)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"header tensor #{index}: bad or missing field {exc}") from None
        if entry["dtype"] != "int8" or len(shape) != 2:
            raise ArtifactError(f"{entry['name']}: codes must be 2-D int8, got {entry['dtype']} {shape}")
        key, layer = found
        groups[GROUPS.index(key)].append(Member(entry["name"], layer, shape[0], shape[1], payload_start + entry["offset"]))
    layout = Layout(tuple(tuple(sorted(group, key=lambda member: member.layer)) for group in groups))
    for (_, end), (start, _) in pairwise(layout.spans()):
        if start < end:
            raise ArtifactError("the header's code arrays overlap (corrupt)")
    for key, group in zip(GROUPS, layout.groups):
        if key in SORTED_GROUPS and any(member.rows > MAX_SORTED_ROWS for member in group):
            raise ArtifactError(f"group {key}: a matrix has more than {MAX_SORTED_ROWS:,} rows, "
                                "which a uint16 row permutation cannot order")
    return layout


def l1_chain(codes: np.ndarray) -> np.ndarray:
    """The record's row order of a code matrix [rows, cols]: row 0 first, then again and again the
    unused row nearest to the last one in L1 distance (ties: the lowest row index); int64 [rows]."""
    rows = codes.shape[0]
    pool = codes.astype(np.int16)  # [rows, cols]: the unused rows, compacted (the last moves into a gap)
    index = np.arange(rows)  # the original row of each pool row
    diff = np.empty_like(pool)
    order = np.empty(rows, dtype=np.int64)
    current = 0
    for step in range(rows):
        order[step] = index[current]
        last = pool[current].copy()
        end = rows - step - 1  # unused rows left
        pool[current], index[current] = pool[end], index[end]
        if end == 0:
            break
        np.subtract(pool[:end], last, out=diff[:end])
        np.abs(diff[:end], out=diff[:end])
        distance = diff[:end].sum(axis=1, dtype=np.int32)  # [end]
        nearest = np.flatnonzero(distance == distance.min())
        current = int(nearest[np.argmin(index[nearest])])
    return order


def split_model(raw: bytes) -> Parts:
    """Each group's bytes (sorted rows, column-major), the permutations, and the rest of ``raw``."""
    payload_start, header = split_header(raw)
    layout = model_layout(header, payload_start, len(raw) - payload_start)
    groups, permutations = [], []
    for key, members in zip(GROUPS, layout.groups):
        blob = []
        for member in members:
            codes = np.frombuffer(raw, np.int8, member.nbytes, member.start).reshape(member.rows, member.cols)
            if key in SORTED_GROUPS:
                order = l1_chain(codes)
                permutations.append(order.astype("<u2").tobytes())
                codes = codes[order]
            blob.append(np.ascontiguousarray(codes.T).tobytes())
        groups.append(b"".join(blob))
    return Parts(groups, b"".join(permutations), _cut(raw, layout.spans()))


def _cut(raw: bytes, spans: list[tuple[int, int]]) -> bytes:
    kept, position = [], 0
    for start, end in spans:
        kept.append(raw[position:start])
        position = end
    return b"".join(kept) + raw[position:]


def remainder_layout(remainder: bytes, raw_len: int) -> Layout:
    """The layout of the serialized model of ``raw_len`` bytes whose remainder is ``remainder``."""
    payload_start, header = split_header(remainder)
    layout = model_layout(header, payload_start, raw_len - payload_start)
    if len(remainder) + sum(layout.group_bytes()) != raw_len:
        raise ArtifactError(f"the remainder's {len(remainder):,} bytes and the groups' {sum(layout.group_bytes()):,} "
                            f"do not make the declared {raw_len:,}")
    return layout


def join_model(remainder: bytes, layout: Layout, groups: list[bytes], permutations: bytes) -> bytes:
    """The serialized model again: :func:`split_model` undone (sizes as ``layout`` says, checked)."""
    if [len(blob) for blob in groups] != layout.group_bytes() or len(permutations) != layout.permutation_bytes():
        raise ArtifactError("a group or the permutations decoded to the wrong length (corrupt)")
    out = bytearray(len(remainder) + sum(layout.group_bytes()))
    order = np.frombuffer(permutations, dtype="<u2")
    used = 0
    for key, members, blob in zip(GROUPS, layout.groups, groups):
        position = 0
        for member in members:
            columns = np.frombuffer(blob, np.int8, member.nbytes, position).reshape(member.cols, member.rows)
            position += member.nbytes
            codes = columns.T  # [rows, cols], rows in stored order
            if key in SORTED_GROUPS:
                perm = order[used:used + member.rows].astype(np.int64)
                used += member.rows
                if not np.array_equal(np.sort(perm), np.arange(member.rows)):
                    raise ArtifactError(f"{member.name}: its stored row order is not a permutation (corrupt)")
                restored = np.empty_like(codes)
                restored[perm] = codes
                codes = restored
            out[member.start:member.start + member.nbytes] = np.ascontiguousarray(codes).tobytes()
    position = 0
    for piece_start, piece_end in _gaps(layout.spans(), len(out)):
        size = piece_end - piece_start
        out[piece_start:piece_end] = remainder[position:position + size]
        position += size
    return bytes(out)


def _gaps(spans: list[tuple[int, int]], total: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of ``0..total`` outside ``spans``."""
    position = 0
    for start, end in spans:
        yield position, start
        position = end
    yield position, total


def pack_streams(streams: list[bytes]) -> bytes:
    """The container of :data:`STREAM_COUNT` streams."""
    lengths = b"".join(_COUNT.pack(len(stream)) for stream in streams)
    return CONTAINER_MAGIC + _COUNT.pack(len(streams)) + lengths + b"".join(streams)


def unpack_streams(blob: bytes) -> list[bytes]:
    """The streams of a container made by :func:`pack_streams`, checked against its length."""
    head = len(CONTAINER_MAGIC) + _COUNT.size
    if len(blob) < head or blob[:4] != CONTAINER_MAGIC:
        raise ArtifactError(f"pergroup stream does not start with {CONTAINER_MAGIC!r} (corrupt or truncated)")
    (count,) = _COUNT.unpack_from(blob, 4)
    if count != STREAM_COUNT:
        raise ArtifactError(f"pergroup container holds {count} streams, expected {STREAM_COUNT}")
    lengths = struct.unpack_from(f"<{count}I", blob, head) if len(blob) >= head + 4 * count else None
    if lengths is None or head + 4 * count + sum(lengths) != len(blob):
        raise ArtifactError("pergroup container's stream lengths do not add up to its size (corrupt or truncated)")
    streams, position = [], head + 4 * count
    for length in lengths:
        streams.append(blob[position:position + length])
        position += length
    return streams


def lrzip_compress_all(groups: list[bytes]) -> list[bytes]:
    """Every group's lrzip stream, the lrzip processes run side by side (the same bytes as one by one)."""
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        return list(pool.map(lrzip_compress, groups))


def lrzip_decompress_all(streams: list[bytes], sizes: list[int]) -> list[bytes]:
    """Every group's bytes, the lrzip processes run side by side (as the record does)."""
    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        return list(pool.map(lrzip_decompress, streams, sizes))


def compress_serialized(raw: bytes, cfg: CompressConfig) -> bytes:
    """The pergroup container of a serialized model: lrzip per group, brotli for the rest."""
    deserialize(raw)  # the groups are read from the layout: refuse anything that is not a valid model
    parts = split_model(raw)
    remainder = brotli.compress(byte_shuffle(parts.remainder, cfg.shuffle_stride), quality=cfg.brotli_quality,
                                lgwin=BROTLI_WINDOW)
    permutations = brotli.compress(parts.permutations, quality=cfg.brotli_quality) if parts.permutations else b""
    return pack_streams(lrzip_compress_all(parts.groups) + [remainder, permutations])


def decompress_serialized(stream: bytes, raw_len: int) -> bytes:
    """The serialized model in a pergroup container; every size is known before it is decoded."""
    streams = unpack_streams(stream)
    remainder = byte_unshuffle(inflate_at_most("brotli", streams[REMAINDER], raw_len + SHUFFLE_HEADER_LEN))
    layout = remainder_layout(remainder, raw_len)
    permutation_bytes = layout.permutation_bytes()
    encoded = streams[PERMUTATIONS]
    if not permutation_bytes and encoded:
        raise ArtifactError("artifact's pergroup stream holds permutations its model has no use for (corrupt)")
    permutations = inflate_bounded("brotli", encoded, permutation_bytes) if permutation_bytes else b""
    groups = lrzip_decompress_all(streams[:REMAINDER], layout.group_bytes())
    return join_model(remainder, layout, groups, permutations)
