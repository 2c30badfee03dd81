"""The ``ans`` coder: a serialized model's arrays entropy-coded under explicit probability models.

A general coder (brotli, lzma, zstd) searches for repeated strings; quantized weights are
better described by what they are. SDClip's integer codes are a bell around a centre
whose width differs from one input channel (column) to the next, and in an embedding the
rows of tokens seen rarely or never drift together, so they nearly repeat one another.
Per code matrix this coder therefore (1) codes each row that nearly repeats an earlier
row as its difference from that row (modulo the code range), under tables by the
residual's RMS class; (2) codes the other rows column class by column class, a column's
class being its code RMS on a log scale (0, 1, 2, 3, 4, 6 or 8 classes per octave, whichever
costs least with the side information), optionally relative to each column's median
code; every class has its own histogram, and all symbols go through one ANS coder
(``constriction``). The fp16 scales are coded under a discrete Gaussian fitted per
tensor, the passthrough tensors byte lane by byte lane under their own histograms; each
part falls back to brotli or raw where that is smaller.
The decoder ships with the artifact (this file counts as code bytes).

Stream (version :data:`CODER_VERSION`), all integers little-endian::

    section(model header) | section(codes) | section(scales) | section(fp16 passthrough) | section(fp32 passthrough)
    section := u8 method | u32 body_len | body

Methods: 0 raw bytes; 1 brotli-11 of the bytes grouped by byte lane (all first bytes of
the items, then all second bytes, ...); 2 ``lanes``: per byte lane a histogram table,
then one ANS stream of all lanes; 4 ``bell`` (fp16 sections): per array ``u16 lo | u16
hi | u16 centre | u32 width``, its 16-bit patterns under the discrete Gaussian
``2^(-(v - centre)^2 / width)`` on ``lo..hi``, then one ANS stream; 3 ``columns``, the
codes section::

    (u8 column classes per octave, u8 centred, u32 predicted rows) × matrices
    | bytes(column classes, u8 per column of matrices with classes)
    | bytes(column centres, i8 per column of centred matrices)
    | bytes(predicted rows: i32 pairs (row, row - reference row), rows ascending)
    | bytes(residual classes, u8 per predicted row)
    | u32 size | bytes(tables: per matrix, one per column class, then one per residual class)
    | ANS words (u32): per matrix, the roots' symbols column class by column class (each
      class's columns in order, each column top to bottom), then the predicted rows by
      generation (a row after its reference), residual class and row

where ``bytes(...)`` is a section coded by methods 0-2. A float section concatenates its
arrays in header order. A histogram table is ``u8 lo | u8 hi | (hi - lo + 1) × u8 v``
for the symbols ``lo..hi``, each with probability ∝ ``2^(-v/16)`` (``v`` 255: never
occurs), so a model costs one byte per symbol used. The weights ``2^(52 - v/16)`` are
exact integer roots and every encoder decision is transmitted, so decoding rebuilds
exactly the encoder's models on every machine, and the same model gives the same bytes.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Any

import brotli
import constriction
import numpy as np

from pgolf.artifact.compress import StreamError, brotli_pieces
from pgolf.artifact.format import check_array, deserialize, scale_length, split_header
from pgolf.artifact.tensors import ArtifactError

CODER_VERSION = 1
RAW, BROTLI, LANES, COLUMNS, BELL = 0, 1, 2, 3, 4
BELL_MAX_SPAN = 1 << 14  # widest range of 16-bit values one bell covers
LOG_STEPS = 16  # table resolution: steps per octave of probability (error under 2.2 %)
ABSENT = 255  # table value of a symbol that never occurs
BROTLI_QUALITY = 11
DECODE_PIECE = 1 << 20  # symbols decoded per call into a block: bounds the int32 buffer (4 MiB)
_SECTION = struct.Struct("<BI")  # method, body length
_FLOAT_SECTIONS = (("scale", "float16"), ("passthrough", "float16"), ("passthrough", "float32"))
_ITEMSIZE = {"int8": 1, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ArraySpec:
    """One array of a serialized model's payload, as its header describes it."""

    role: str  # "codes" | "scale" | "passthrough"
    dtype: str  # int8 | float16 | float32
    shape: tuple[int, ...]
    offset: int  # in the payload
    bits: int  # codes: 2..8; others 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


# ------------------------------------------------------------------------ whole model


def compress_serialized(raw: bytes) -> bytes:
    """The stream of a serialized model (``pgolf.artifact.format``): its header, then each array by its own model."""
    deserialize(raw)  # the entropy coder reads the layout: refuse anything that is not a valid model
    payload_start, header = split_header(raw)
    payload = memoryview(raw)[payload_start:]
    specs = array_specs(header, len(payload))
    end = max((spec.offset + spec.nbytes for spec in specs), default=0)
    if end != len(payload) or rebuild_payload(specs, payload, len(payload)) != payload:
        raise ValueError("the serialized model has bytes between or after its arrays: "
                         "not pgolf.artifact.format.serialize output")
    return encode_model(raw[:payload_start], specs, payload)


def decompress_serialized(stream: bytes, raw_len: int) -> bytes:
    """The serialized model of ``raw_len`` bytes a stream of :func:`compress_serialized` holds."""
    try:
        head, body = decode_head(stream)
        if len(head) > raw_len:
            raise StreamError(f"its model header of {len(head):,} bytes exceeds the declared {raw_len:,}")
        payload_start, header = split_header(head)
        specs = array_specs(header, raw_len - payload_start)
        end = max((spec.offset + spec.nbytes for spec in specs), default=0)
        if payload_start + end != raw_len:  # serialize ends the payload with its last array
            raise StreamError(f"the header's arrays end at byte {payload_start + end:,}, "
                                      f"the artifact declares {raw_len:,}")
        payload = decode_payload(body, specs, end)
    except (StreamError, ArtifactError) as exc:
        raise ArtifactError(f"artifact's ans stream is corrupt or truncated: {exc}") from None
    return head + payload


def array_specs(header: dict[str, Any], payload_len: int) -> list[ArraySpec]:
    """Every array of the payload as the entropy coder sees it, validated against ``payload_len``."""
    specs = []
    for index, entry in enumerate(header["tensors"]):
        try:
            shape = entry["shape"]
            if entry["kind"] in ("quantized", "grouped"):
                check_array(entry["dtype"], shape, entry["offset"], entry["nbytes"], payload_len)
                scales = scale_length(entry)
                check_array(entry["scale_dtype"], [scales], entry["scale_offset"], entry["scale_nbytes"], payload_len)
                # ans codes the symmetric range of its bits; b-bit two's-complement codes lie in that of b + 1
                bits = entry["bits"] + (entry["kind"] == "grouped")
                if entry["dtype"] != "int8" or len(shape) != 2 or bits not in range(2, 9):
                    raise ArtifactError(f"codes must be 2-D int8 of 2..8 bits, got {entry['dtype']} {shape}")
                specs.append(ArraySpec("codes", "int8", tuple(shape), entry["offset"], bits))
                specs.append(ArraySpec("scale", entry["scale_dtype"], (scales,), entry["scale_offset"], 0))
            else:
                check_array(entry["dtype"], shape, entry["offset"], entry["nbytes"], payload_len)
                specs.append(ArraySpec("passthrough", entry["dtype"], tuple(shape), entry["offset"], 0))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"header tensor #{index}: bad or missing field {exc}") from None
    return specs


def encode_model(head: bytes, specs: list[ArraySpec], payload: memoryview) -> bytes:
    """The stream of a model: its header bytes, then its arrays (read from ``payload``) by section."""
    parts = [_encode_bytes(head, 1)]
    codes = [spec for spec in specs if spec.role == "codes"]
    parts.append(_section(COLUMNS, _encode_codes([_codes_of(spec, payload) for spec in codes], codes)))
    for role, dtype in _FLOAT_SECTIONS:
        chosen = [spec for spec in specs if (spec.role, spec.dtype) == (role, dtype)]
        data = b"".join(payload[spec.offset:spec.offset + spec.nbytes] for spec in chosen)
        parts.append(_encode_bytes(data, _ITEMSIZE[dtype], [math.prod(spec.shape) for spec in chosen]))
    return b"".join(parts)


def decode_head(stream: bytes) -> tuple[bytes, memoryview]:
    """The model header bytes at the start of ``stream``, and the rest of the stream."""
    reader = _Reader(memoryview(stream))
    method, body = reader.section("model header")
    return _decode_bytes(method, body, None, 1, "model header"), reader.rest()


def decode_payload(body: memoryview, specs: list[ArraySpec], payload_len: int) -> bytes:
    """The payload of ``payload_len`` bytes with every array of ``specs`` in place."""
    reader = _Reader(body)
    payload = bytearray(payload_len)  # bounded by the declared raw length, checked by the caller
    codes = [spec for spec in specs if spec.role == "codes"]
    method, section = reader.section("codes")
    if method != COLUMNS:
        raise StreamError(f"codes section has method {method}, expected {COLUMNS} (columns)")
    _decode_codes(section, codes, payload)
    for role, dtype in _FLOAT_SECTIONS:
        chosen = [spec for spec in specs if (spec.role, spec.dtype) == (role, dtype)]
        name = f"{role} {dtype}"
        method, section = reader.section(name)
        counts = [math.prod(spec.shape) for spec in chosen]
        data = _decode_bytes(method, section, sum(spec.nbytes for spec in chosen), _ITEMSIZE[dtype], name, counts)
        start = 0
        for spec in chosen:
            payload[spec.offset:spec.offset + spec.nbytes] = data[start:start + spec.nbytes]
            start += spec.nbytes
    if reader.remaining():
        raise StreamError(f"{reader.remaining():,} bytes after the last section")
    return bytes(payload)


def rebuild_payload(specs: list[ArraySpec], payload: memoryview, payload_len: int) -> bytes:
    """The payload as :func:`decode_payload` rebuilds it: the arrays in place, zeros between them."""
    rebuilt = bytearray(payload_len)
    for spec in specs:
        rebuilt[spec.offset:spec.offset + spec.nbytes] = payload[spec.offset:spec.offset + spec.nbytes]
    return bytes(rebuilt)


def _codes_of(spec: ArraySpec, payload: memoryview) -> np.ndarray:
    count = math.prod(spec.shape)
    return np.frombuffer(payload, dtype=np.int8, count=count, offset=spec.offset).reshape(spec.shape)


def _section(method: int, body: bytes) -> bytes:
    return _SECTION.pack(method, len(body)) + body


class _Reader:
    """Sections read one after another from a stream, each checked against what is left."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.position = data, 0

    def take(self, size: int, what: str) -> memoryview:
        if size > self.remaining():
            raise StreamError(f"{what}: needs {size:,} bytes, {self.remaining():,} left (truncated?)")
        chunk = self.data[self.position:self.position + size]
        self.position += size
        return chunk

    def section(self, what: str) -> tuple[int, memoryview]:
        method, size = _SECTION.unpack(self.take(_SECTION.size, f"{what} section header"))
        return method, self.take(size, f"{what} section")

    def remaining(self) -> int:
        return len(self.data) - self.position

    def rest(self) -> memoryview:
        return self.data[self.position:]


# ------------------------------------------------------------------- byte sections


def _encode_bytes(data: bytes, itemsize: int, counts: list[int] | None = None) -> bytes:
    """The smallest of raw, brotli-by-lane, histogram-by-lane and (16-bit arrays of ``counts`` items
    each) bell-per-array codings of ``data``."""
    candidates = [(RAW, bytes(data))]
    if data:
        lanes = _split_lanes(data, itemsize)
        candidates.append((BROTLI, brotli.compress(b"".join(lane.tobytes() for lane in lanes), quality=BROTLI_QUALITY)))
        candidates.append((LANES, _encode_lanes(lanes)))
        values = np.frombuffer(data, dtype="<u2") if itemsize == 2 else None
        if counts is not None and values is not None and _bell_spans_fit(values, counts):
            candidates.append((BELL, _encode_bells(values, counts)))
    method, body = min(candidates, key=lambda candidate: len(candidate[1]))
    return _section(method, body)


def _decode_bytes(
    method: int, body: memoryview, size: int | None, itemsize: int, what: str, counts: list[int] | None = None
) -> bytes:
    """Undo :func:`_encode_bytes`; ``size`` (when known) is the length the header declares."""
    if method == RAW:
        data = bytes(body)
    elif method == BROTLI:
        data = _join_lanes(_unbrotli(body, size, what), itemsize)
    elif method == LANES:
        if size is None:
            raise StreamError(f"{what}: method lanes needs a declared size")
        data = _decode_lanes(body, size, itemsize, what)
    elif method == BELL and counts is not None and itemsize == 2:
        data = _decode_bells(body, counts, what)
    else:
        raise StreamError(f"{what}: unknown method {method} here (known: raw 0, brotli 1, lanes 2, bell 4 for fp16)")
    if size is not None and len(data) != size:
        raise StreamError(f"{what}: decodes to {len(data):,} bytes, the header declares {size:,}")
    return data


def _unbrotli(body: memoryview, size: int | None, what: str) -> bytes:
    limit = size if size is not None else len(body) * 64 + (1 << 20)  # a header never inflates more
    data = bytearray()
    try:
        for piece in brotli_pieces(bytes(body)):
            data += piece
            if len(data) > limit:
                raise StreamError(f"{what}: brotli body inflates beyond its declared {limit:,} bytes")
    except brotli.error as exc:
        raise StreamError(f"{what}: brotli body is corrupt: {exc}") from None
    return bytes(data)


def _split_lanes(data: bytes, itemsize: int) -> list[np.ndarray]:
    items = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)  # [n, itemsize]
    return [np.ascontiguousarray(items[:, lane]) for lane in range(itemsize)]


def _join_lanes(data: bytes, itemsize: int) -> bytes:
    if len(data) % itemsize:
        raise StreamError(f"{len(data):,} bytes do not split into {itemsize}-byte items")
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def _encode_lanes(lanes: list[np.ndarray]) -> bytes:
    tables = [_table(np.bincount(lane, minlength=256)) for lane in lanes]
    coder = constriction.stream.stack.AnsCoder()
    for lane, table in zip(reversed(lanes), reversed(tables)):
        table.encode(coder, lane.astype(np.int32) - table.lo)
    return b"".join(table.to_bytes() for table in tables) + _words(coder)


def _decode_lanes(body: memoryview, size: int, itemsize: int, what: str) -> bytes:
    if size % itemsize:
        raise StreamError(f"{what}: {size:,} bytes do not split into {itemsize}-byte items")
    reader = _Reader(body)
    tables = [_Table.read(reader, what) for _ in range(itemsize)]
    coder = _ans_decoder(reader.rest(), what)
    count = size // itemsize
    lanes = [(table.decode(coder, count) + table.lo).astype(np.uint8) for table in tables]
    _check_consumed(coder, what)
    return np.stack(lanes, axis=1).tobytes()  # [count, itemsize]


_BELL = struct.Struct("<HHHI")  # lo, hi, centre, width: weight of v is 2^(-(v - centre)^2 / width)


def _bell_spans_fit(values: np.ndarray, counts: list[int]) -> bool:
    ends = np.cumsum(counts)
    return all(int(chunk.max()) - int(chunk.min()) < BELL_MAX_SPAN
               for chunk in np.split(values, ends[:-1]) if len(chunk))


def _encode_bells(values: np.ndarray, counts: list[int]) -> bytes:
    """Each array's 16-bit values (fp16 bit patterns: monotone in the value for one sign) under a
    discrete Gaussian over its range: ``_BELL`` per array, then one ANS stream."""
    chunks = [chunk for chunk in np.split(values.astype(np.int64), np.cumsum(counts)[:-1]) if len(chunk)]
    bells = [_fit_bell(chunk) for chunk in chunks]
    coder = constriction.stream.stack.AnsCoder()
    for chunk, bell in zip(reversed(chunks), reversed(bells)):
        _bell_table(*bell).encode(coder, (chunk - bell[0]).astype(np.int32))
    return b"".join(_BELL.pack(*bell) for bell in bells) + _words(coder)


def _fit_bell(chunk: np.ndarray) -> tuple[int, int, int, int]:
    """The cheapest of a few bells around the mean: widths from 1/2 to 2 times ``2σ² ln 2``."""
    lo, hi = int(chunk.min()), int(chunk.max())
    centre = int(np.rint(np.mean(chunk)))
    counts = np.bincount(chunk - lo)
    fitted = 2 * math.log(2) * float(np.mean(np.square(chunk - centre)))
    candidates = [(lo, hi, centre, max(1, round(fitted * 2 ** (k / 4)))) for k in range(-4, 5)]
    return min(candidates, key=lambda bell: _coded_bits(counts, _bell_table(0, hi - lo, centre - lo, bell[3])))


def _decode_bells(body: memoryview, counts: list[int], what: str) -> bytes:
    reader = _Reader(body)
    present = [count for count in counts if count]
    bells = [_BELL.unpack(reader.take(_BELL.size, f"{what} bell")) for _ in present]
    if any(hi < lo or hi - lo >= BELL_MAX_SPAN or width == 0 for lo, hi, _, width in bells):
        raise StreamError(f"{what}: a bell with an empty or too wide range (corrupt)")
    coder = _ans_decoder(reader.rest(), what)
    chunks = [(_bell_table(*bell).decode(coder, count) + bell[0]).astype("<u2") for bell, count in zip(bells, present)]
    _check_consumed(coder, what)
    return b"".join(chunk.tobytes() for chunk in chunks)


def _bell_table(lo: int, hi: int, centre: int, width: int) -> _Table:
    """The table of a discrete Gaussian on ``lo..hi`` in :data:`LOG_STEPS` steps (integer arithmetic)."""
    offsets = np.arange(lo, hi + 1, dtype=np.int64) - centre
    return _Table(lo, np.minimum(LOG_STEPS * offsets * offsets // width, ABSENT - 1).astype(np.uint8))


# ---------------------------------------------------------------- histogram tables


@dataclass(frozen=True)
class _Table:
    """A histogram over symbols ``lo..hi`` at :data:`LOG_STEPS` steps per octave."""

    lo: int
    values: np.ndarray  # uint8 [hi - lo + 1]: -log2(p / p_max) · LOG_STEPS, ABSENT for never

    def encode(self, coder: constriction.stream.stack.AnsCoder, symbols: np.ndarray) -> None:
        """Push ``symbols`` (int32, already shifted by ``lo``) so that :meth:`decode` pops them in order."""
        if len(self.values) > 1:  # a one-symbol table needs no bits (and constriction no model)
            coder.encode_reverse(symbols, self._model())

    def decode(self, coder: constriction.stream.stack.AnsCoder, count: int) -> np.ndarray:
        """``count`` symbols (int32, relative to ``lo``)."""
        if len(self.values) == 1:
            return np.zeros(count, dtype=np.int32)
        return coder.decode(self._model(), count)

    def decode_into(self, coder: constriction.stream.stack.AnsCoder, out: np.ndarray, shift: int) -> None:
        """Decode ``len(out)`` symbols into ``out`` (int8) as ``symbol + shift``, a piece at a time, so that
        a block of any size needs an int32 buffer of at most :data:`DECODE_PIECE` symbols."""
        for start in range(0, len(out), DECODE_PIECE):
            piece = out[start:start + DECODE_PIECE]
            np.add(self.decode(coder, len(piece)), shift, out=piece, casting="unsafe")

    def probabilities(self) -> np.ndarray:
        """float64 [hi - lo + 1], not normalized: ``2^(-v/16)`` (as :func:`_step_weights`), 0 where absent."""
        return _step_weights()[self.values]

    def _model(self) -> constriction.stream.model.Categorical:
        return constriction.stream.model.Categorical(self.probabilities(), perfect=False)

    def to_bytes(self) -> bytes:
        return bytes([self.lo, self.lo + len(self.values) - 1]) + self.values.tobytes()

    @staticmethod
    def read(reader: _Reader, what: str) -> _Table:
        lo, hi = reader.take(2, f"{what} table")
        if hi < lo:
            raise StreamError(f"{what}: table range {lo}..{hi} is empty")
        values = np.frombuffer(reader.take(hi - lo + 1, f"{what} table"), dtype=np.uint8)
        if np.all(values == ABSENT):
            raise StreamError(f"{what}: table gives every symbol probability 0")
        return _Table(lo, values.copy())


def _table(counts: np.ndarray) -> _Table:
    """The table of ``counts`` (symbols 0..len-1; at least one non-zero count)."""
    used = np.flatnonzero(counts)
    lo, hi = int(used[0]), int(used[-1])
    window = counts[lo:hi + 1].astype(np.float64)
    # v = round(-16 log2(count / max)) by comparison with the step boundaries 2^(-(v + 1/2) / 16)
    below = len(_step_boundaries()) - np.searchsorted(_step_boundaries()[::-1], window / window.max(), side="right")
    values = np.where(window > 0, np.minimum(below, ABSENT - 1), ABSENT).astype(np.uint8)
    return _Table(lo, values)


@functools.cache
def _step_weights() -> np.ndarray:
    """float64 [256]: ``2^(52 - v/16)`` rounded down, exactly, by integer roots (0 for :data:`ABSENT`).

    Integer arithmetic makes the model's probabilities the same bits on every machine, so
    any decoder rebuilds exactly the encoder's model.
    """
    weights = [_root(2 ** (52 * LOG_STEPS - v), LOG_STEPS) for v in range(ABSENT)]
    return np.array(weights + [0], dtype=np.float64)


@functools.cache
def _step_boundaries() -> np.ndarray:
    """float64 [255], descending: ``2^(-(v + 1/2) / 16)`` to 52 bits, exactly, for v = 0..254."""
    return np.array([_root(2 ** (52 * 2 * LOG_STEPS - 2 * v - 1), 2 * LOG_STEPS) / 2**52 for v in range(ABSENT)])


def _root(value: int, degree: int) -> int:
    """``floor(value^(1/degree))`` for a power-of-two ``degree``: nested integer square roots are exact."""
    while degree > 1:
        value, degree = math.isqrt(value), degree // 2
    return value


def _words(coder: constriction.stream.stack.AnsCoder) -> bytes:
    return coder.get_compressed().astype("<u4").tobytes()


def _ans_decoder(data: memoryview, what: str) -> constriction.stream.stack.AnsCoder:
    if len(data) % 4:
        raise StreamError(f"{what}: ANS stream of {len(data):,} bytes is not whole 32-bit words (truncated?)")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if len(words) and words[-1] == 0:
        raise StreamError(f"{what}: ANS stream ends in a zero word (corrupt)")
    return constriction.stream.stack.AnsCoder(words)


def _check_consumed(coder: constriction.stream.stack.AnsCoder, what: str) -> None:
    if not coder.is_empty():
        raise StreamError(f"{what}: ANS stream has data left after its last symbol (corrupt)")


# ------------------------------------------------------------------------ code matrices

LEVEL_CHOICES = (0, 1, 2, 3, 4, 6, 8)  # column levels per octave of code RMS the encoder tries (0: one class)
MAX_LEVELS_PER_OCTAVE = 32
ROW_LEVELS_PER_OCTAVE = 2  # classes of predicted rows, by the RMS of their residual
NEIGHBOURS = 16  # candidates per row on each side, in each of two sort orders, for a reference row
REFERENCE_GAIN = 2  # a row takes a reference when its residual has under 1/2 of its own mean square
_NEAREST_CHUNK = 1024  # rows per block of the all-pairs search among near-repeats
_TABLES_SIZE = struct.Struct("<I")
MAX_TABLES_BYTES = 1 << 24  # far above any real model's tables: bounds what a corrupt size can allocate
_TENSOR_HEADER = struct.Struct("<BBI")  # column levels per octave, column centres sent (0/1), predicted rows


@dataclass(frozen=True)
class _Plan:
    """How one code matrix is coded.

    Rows that nearly repeat an earlier row (the embedding rows of tokens seen rarely or
    never drift together) are *predicted*: coded as their difference from that reference
    row, modulo the code range, under tables by the residual's RMS class. The other rows
    (the roots) are coded column class by column class.
    """

    per_octave: int  # 0: the roots' columns are one class
    centres: np.ndarray | None  # int8 [cols]: each column's median code among the roots, coded relative to it
    classes: np.ndarray  # uint8 [cols]: each column's class among the roots (dense: 0..n-1)
    tables: list[_Table]  # one per column class
    predicted: np.ndarray  # int32 [n]: predicted rows, ascending
    references: np.ndarray  # int32 [n]: the earlier row each one repeats
    row_classes: np.ndarray  # uint8 [n]: each predicted row's residual class (dense)
    row_tables: list[_Table]  # one per residual class


def _encode_codes(arrays: list[np.ndarray], specs: list[ArraySpec]) -> bytes:
    """The codes section of every matrix (layout in the module docstring)."""
    plans = [_plan(codes, spec.bits) for codes, spec in zip(arrays, specs)]
    coder = constriction.stream.stack.AnsCoder()
    for codes, spec, plan in zip(reversed(arrays), reversed(specs), reversed(plans)):
        for block, table in reversed(_blocks(codes, spec.bits, plan)):
            table.encode(coder, block - table.lo)
    headers = b"".join(
        _TENSOR_HEADER.pack(plan.per_octave, plan.centres is not None, len(plan.predicted)) for plan in plans
    )
    classes = b"".join(plan.classes.tobytes() for plan in plans if plan.per_octave)
    centres = b"".join(plan.centres.tobytes() for plan in plans if plan.centres is not None)
    pairs = np.concatenate([np.stack([plan.predicted, plan.predicted - plan.references], axis=1).ravel()
                            for plan in plans] + [np.zeros(0, np.int32)]).astype("<i4")
    row_classes = b"".join(plan.row_classes.tobytes() for plan in plans)
    tables = b"".join(table.to_bytes() for plan in plans for table in plan.tables + plan.row_tables)
    return (headers + _encode_bytes(classes, 1) + _encode_bytes(centres, 1) + _encode_bytes(pairs.tobytes(), 4)
            + _encode_bytes(row_classes, 1) + _TABLES_SIZE.pack(len(tables)) + _encode_bytes(tables, 1)
            + _words(coder))


def _blocks(codes: np.ndarray, bits: int, plan: _Plan) -> list[tuple[np.ndarray, _Table]]:
    """Every block of symbols (int32, 0..2·qmax) with its table, in decoding order."""
    qmax = 2 ** (bits - 1) - 1
    roots = _roots(codes.shape[0], plan.predicted)
    order = np.argsort(plan.classes, kind="stable")
    by_class = _centred(codes[roots].T[order], plan.centres, order, qmax).ravel()  # [root cols by class × roots]
    ends = np.cumsum(np.bincount(plan.classes, minlength=len(plan.tables))) * len(roots)
    blocks = list(zip(np.split(by_class, ends[:-1]), plan.tables))
    for rows, references, table in _row_groups(plan):
        residual = (codes[rows].astype(np.int32) - codes[references] + qmax) % (2 * qmax + 1)  # [n, cols]
        blocks.append((residual.ravel(), table))
    return blocks


def _decode_codes(body: memoryview, specs: list[ArraySpec], payload: bytearray) -> None:
    """Decode every code matrix of ``specs`` into its place in ``payload``."""
    reader = _Reader(body)
    headers = [_TENSOR_HEADER.unpack(reader.take(_TENSOR_HEADER.size, "codes: tensor header")) for _ in specs]
    if max((k for k, _, _ in headers), default=0) > MAX_LEVELS_PER_OCTAVE or any(c > 1 for _, c, _ in headers):
        raise StreamError(f"codes: more than {MAX_LEVELS_PER_OCTAVE} levels per octave or a bad flag (corrupt)")
    if any(n > spec.shape[0] for spec, (_, _, n) in zip(specs, headers)):
        raise StreamError("codes: more predicted rows than a matrix has (corrupt)")
    columns = sum(spec.shape[1] for spec, (k, _, _) in zip(specs, headers) if k)
    centred = sum(spec.shape[1] for spec, (_, c, _) in zip(specs, headers) if c)
    predicted = sum(n for _, _, n in headers)
    classes = _read_array(reader, "codes: column classes", columns, np.uint8)
    centres = _read_array(reader, "codes: column centres", centred, np.int8)
    pairs = _read_array(reader, "codes: predicted rows", 2 * predicted, np.dtype("<i4")).reshape(-1, 2)
    row_classes = _read_array(reader, "codes: residual classes", predicted, np.uint8)
    (tables_size,) = _TABLES_SIZE.unpack(reader.take(_TABLES_SIZE.size, "codes: tables size"))
    if tables_size > MAX_TABLES_BYTES:
        raise StreamError(f"codes: {tables_size:,} bytes of tables declared (at most {MAX_TABLES_BYTES:,}; corrupt)")
    tables = _Reader(memoryview(_read_array(reader, "codes: tables", tables_size, np.uint8).tobytes()))
    plans, column_start, centre_start, row_start = [], 0, 0, 0
    for spec, (k, c, n) in zip(specs, headers):
        cols = spec.shape[1]
        column_classes = classes[column_start:column_start + cols] if k else np.zeros(cols, dtype=np.uint8)
        column_start += cols if k else 0
        column_centres = centres[centre_start:centre_start + cols] if c else None
        centre_start += cols if c else 0
        rows, row_start = slice(row_start, row_start + n), row_start + n
        plans.append(_read_plan(tables, spec, k, column_centres, column_classes, pairs[rows], row_classes[rows]))
    if tables.remaining():
        raise StreamError(f"codes: {tables.remaining():,} bytes of tables left over (corrupt)")
    coder = _ans_decoder(reader.rest(), "codes")
    for spec, plan in zip(specs, plans):
        count = math.prod(spec.shape)
        _decode_matrix(coder, spec, plan, np.frombuffer(payload, np.int8, count, spec.offset).reshape(spec.shape))
    _check_consumed(coder, "codes")


def _read_array(reader: _Reader, what: str, count: int, dtype: np.dtype) -> np.ndarray:
    method, section = reader.section(what)
    size = count * np.dtype(dtype).itemsize
    return np.frombuffer(_decode_bytes(method, section, size, np.dtype(dtype).itemsize, what), dtype=dtype)


def _read_plan(
    reader: _Reader, spec: ArraySpec, per_octave: int, centres: np.ndarray | None, classes: np.ndarray,
    pairs: np.ndarray, row_classes: np.ndarray,
) -> _Plan:
    """A matrix's plan from its side information, its tables read from ``reader``, all checked."""
    rows, cols = spec.shape
    predicted, distances = pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int32)
    if len(predicted) and (np.any(np.diff(predicted) <= 0) or predicted[-1] >= rows or np.any(distances <= 0)
                           or np.any(distances > predicted)):
        raise StreamError("codes: predicted rows out of order or referring outside their matrix (corrupt)")
    roots = rows - len(predicted)
    count = 0 if roots * cols == 0 else int(classes.max()) + 1
    row_count = 0 if len(predicted) * cols == 0 else int(row_classes.max()) + 1
    tables = [_Table.read(reader, "codes") for _ in range(count + row_count)]
    if any(table.lo + len(table.values) > 2**spec.bits - 1 for table in tables):
        raise StreamError(f"codes: a table reaches beyond the {spec.bits}-bit codes of its matrix (corrupt)")
    return _Plan(per_octave, centres, classes, tables[:count], predicted, predicted - distances, row_classes,
                 tables[count:])


def _decode_matrix(coder: constriction.stream.stack.AnsCoder, spec: ArraySpec, plan: _Plan, out: np.ndarray) -> None:
    """Decode one code matrix into ``out`` (int8 [rows, cols]) in the order of :func:`_blocks`."""
    rows, cols = spec.shape
    qmax = 2 ** (spec.bits - 1) - 1
    roots = _roots(rows, plan.predicted)
    by_class = np.empty(len(roots) * cols, dtype=np.int8)  # [root cols of class 0, then class 1, ...] × roots
    start = 0
    for size, table in zip((np.bincount(plan.classes, minlength=len(plan.tables)) * len(roots)).tolist(), plan.tables):
        table.decode_into(coder, by_class[start:start + size], table.lo - qmax)  # within the table: checked against bits
        start += size
    decoded = by_class.reshape(cols, len(roots)).T  # [roots, cols], columns still in class order
    order = np.argsort(plan.classes, kind="stable")
    if plan.centres is not None:  # undo (q - centre + qmax) mod n
        decoded = ((decoded.astype(np.int16) + qmax + plan.centres[order]) % (2 * qmax + 1) - qmax).astype(np.int8)
    if len(roots) == rows:
        out[:, order] = decoded
    else:
        root_rows = np.empty((len(roots), cols), dtype=np.int8)
        root_rows[:, order] = decoded
        out[roots] = root_rows
    for group, references, table in _row_groups(plan):
        symbols = table.decode(coder, len(group) * cols).reshape(len(group), cols) + table.lo
        out[group] = (symbols + out[references]) % (2 * qmax + 1) - qmax  # undoes (q - q_ref + qmax) mod n


def _roots(rows: int, predicted: np.ndarray) -> np.ndarray:
    """The rows that are not predicted, ascending."""
    keep = np.ones(rows, dtype=bool)
    keep[predicted] = False
    return np.flatnonzero(keep)


def _row_groups(plan: _Plan) -> list[tuple[np.ndarray, np.ndarray, _Table]]:
    """Predicted rows by generation (a row comes after its reference), then residual class."""
    generation: dict[int, int] = {}
    for row, reference in zip(plan.predicted.tolist(), plan.references.tolist()):
        generation[row] = generation.get(reference, 0) + 1  # references precede their rows
    depth = np.array([generation[row] for row in plan.predicted.tolist()], dtype=np.int64)
    groups = []
    for level in range(1, int(depth.max(initial=0)) + 1):
        for index, table in enumerate(plan.row_tables):
            chosen = (depth == level) & (plan.row_classes == index)
            if chosen.any():
                groups.append((plan.predicted[chosen], plan.references[chosen], table))
    return groups


def _plan(codes: np.ndarray, bits: int) -> _Plan:
    """The predicted rows, then the cheapest column classing of the roots (estimated bits)."""
    rows, cols = codes.shape
    qmax = 2 ** (bits - 1) - 1
    predicted, references = _references(codes)
    residual = (codes[predicted].astype(np.int32) - codes[references] + qmax) % (2 * qmax + 1)  # [n, cols]
    residual_square = np.sum(np.square(residual - qmax, dtype=np.float64), axis=1) / max(cols, 1)  # exact sums
    row_classes = _levels(residual_square, ROW_LEVELS_PER_OCTAVE)
    row_tables = [_table(np.bincount(residual[row_classes == c].ravel(), minlength=2 * qmax + 1))
                  for c in range(len(np.unique(row_classes)))]
    roots = codes[_roots(rows, predicted)]  # [roots, cols]
    centres = np.rint(np.median(roots, axis=0)).astype(np.int8) if roots.size else np.zeros(cols, dtype=np.int8)
    plain, centred = _column_plan(roots, None, bits), _column_plan(roots, centres, bits)
    centre_bits = _coded_bits(np.bincount(centres.astype(np.int64) + 128), None) + 8 * 256  # ~ its section
    if centred[0] + centre_bits < plain[0]:
        return _Plan(centred[1], centres, *centred[2:], predicted, references, row_classes, row_tables)
    return _Plan(plain[1], None, *plain[2:], predicted, references, row_classes, row_tables)


def code_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """float64 [cols, 2·qmax + 1]: the bits each code value −qmax..qmax would cost in each column of
    ``codes`` (int8 [rows, cols]) under the model this coder fits to them: the table of the column's
    class, relative to the column's centre where the plan centres them. Rate-aware GPTQ
    (:mod:`pgolf.quant.gptq`) chooses codes by it. Predicted rows are priced as roots (their
    residual model is not a column's); a value the table never saw costs one bit more than its
    dearest seen value, and a matrix with no root rows costs nothing.
    """
    rows, cols = codes.shape
    qmax = 2 ** (bits - 1) - 1
    values = np.arange(-qmax, qmax + 1)  # [nsym]
    priced = np.zeros((cols, len(values)))
    plan = _plan(codes, bits)
    for index, table in enumerate(plan.tables):
        window = np.zeros(len(values))
        window[table.lo:table.lo + len(table.values)] = table.probabilities()
        seen = window > 0
        cost = np.zeros(len(values))
        cost[seen] = -np.log2(window[seen] / window.sum())
        cost[~seen] = cost[seen].max() + 1.0
        members = np.flatnonzero(plan.classes == index)
        symbols = np.broadcast_to(values + qmax, (len(members), len(values)))  # [members, nsym]
        if plan.centres is not None:
            symbols = (values[None, :] - plan.centres[members, None].astype(np.int64) + qmax) % len(values)
        priced[members] = cost[symbols]
    return priced


def _centred(codes: np.ndarray, centres: np.ndarray | None, order: np.ndarray, qmax: int) -> np.ndarray:
    """Symbols of ``codes`` (int8 [cols in ``order``, n]): ``(q - centre + qmax) mod (2·qmax + 1)``, int32."""
    symbols = codes.astype(np.int32) + qmax
    if centres is not None:
        symbols -= centres[order].astype(np.int32)[:, None]
        symbols %= 2 * qmax + 1
    return symbols


def _references(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that nearly repeat an earlier row, and the nearest earlier row (exact integer distances).

    Candidates are first the rows next to each other when sorted by two projections (the sum
    of a row's codes, and its alternating sum), so that near-repeats meet without comparing
    all pairs; a matrix whose rows have no near-repeat among their direct neighbours is not
    searched further. Among the rows so found, every pair is then compared.
    """
    rows, cols = codes.shape
    wide = codes.astype(np.int32)  # [rows, cols]; squared distances stay below 2^31 for cols < 2^15
    own = np.sum(np.square(wide), axis=1)  # [rows]
    best = np.full(rows, np.iinfo(np.int32).max, dtype=np.int64)
    reference = np.full(rows, -1, dtype=np.int64)
    signs = np.where(np.arange(cols) % 2 == 0, 1, -1).astype(np.int32)
    for key in (wide.sum(axis=1), wide @ signs):
        order = np.argsort(key, kind="stable")
        for offset in range(1, min(NEIGHBOURS, rows - 1) + 1):
            for row, partner in ((order[offset:], order[:-offset]), (order[:-offset], order[offset:])):
                earlier = partner < row
                row, partner = row[earlier], partner[earlier]  # each row at most once: no write conflicts
                distance = np.sum(np.square(wide[row] - wide[partner]), axis=1)  # [pairs]
                better = (distance < best[row]) | ((distance == best[row]) & (partner < reference[row]))
                best[row[better]], reference[row[better]] = distance[better], partner[better]
            if offset == 1 and not np.any(REFERENCE_GAIN * best < own):
                return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
    found = REFERENCE_GAIN * best < own
    _nearest_within(wide, np.union1d(np.flatnonzero(found), reference[found]), best, reference)
    chosen = np.flatnonzero((reference >= 0) & (REFERENCE_GAIN * best < own))
    return chosen.astype(np.int32), reference[chosen].astype(np.int32)


def _nearest_within(wide: np.ndarray, group: np.ndarray, best: np.ndarray, reference: np.ndarray) -> None:
    """Give each row of ``group`` its nearest earlier row of ``group`` where that is nearer (in place).

    float64 products of integer codes are exact (every partial sum is an integer below
    2^53), so the distances do not depend on the machine's summation order.
    """
    members = wide[group].astype(np.float64)  # [n, cols]
    norms = np.sum(np.square(members), axis=1)  # [n]
    for start in range(0, len(group), _NEAREST_CHUNK):
        block = slice(start, start + _NEAREST_CHUNK)
        distance = norms[block, None] + norms[None, :] - 2 * members[block] @ members.T  # [chunk, n]
        distance[np.arange(len(group))[None, :] >= np.arange(len(group))[block, None]] = np.inf  # earlier only
        nearest = np.argmin(distance, axis=1)  # the first (lowest row) among equals
        nearest_distance = distance[np.arange(len(nearest)), nearest]
        rows = group[block]
        better = (nearest_distance < best[rows]) | ((nearest_distance == best[rows]) & (group[nearest] < reference[rows]))
        best[rows[better]], reference[rows[better]] = nearest_distance[better].astype(np.int64), group[nearest][better]


def _column_plan(codes: np.ndarray, centres: np.ndarray | None, bits: int) -> tuple[float, int, np.ndarray, list]:
    """``(estimated bits, per_octave, classes, tables)``: the cheapest column classing among
    :data:`LEVEL_CHOICES`, side information included."""
    rows, cols = codes.shape
    if codes.size == 0:
        return 0.0, 0, np.zeros(cols, dtype=np.uint8), []
    nsym = 2**bits - 1
    column_counts = _column_counts(_centred(codes.T, centres, np.arange(cols), nsym // 2), nsym)  # [cols, nsym]
    # exact: integer counts times integer squares stay far below 2^53
    mean_square = column_counts @ np.square(np.arange(nsym) - nsym // 2, dtype=np.float64) / rows  # [cols]
    best: tuple[float, int, np.ndarray, list[_Table]] | None = None
    for per_octave in LEVEL_CHOICES:
        classes = _levels(mean_square, per_octave)
        members = np.zeros((int(classes.max()) + 1, cols))  # [classes, cols]: 1 where a column is in a class
        members[classes, np.arange(cols)] = 1.0
        counts = np.rint(members @ column_counts).astype(np.int64)  # [classes, nsym]; exact below 2^53
        tables = [_table(row) for row in counts]
        cost = sum(_coded_bits(row, table) for row, table in zip(counts, tables))
        cost += 8 * sum(len(table.values) + 2 for table in tables)
        if per_octave:
            cost += _coded_bits(np.bincount(classes), None)  # the side information, about its entropy
        if best is None or cost < best[0]:
            best = (cost, per_octave, classes, tables)
    return best


def _column_counts(symbols: np.ndarray, nsym: int) -> np.ndarray:
    """Histogram of each row of ``symbols`` (int32 [cols, n], 0..nsym-1): int64 [cols, nsym]."""
    cols = symbols.shape[0]
    keys = symbols + (np.arange(cols, dtype=np.int32) * nsym)[:, None]
    return np.bincount(keys.ravel(), minlength=cols * nsym).reshape(cols, nsym)


def _levels(mean_square: np.ndarray, per_octave: int) -> np.ndarray:
    """Each value's RMS level at ``per_octave`` steps per octave, renumbered densely from 0 (uint8).

    Levels come from comparisons with fixed boundaries (no logarithm), so they are the same
    on every machine. A floor of 1/4 code step keeps all-zero rows and columns in range.
    """
    if not per_octave or len(mean_square) == 0:
        return np.zeros(len(mean_square), dtype=np.uint8)
    steps = np.arange(-2 * per_octave, 16 * per_octave) + 0.5  # octaves of RMS -1/2 .. 2^16 codes
    boundaries = np.array([4.0 ** (step / per_octave) for step in steps.tolist()])  # of the mean square
    levels = np.searchsorted(boundaries, mean_square + 0.25)
    _, dense = np.unique(levels, return_inverse=True)
    return dense.astype(np.uint8)


def _coded_bits(counts: np.ndarray, table: _Table | None) -> float:
    """Bits to code ``counts`` under ``table``'s probabilities (None: under the counts' own: their entropy)."""
    if table is None:
        probabilities = counts / counts.sum()
    else:
        window = np.zeros(len(counts))
        window[table.lo:table.lo + len(table.values)] = table.probabilities()
        probabilities = window / window.sum()
    used = counts > 0
    return float(-(counts[used] * np.log2(probabilities[used])).sum())
