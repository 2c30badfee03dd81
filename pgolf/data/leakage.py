"""Validation documents in the training data: found by fingerprint, confirmed token for token.

A validation document that is also a training document turns the score into a memory test;
in the challenge it came from re-tokenizing the documents with a validation split of the
wrong size (issue #2127: a default of 10,000 validation documents put 40,000 of the 50,000
scored ones into training). :func:`find_leaks` indexes every validation document by a
fingerprint (its length and a few of its tokens, computed for a whole shard at once with
numpy), looks every training document up in that index and compares each candidate whole,
so a reported leak is an exact duplicate and a fingerprint collision never is one.
:func:`check_no_leaks` refuses a dataset with any, naming the documents. Documents are the
BOS-separated token runs of a split (``pgolf.data.shards``); a split is the concatenation of
its files, so a document may continue from one shard file into the next; tokens before a
split's first BOS count as a document too. Empty documents (two BOS in a row) hold nothing
to leak and are skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.data.shards import BOS_ID, ShardError, read_shard, shard_files

# tokens of a document (besides its length and last token) that its fingerprint reads
FINGERPRINT_TOKENS = 4
_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit multiplier: spreads each step over all bits
LEAKS_NAMED = 5  # the error lists this many leaked documents, then the count of the rest


class LeakError(ShardError):
    """Validation documents that the training data holds too."""


@dataclass(frozen=True)
class Place:
    """Where a document starts: its BOS token's offset in a shard file."""

    file: str
    offset: int


@dataclass(frozen=True)
class Leak:
    """One validation document that is also a training document."""

    index: int  # the document's number in the validation split (0: the first)
    tokens: int  # its length without the BOS
    sha256: str  # of its token ids as stored (little-endian uint16), without the BOS
    val: Place
    train: Place

    def describe(self) -> str:
        return (f"validation document {self.index} ({self.val.file} at token {self.val.offset:,}, "
                f"{self.tokens:,} tokens, sha256 {self.sha256[:16]}) is also in {self.train.file} at token "
                f"{self.train.offset:,}")


@dataclass(frozen=True)
class Documents:
    """Documents of one stretch of a split: ``tokens[starts[i]]`` is the BOS of document i, ``ends[i]`` its end."""

    tokens: np.ndarray  # [N] uint16
    starts: np.ndarray  # [D] int64
    ends: np.ndarray  # [D] int64
    file: str
    offsets: np.ndarray  # [D] each document's BOS offset in ``file``

    def fingerprints(self) -> np.ndarray:
        """One uint64 per document from its length, first and last tokens; equal documents, equal prints."""
        first = self.starts + 1
        last = np.maximum(self.ends - 1, self.starts)  # [D] the BOS itself for an empty document
        key = (self.ends - first).astype(np.uint64)  # [D]
        for position in [*(np.minimum(first + k, last) for k in range(FINGERPRINT_TOKENS)), last]:
            key = key * _MIX + self.tokens[position].astype(np.uint64)  # wraps modulo 2**64
        return key

    def body(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] + 1 : self.ends[i]]


def split_stretches(dataset_dir: Path, split: str, bos_id: int) -> Iterator[Documents]:
    """The documents of ``split``, a shard file at a time; a document running into the next file comes alone."""
    files = shard_files(dataset_dir, split)
    if not files:
        raise ShardError(f"{dataset_dir}: no fineweb_{split}_*.bin shards")
    open_doc: tuple[list[np.ndarray], str, int] | None = None  # pieces, file and offset of the unfinished document
    for path in files:
        tokens = read_shard(path)
        starts = np.flatnonzero(tokens == bos_id)  # [D]
        head_end = int(starts[0]) if starts.size else tokens.size
        if open_doc is None and head_end > 0:  # tokens before the split's first BOS: a document all the same
            open_doc = ([np.array([bos_id], dtype=tokens.dtype)], path.name, 0)
        if open_doc is not None:
            open_doc[0].append(tokens[:head_end])
            if starts.size:
                yield _single(*open_doc)
                open_doc = None
        if starts.size:
            yield Documents(tokens, starts[:-1], starts[1:], path.name, starts[:-1])
            open_doc = ([tokens[starts[-1]:]], path.name, int(starts[-1]))
    if open_doc is not None:
        yield _single(*open_doc)


def _single(pieces: list[np.ndarray], file: str, offset: int) -> Documents:
    tokens = np.concatenate(pieces)
    return Documents(tokens, np.zeros(1, np.int64), np.array([tokens.size]), file, np.array([offset]))


def find_leaks(dataset_dir: str | Path, bos_id: int = BOS_ID) -> list[Leak]:
    """Every validation document that also appears, whole, as a training document (each once)."""
    dataset_dir = Path(dataset_dir)
    val = list(split_stretches(dataset_dir, "val", bos_id))
    index: dict[int, list[tuple[int, int]]] = {}  # fingerprint -> (stretch, document) of each validation document
    for s, stretch in enumerate(val):
        for d, key in enumerate(stretch.fingerprints().tolist()):
            if stretch.ends[d] > stretch.starts[d] + 1:
                index.setdefault(key, []).append((s, d))
    numbers = np.cumsum([0] + [stretch.starts.size for stretch in val])  # [S + 1] first document number per stretch
    known = np.fromiter(index, dtype=np.uint64, count=len(index))
    leaks: dict[int, Leak] = {}
    for stretch in split_stretches(dataset_dir, "train", bos_id):
        keys = stretch.fingerprints()
        for d in np.flatnonzero(np.isin(keys, known)).tolist():
            body = stretch.body(d)
            for s, v in index[int(keys[d])]:
                number = int(numbers[s]) + v
                if number not in leaks and np.array_equal(body, val[s].body(v)):
                    leaks[number] = Leak(number, body.size, hashlib.sha256(body.tobytes()).hexdigest(),
                                         Place(val[s].file, int(val[s].offsets[v])),
                                         Place(stretch.file, int(stretch.offsets[d])))
    return [leaks[number] for number in sorted(leaks)]


def check_no_leaks(dataset_dir: str | Path, bos_id: int = BOS_ID) -> None:
    """Refuse a dataset whose training split holds a validation document, naming the first ones."""
    leaks = find_leaks(dataset_dir, bos_id)
    if leaks:
        named = "; ".join(leak.describe() for leak in leaks[:LEAKS_NAMED])
        rest = f"; and {len(leaks) - LEAKS_NAMED} more" if len(leaks) > LEAKS_NAMED else ""
        raise LeakError(f"{dataset_dir}: {len(leaks)} validation document(s) also in the training data, so the "
                        f"score would measure memory: {named}{rest}. Rebuild the training shards without the "
                        "validation documents")
