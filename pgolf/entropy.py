"""The ``ans`` coder: a serialized model's arrays entropy-coded under explicit probability models.

A general coder (brotli, lzma, zstd) looks for repeated strings, which quantized weights
do not have; what they have is a known shape: SDClip's integer codes are a bell around 0
whose width differs from one input channel (column) to the next. This coder gives each
column of each code matrix a width level (its code RMS on a log scale, sent as side
information), codes every column under the histogram of its (tensor, level) class with
an ANS coder (``constriction``), and codes the fp16 scales and passthrough tensors byte
lane by byte lane under their own histograms, or with brotli or raw where that is smaller.
It ships with the artifact (its source is part of the submission's code bytes).

Stream (version :data:`CODER_VERSION`), all integers little-endian::

    section(model header) | section(codes) | section(scales) | section(fp16 passthrough) | section(fp32 passthrough)
    section := u8 method | u32 body_len | body

Methods: 0 raw bytes; 1 brotli-11 of the bytes grouped by byte lane (all first bytes of
the items, then all second bytes, ...); 2 ``lanes``: per byte lane a histogram table,
then one ANS stream of all lanes; 3 ``columns`` (codes only, see :func:`_encode_codes`).
A section concatenates its arrays in header order. A histogram table is ``u8 lo | u8
hi | (hi - lo + 1) × u8 v`` for the symbols ``lo..hi``, each with probability ∝
``2^(-v/16)`` (``v`` 255: never occurs), so the model costs one byte per symbol used and
is the same on every machine (the encoder codes with exactly the table it sends).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import brotli
import constriction
import numpy as np

CODER_VERSION = 1
RAW, BROTLI, LANES, COLUMNS = 0, 1, 2, 3
METHOD_NAMES = {RAW: "raw", BROTLI: "brotli", LANES: "lanes", COLUMNS: "columns"}
LOG_STEPS = 16  # table resolution: steps per octave of probability (error under 2.2 %)
ABSENT = 255  # table value of a symbol that never occurs
BROTLI_QUALITY = 11
_SECTION = struct.Struct("<BI")  # method, body length
_FLOAT_SECTIONS = (("scale", "float16"), ("passthrough", "float16"), ("passthrough", "float32"))
_ITEMSIZE = {"int8": 1, "float16": 2, "float32": 4}


class StreamError(ValueError):
    """An ``ans`` stream that does not decode to what it declares."""


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


def encode_model(head: bytes, specs: list[ArraySpec], payload: memoryview) -> bytes:
    """The stream of a model: its header bytes, then its arrays (read from ``payload``) by section."""
    parts = [_encode_bytes(head, 1)]
    codes = [spec for spec in specs if spec.role == "codes"]
    parts.append(_section(COLUMNS, _encode_codes([_codes_of(spec, payload) for spec in codes], codes)))
    for role, dtype in _FLOAT_SECTIONS:
        chosen = [spec for spec in specs if (spec.role, spec.dtype) == (role, dtype)]
        data = b"".join(payload[spec.offset:spec.offset + spec.nbytes] for spec in chosen)
        parts.append(_encode_bytes(data, _ITEMSIZE[dtype]))
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
    for spec, array in zip(codes, _decode_codes(section, codes)):
        payload[spec.offset:spec.offset + spec.nbytes] = array.tobytes()
    for role, dtype in _FLOAT_SECTIONS:
        chosen = [spec for spec in specs if (spec.role, spec.dtype) == (role, dtype)]
        name = f"{role} {dtype}"
        method, section = reader.section(name)
        data = _decode_bytes(method, section, sum(spec.nbytes for spec in chosen), _ITEMSIZE[dtype], name)
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


def _encode_bytes(data: bytes, itemsize: int) -> bytes:
    """The smallest of raw, brotli-by-lane and histogram-by-lane codings of ``data``."""
    candidates = [(RAW, bytes(data))]
    if data:
        lanes = _split_lanes(data, itemsize)
        candidates.append((BROTLI, brotli.compress(b"".join(lane.tobytes() for lane in lanes), quality=BROTLI_QUALITY)))
        candidates.append((LANES, _encode_lanes(lanes)))
    method, body = min(candidates, key=lambda candidate: len(candidate[1]))
    return _section(method, body)


def _decode_bytes(method: int, body: memoryview, size: int | None, itemsize: int, what: str) -> bytes:
    """Undo :func:`_encode_bytes`; ``size`` (when known) is the length the header declares."""
    if method == RAW:
        data = bytes(body)
    elif method == BROTLI:
        data = _join_lanes(_unbrotli(body, size, what), itemsize)
    elif method == LANES:
        if size is None:
            raise StreamError(f"{what}: method lanes needs a declared size")
        data = _decode_lanes(body, size, itemsize, what)
    else:
        raise StreamError(f"{what}: unknown method {method} (known: raw 0, brotli 1, lanes 2)")
    if size is not None and len(data) != size:
        raise StreamError(f"{what}: decodes to {len(data):,} bytes, the header declares {size:,}")
    return data


def _unbrotli(body: memoryview, size: int | None, what: str) -> bytes:
    limit = (size if size is not None else len(body) * 64 + (1 << 20)) + 1  # a header never inflates more
    decoder = brotli.Decompressor()
    try:
        data = decoder.process(bytes(body), output_buffer_limit=limit)
    except brotli.error as exc:
        raise StreamError(f"{what}: brotli body is corrupt: {exc}") from None
    if not decoder.is_finished() or len(data) >= limit:
        raise StreamError(f"{what}: brotli body is truncated or inflates beyond its declared size")
    return data


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

    def probabilities(self) -> np.ndarray:
        """float64 [hi - lo + 1], not normalized: ``2^(-v/16)``, 0 where absent."""
        steps = self.values.astype(np.float64)
        return np.where(self.values != ABSENT, np.exp2(-steps / LOG_STEPS), 0.0)

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
    with np.errstate(divide="ignore"):
        steps = np.round(-np.log2(window / window.max()) * LOG_STEPS)
    values = np.where(window > 0, np.minimum(steps, ABSENT - 1), ABSENT).astype(np.uint8)
    return _Table(lo, values)


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

LEVEL_CHOICES = (0, 1, 2, 4, 8)  # column levels per octave of code RMS the encoder tries (0: one class)
MAX_LEVELS_PER_OCTAVE = 32


@dataclass(frozen=True)
class _Plan:
    """How one code matrix is coded: its column classes and a table per class."""

    per_octave: int  # 0: the whole matrix is one class
    classes: np.ndarray  # uint8 [cols]: each column's class (dense: 0..n-1)
    tables: list[_Table]


def _encode_codes(arrays: list[np.ndarray], specs: list[ArraySpec]) -> bytes:
    """``u8 per_octave × tensors | section(column classes) | tables | ANS words`` (module docstring)."""
    plans = [_plan(codes, spec.bits) for codes, spec in zip(arrays, specs)]
    classes = b"".join(plan.classes.tobytes() for plan in plans if plan.per_octave)
    coder = constriction.stream.stack.AnsCoder()
    for codes, spec, plan in zip(reversed(arrays), reversed(specs), reversed(plans)):
        blocks = _class_blocks(codes, plan.classes, len(plan.tables))
        offset = 2 ** (spec.bits - 1) - 1
        for block, table in zip(reversed(blocks), reversed(plan.tables)):
            symbols = block.astype(np.int32)
            symbols += offset - table.lo  # code -qmax..qmax -> table symbol 0..
            table.encode(coder, symbols)
    tables = b"".join(table.to_bytes() for plan in plans for table in plan.tables)
    return bytes(plan.per_octave for plan in plans) + _encode_bytes(classes, 1) + tables + _words(coder)


def _decode_codes(body: memoryview, specs: list[ArraySpec]) -> list[np.ndarray]:
    reader = _Reader(body)
    per_octave = list(reader.take(len(specs), "codes: levels per octave"))
    if max(per_octave, default=0) > MAX_LEVELS_PER_OCTAVE:
        raise StreamError(f"codes: {max(per_octave)} levels per octave (at most {MAX_LEVELS_PER_OCTAVE})")
    columns = sum(spec.shape[1] for spec, k in zip(specs, per_octave) if k)
    method, section = reader.section("codes: column classes")
    classes = np.frombuffer(_decode_bytes(method, section, columns, 1, "codes: column classes"), dtype=np.uint8)
    plans, start = [], 0
    for spec, k in zip(specs, per_octave):
        rows, cols = spec.shape
        if k:
            column_classes, start = classes[start:start + cols], start + cols
        else:
            column_classes = np.zeros(cols, dtype=np.uint8)
        count = 0 if rows * cols == 0 else int(column_classes.max()) + 1
        tables = [_Table.read(reader, "codes") for _ in range(count)]
        if any(table.lo + len(table.values) > 2**spec.bits - 1 for table in tables):
            raise StreamError(f"codes: a table reaches beyond the {spec.bits}-bit codes of its matrix (corrupt)")
        plans.append(_Plan(k, column_classes, tables))
    coder = _ans_decoder(reader.rest(), "codes")
    arrays = [_decode_matrix(coder, spec, plan) for spec, plan in zip(specs, plans)]
    _check_consumed(coder, "codes")
    return arrays


def _decode_matrix(coder: constriction.stream.stack.AnsCoder, spec: ArraySpec, plan: _Plan) -> np.ndarray:
    rows, cols = spec.shape
    qmax = 2 ** (spec.bits - 1) - 1
    order = np.argsort(plan.classes, kind="stable")  # columns class by class, as the encoder wrote them
    sizes = np.bincount(plan.classes, minlength=len(plan.tables)) * rows
    by_class = np.empty(rows * cols, dtype=np.int8)  # [cols of class 0, then class 1, ...] × rows
    start = 0
    for size, table in zip(sizes.tolist(), plan.tables):
        symbols = table.decode(coder, size)  # int32 [size], within the table (checked against bits)
        np.add(symbols, table.lo - qmax, out=by_class[start:start + size], casting="unsafe")
        start += size
    transposed = np.empty((cols, rows), dtype=np.int8)  # [cols, rows]
    transposed[order] = by_class.reshape(cols, rows)
    return np.ascontiguousarray(transposed.T)  # [rows, cols]


def _plan(codes: np.ndarray, bits: int) -> _Plan:
    """The cheapest column classing of one code matrix among :data:`LEVEL_CHOICES` (estimated bits)."""
    rows, cols = codes.shape
    if codes.size == 0:
        return _Plan(0, np.zeros(cols, dtype=np.uint8), [])
    nsym = 2**bits - 1
    column_counts = _column_counts(codes, bits)  # [cols, nsym]
    # a column's code RMS from its histogram; the floor keeps log2 finite for all-zero columns
    mean_square = column_counts @ np.square(np.arange(nsym) - nsym // 2, dtype=np.float64) / rows
    rms = np.sqrt(mean_square + 0.25)  # [cols]
    best: tuple[float, _Plan] | None = None
    for per_octave in LEVEL_CHOICES:
        classes = _column_classes(rms, per_octave)
        members = np.zeros((int(classes.max()) + 1, cols))  # [classes, cols]: 1 where a column is in a class
        members[classes, np.arange(cols)] = 1.0
        counts = np.rint(members @ column_counts).astype(np.int64)  # [classes, nsym]; exact below 2^53
        tables = [_table(row) for row in counts]
        cost = sum(_coded_bits(row, table) for row, table in zip(counts, tables))
        cost += 8 * sum(len(table.values) + 2 for table in tables)
        if per_octave:
            cost += _coded_bits(np.bincount(classes), None)  # the side information, about its entropy
        if best is None or cost < best[0]:
            best = (cost, _Plan(per_octave, classes, tables))
    return best[1]


def _column_counts(codes: np.ndarray, bits: int) -> np.ndarray:
    """Histogram of each column's symbols: int64 [cols, 2^bits - 1]."""
    rows, cols = codes.shape
    nsym = 2**bits - 1
    keys = _symbols(codes, bits) + (np.arange(cols, dtype=np.int32) * nsym)[None, :]  # [rows, cols]
    return np.bincount(keys.ravel(), minlength=cols * nsym).reshape(cols, nsym)


def _column_classes(rms: np.ndarray, per_octave: int) -> np.ndarray:
    """Each column's class: its log2 RMS level at ``per_octave`` steps, renumbered densely from 0."""
    if not per_octave:
        return np.zeros(len(rms), dtype=np.uint8)
    levels = np.round(np.log2(rms) * per_octave).astype(np.int64)
    _, dense = np.unique(levels, return_inverse=True)
    if dense.max() > 255:
        raise ValueError(f"{dense.max() + 1} column levels do not fit a byte")
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


def _symbols(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``-qmax..qmax`` as ANS symbols ``0..2·qmax``: int32, same shape."""
    return codes.astype(np.int32) + (2 ** (bits - 1) - 1)


def _class_blocks(codes: np.ndarray, classes: np.ndarray, count: int) -> list[np.ndarray]:
    """The codes of each class's columns, column after column: one flat block per class."""
    order = np.argsort(classes, kind="stable")
    by_class = codes.T[order].ravel()  # [cols sorted by class × rows]
    ends = np.cumsum(np.bincount(classes, minlength=count)) * codes.shape[0]
    return np.split(by_class, ends[:-1])
