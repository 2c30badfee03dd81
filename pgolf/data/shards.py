"""The challenge's binary token shards: writing, streaming, reading and validating.

A shard is a header of 256 little-endian int32 ``[20240520, 1, num_tokens, 0,
...]`` followed by ``num_tokens`` little-endian uint16 token ids. A dataset
directory holds ``fineweb_val_NNNNNN.bin`` and ``fineweb_train_NNNNNN.bin``
files; each split is the concatenation of its files in name order, and every
document in it is ``[bos] + ids``. Data whose text was transformed before
tokenizing (CaseOps) also has a byte sidecar: for each validation shard a twin
``fineweb_val_bytes_NNNNNN.bin`` in the same format whose uint16 entries are
the original UTF-8 bytes each token stands for (0 at every BOS), as the records
publish it; docs/BYTES.md says why scores need it. Readers memory-map the token body, so a
shard of 100 M tokens costs no memory until it is touched. ``check_dataset``
holds a dataset to its manifest (files, token counts, id range, tokenizer
hash) before a stage reads it, so a missing shard or a foreign tokenizer is an
error naming the file, never a quietly different result.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from pgolf.atomic import recover

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKENS = 2**31 - 1  # the header stores the count as int32
BOS_ID = 1  # the challenge tokenizers' bos id (docs/DESIGN.md §1)
MANIFEST_NAME = "manifest.json"  # beside the shards: what went in and what came out (the tokenize stage)
# beside the challenge's layout (DEST/datasets/, DEST/tokenizers/): what `pgolf download` fetched, from which
# repository at which revision, with each file's hash as the hub gave it and the download checked it
DOWNLOAD_RECORD = "download.json"
SPLITS = ("val", "train")  # file order of a dataset: validation documents come first
SIDECAR = "val_bytes"  # the byte sidecar's files: fineweb_val_bytes_NNNNNN.bin, one per validation shard
# Ids are checked against the vocabulary this many tokens at a time (bounded memory).
VALIDATE_CHUNK = 1 << 24


class ShardError(ValueError):
    """A shard file or dataset directory that is not in the challenge's format."""


def dataset_path(data_dir: str | Path, vocab_size: int) -> Path:
    """Where the challenge's layout keeps the shards of a vocab size."""
    return Path(data_dir) / "datasets" / f"fineweb10B_sp{vocab_size}"


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def shard_header(num_tokens: int) -> bytes:
    if not 0 <= num_tokens <= MAX_TOKENS:
        raise ShardError(f"a shard holds 0..{MAX_TOKENS} tokens, got {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, num_tokens)
    return header.tobytes()


def as_token_array(tokens: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
    """``tokens`` as little-endian uint16, refusing ids that do not fit."""
    array = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if array.dtype != TOKEN_DTYPE and array.size:
        if array.min() < 0 or array.max() >= 2**16:
            raise ShardError(f"token ids must lie in [0, 65535], got [{array.min()}, {array.max()}]")
    return array.astype(TOKEN_DTYPE, copy=False).reshape(-1)


def write_shard(path: str | Path, tokens: np.ndarray | torch.Tensor | list[int]) -> None:
    """Write one shard file (not atomic by itself: callers build datasets in a temp dir)."""
    array = as_token_array(tokens)
    with open(path, "wb") as handle:
        handle.write(shard_header(array.size))
        handle.write(array.tobytes())


def read_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found")
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, num_tokens = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic} (expected {MAGIC}): not a challenge shard")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {VERSION})")
    if num_tokens < 0:
        raise ShardError(f"{path}: negative token count {num_tokens} in the header")
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise ShardError(f"{path}: truncated body: {actual} bytes, header says {num_tokens} tokens ({expected} bytes)")
    if actual > expected:
        raise ShardError(f"{path}: {actual - expected} bytes after the {num_tokens} tokens the header declares")
    return num_tokens


def read_shard(path: str | Path) -> np.ndarray:
    """The token ids of one validated shard, memory-mapped read-only (uint16)."""
    path = Path(path)
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def shard_files(dataset_dir: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` (or the ``SIDECAR`` files) in order; numbered 0, 1, 2, ... without gaps."""
    if split not in (*SPLITS, SIDECAR):
        raise ShardError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise ShardError(f"{dataset_dir}: dataset directory not found")
    pattern = re.compile(rf"fineweb_{split}_(\d{{6}})\.bin")
    files = sorted(p for p in dataset_dir.iterdir() if pattern.fullmatch(p.name))
    for index, path in enumerate(files):
        if path.name != shard_name(split, index):
            raise ShardError(f"{dataset_dir}: {split} shards are not numbered 0..{len(files) - 1}: found {path.name}")
    return files


def load_validation_tokens(dataset_dir: str | Path, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Validation tokens cut to whole windows: ``((n - 1) // seq_len) * seq_len + 1`` (int64).

    ``max_tokens`` (0: all) first keeps only that many tokens, for quick evaluations.
    """
    files = shard_files(dataset_dir, "val")
    if not files:
        raise ShardError(f"{dataset_dir}: no fineweb_val_*.bin shards")
    tokens = np.concatenate([read_shard(path) for path in files])  # [n]
    if max_tokens:
        tokens = tokens[:max_tokens]
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(f"{dataset_dir}: {tokens.size} validation tokens are too few for seq_len {seq_len}")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))  # [usable + 1]


def check_sidecar(dataset_dir: str | Path, bos_id: int = BOS_ID) -> dict:
    """Hold the byte sidecar to the validation shards; its files, counts, sums and sha256 ({} when there is none).

    Each validation shard needs its twin, with one entry per token and 0 at every BOS
    (a document's BOS is no text); each disagreement is a ``ShardError`` naming the file.
    """
    dataset_dir = Path(dataset_dir)
    sidecars = shard_files(dataset_dir, SIDECAR)
    if not sidecars:
        return {}
    shards = shard_files(dataset_dir, "val")
    if len(sidecars) < len(shards):
        missing = len(sidecars)
        raise ShardError(f"{dataset_dir / shard_name(SIDECAR, missing)}: byte sidecar missing for "
                         f"{shards[missing].name}")
    if len(sidecars) > len(shards):
        raise ShardError(f"{sidecars[len(shards)]}: a byte sidecar without its validation shard "
                         f"{shard_name('val', len(shards))}")
    stats: dict[str, list] = {"files": [], "file_tokens": [], "file_bytes": [], "sha256": []}
    for shard, sidecar in zip(shards, sidecars, strict=True):
        tokens, counts = read_shard(shard), read_shard(sidecar)
        if counts.size != tokens.size:
            raise ShardError(f"{sidecar}: {counts.size} byte counts for the {tokens.size} tokens of {shard.name}")
        at_bos = np.flatnonzero(counts[tokens == bos_id])  # [k]
        if at_bos.size:
            position = int(np.flatnonzero(tokens == bos_id)[at_bos[0]])
            raise ShardError(f"{sidecar}: {int(counts[position])} bytes at position {position}, a BOS of "
                             f"{shard.name}: a BOS stands for no text")
        stats["files"].append(sidecar.name)
        stats["file_tokens"].append(int(counts.size))
        stats["file_bytes"].append(int(counts.sum(dtype=np.int64)))
        stats["sha256"].append(file_sha256(sidecar))
    return {**stats, "tokens": sum(stats["file_tokens"]), "bytes": sum(stats["file_bytes"])}


def load_validation_bytes(dataset_dir: str | Path, count: int) -> torch.Tensor:
    """The first ``count`` entries of the byte sidecar (int32), its files checked against the shards first."""
    check_sidecar(dataset_dir)
    files = shard_files(dataset_dir, SIDECAR)
    if not files:
        raise ShardError(f"{Path(dataset_dir) / shard_name(SIDECAR, 0)}: byte sidecar not found")
    counts = np.concatenate([read_shard(path) for path in files])[:count]  # [count]
    return torch.from_numpy(counts.astype(np.int32))


def split_documents(tokens: np.ndarray, bos_id: int, source: str | Path) -> list[np.ndarray]:
    """Cut a split's tokens into documents at each BOS (each returned without its BOS)."""
    starts = np.flatnonzero(tokens == bos_id)  # [D]
    if tokens.size and (starts.size == 0 or starts[0] != 0):
        raise ShardError(f"{source}: the split does not start with a BOS token (id {bos_id})")
    ends = np.append(starts[1:], tokens.size)  # [D]
    return [tokens[start + 1 : end] for start, end in zip(starts, ends, strict=True)]


def scan_shard(path: Path, vocab_size: int, bos_id: int = BOS_ID) -> tuple[int, int]:
    """Read every token of a shard: refuse an id not below ``vocab_size``; return (tokens, BOS count)."""
    shard = read_shard(path)
    documents = 0
    for start in range(0, shard.size, VALIDATE_CHUNK):
        chunk = shard[start : start + VALIDATE_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            position = start + int(np.argmax(chunk >= vocab_size))
            raise ShardError(f"{path}: token id {top} at position {position} is not below vocab_size {vocab_size}")
        documents += int(np.count_nonzero(chunk == bos_id))
    return int(shard.size), documents


def validate_dataset(dataset_dir: str | Path, vocab_size: int, bos_id: int = BOS_ID) -> dict[str, dict]:
    """Check every shard (header, size, ids below ``vocab_size``); per split: files, tokens, documents.

    ``documents`` counts ``bos_id`` tokens, as each document starts with one;
    ``file_tokens`` holds each file's token count.
    """
    stats = {}
    for split in SPLITS:
        files = shard_files(dataset_dir, split)
        if not files:
            raise ShardError(f"{dataset_dir}: no fineweb_{split}_*.bin shards")
        counts = [scan_shard(path, vocab_size, bos_id) for path in files]
        stats[split] = {"files": [p.name for p in files], "tokens": sum(t for t, _ in counts),
                        "documents": sum(d for _, d in counts), "file_tokens": [t for t, _ in counts]}
    return stats


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_dataset(
    dataset_dir: str | Path, tokenizer_path: str | Path, vocab_size: int, scan: tuple[str, ...] = SPLITS,
    bos_id: int = BOS_ID,
) -> dict:
    """Enforce the tokenize stage's manifest on a dataset before any stage reads it; return the manifest.

    Every file the manifest lists must be there with its listed token count
    (and so its size), no unlisted shard may lie beside them, the splits named
    in ``scan`` are read whole (every id below ``vocab_size``, the listed token
    and document totals), and the tokenizer must be the one the shards were made
    with (its sha256). Each disagreement is a ``ShardError`` naming the file.
    An interrupted replacement of either is first recovered (``pgolf.atomic.recover``).
    """
    dataset_dir, tokenizer_path = Path(dataset_dir), Path(tokenizer_path)
    recover(dataset_dir)
    recover(tokenizer_path)
    manifest = read_manifest(dataset_dir)
    where = dataset_dir / MANIFEST_NAME
    if manifest.get("vocab_size") != vocab_size:
        raise ShardError(f"{where}: vocab_size {manifest.get('vocab_size')!r}, but the model's vocab_size is {vocab_size}")
    for split in SPLITS:
        check_split(dataset_dir, split, manifest["splits"][split], vocab_size if split in scan else None, bos_id)
    check_listed_sidecar(dataset_dir, manifest, "val" in scan, bos_id)
    check_tokenizer(tokenizer_path, manifest["tokenizer"]["sha256"], where)
    return manifest


def read_manifest(dataset_dir: Path) -> dict:
    path = dataset_dir / MANIFEST_NAME
    if not dataset_dir.is_dir():
        raise ShardError(f"{dataset_dir}: dataset directory not found (run the tokenize stage first)")
    if not path.is_file():
        raise ShardError(f"{path}: dataset manifest not found (the tokenize stage writes it; re-run it)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for split in SPLITS:
            entry = manifest["splits"][split]
            if not isinstance(entry["files"], list) or not all(isinstance(f, str) for f in entry["files"]):
                raise TypeError(f"splits.{split}.files is not a list of names")
        if not isinstance(manifest["tokenizer"]["sha256"], str):
            raise TypeError("tokenizer.sha256 is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: not a pgolf dataset manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def check_split(dataset_dir: Path, split: str, listed: dict, vocab_size: int | None, bos_id: int) -> None:
    """The files of ``split`` are exactly the listed ones, with the listed counts (ids too, given ``vocab_size``)."""
    names = listed["files"]
    for name in names:
        if not (dataset_dir / name).is_file():
            raise ShardError(f"{dataset_dir / name}: listed in {MANIFEST_NAME} but missing")
    pattern = re.compile(rf"fineweb_{split}_\d{{6}}\.bin")
    for path in sorted(dataset_dir.iterdir()):
        if pattern.fullmatch(path.name) and path.name not in names:
            raise ShardError(f"{path}: a shard that {MANIFEST_NAME} does not list")
    if vocab_size is None:
        counts = [(read_header(dataset_dir / name), None) for name in names]
    else:
        counts = [scan_shard(dataset_dir / name, vocab_size, bos_id) for name in names]
    listed_tokens = listed.get("file_tokens", [None] * len(names))  # manifests before pgolf recorded them lack it
    if len(listed_tokens) != len(names):
        raise ShardError(f"{dataset_dir / MANIFEST_NAME}: {split} lists {len(names)} files but {len(listed_tokens)} sizes")
    for name, (tokens, _), expected in zip(names, counts, listed_tokens, strict=True):
        if expected is not None and tokens != expected:
            raise ShardError(f"{dataset_dir / name}: {tokens} tokens, but {MANIFEST_NAME} lists {expected}")
    total = sum(tokens for tokens, _ in counts)
    if total != listed.get("tokens"):
        raise ShardError(f"{dataset_dir}: the {split} shards hold {total} tokens, but {MANIFEST_NAME} lists "
                         f"{listed.get('tokens')}")
    if vocab_size is not None and sum(d for _, d in counts) != listed.get("documents"):
        raise ShardError(f"{dataset_dir}: the {split} shards hold {sum(d for _, d in counts)} documents, but "
                         f"{MANIFEST_NAME} lists {listed.get('documents')}")


def check_listed_sidecar(dataset_dir: Path, manifest: dict, read: bool, bos_id: int) -> None:
    """The byte sidecar is the one the manifest lists: its files, their lengths and (``read``) sums and sha256.

    Data the manifest declares transformed (``text_transform`` other than ``none``) must have one.
    """
    where = dataset_dir / MANIFEST_NAME
    listed = manifest.get("sidecar") or {}
    transform = manifest.get("text_transform", "none")
    if transform != "none" and not listed:
        raise ShardError(f"{where}: the data is {transform} text but no byte sidecar is listed "
                         f"({shard_name(SIDECAR, 0)}...): its scores cannot be counted in original bytes")
    names = listed.get("files", [])
    for path in sorted(dataset_dir.iterdir()):
        if re.fullmatch(r"fineweb_val_bytes_\d{6}\.bin", path.name) and path.name not in names:
            raise ShardError(f"{path}: a byte sidecar that {MANIFEST_NAME} does not list")
    if not names:
        return
    val_tokens = manifest["splits"]["val"].get("file_tokens") or [None] * len(names)
    if not len(names) == len(listed.get("file_tokens", [])) == len(val_tokens):
        raise ShardError(f"{where}: {len(names)} byte sidecar files listed for {len(val_tokens)} validation shards")
    for name, tokens, shard_tokens in zip(names, listed["file_tokens"], val_tokens, strict=True):
        path = dataset_dir / name
        if not path.is_file():
            raise ShardError(f"{path}: listed in {MANIFEST_NAME} but missing")
        if read_header(path) != tokens or (shard_tokens is not None and tokens != shard_tokens):
            raise ShardError(f"{path}: {read_header(path)} byte counts, but {MANIFEST_NAME} lists {tokens} and its "
                             f"validation shard holds {shard_tokens}")
    if not read:
        return
    actual = check_sidecar(dataset_dir, bos_id)
    for name, total, expected, digest, listed_digest in zip(names, actual["file_bytes"], listed["file_bytes"],
                                                             actual["sha256"], listed["sha256"], strict=True):
        if total != expected:
            raise ShardError(f"{dataset_dir / name}: its byte counts sum to {total}, but {MANIFEST_NAME} lists "
                             f"{expected} (the UTF-8 bytes of the documents)")
        if digest != listed_digest:
            raise ShardError(f"{dataset_dir / name}: sha256 {digest[:16]}... is not the {listed_digest[:16]}... "
                             f"{MANIFEST_NAME} lists")


def check_tokenizer(path: Path, sha256: str, manifest_path: Path) -> None:
    if not path.is_file():
        raise ShardError(f"{path}: tokenizer not found (the tokenize stage writes it beside the dataset)")
    actual = file_sha256(path)
    if actual != sha256:
        raise ShardError(f"{path}: sha256 {actual[:16]}... is not that of the tokenizer the shards were made with "
                         f"({sha256[:16]}..., in {manifest_path}): a different tokenizer; re-run the tokenize stage")


class ShardWriter:
    """Stream documents into shards of ``shard_size`` tokens, validation split first.

    Tokens go straight to the open file (the header is patched when a file is
    closed), so memory does not depend on ``shard_size``. A split change closes
    the current file: a shard never mixes splits. With ``sidecar`` every
    validation document brings its byte counts, written to the twin
    ``fineweb_val_bytes_*`` file in step with the tokens.
    """

    def __init__(self, dataset_dir: str | Path, shard_size: int, sidecar: bool = False):
        if not 0 < shard_size <= MAX_TOKENS:
            raise ShardError(f"shard_size must be in 1..{MAX_TOKENS}, got {shard_size}")
        self.dataset_dir = Path(dataset_dir)
        self.dataset_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.sidecar = sidecar
        self.stats = {split: {"documents": 0, "tokens": 0, "files": [], "file_tokens": []} for split in SPLITS}
        self._split = SPLITS[0]
        self._handles: list[BinaryIO] = []  # the open shard, then its sidecar when it has one
        self._filled = 0

    def add_document(self, split: str, tokens: np.ndarray | list[int], byte_counts: np.ndarray | None = None) -> None:
        """Append one document's ``[bos] + ids`` to ``split`` (and, into the sidecar, its ``byte_counts``)."""
        if split not in SPLITS:
            raise ShardError(f"unknown split {split!r}")
        if SPLITS.index(split) < SPLITS.index(self._split):
            raise ShardError(f"a {split} document after {self._split} documents: validation must come first")
        if split != self._split:
            self._close_file()
            self._split = split
        arrays = [as_token_array(tokens)]
        if self._has_sidecar(split):
            if byte_counts is None or len(byte_counts) != arrays[0].size:
                raise ShardError(f"a validation document of {arrays[0].size} tokens needs as many byte counts for the "
                                 f"sidecar, got {None if byte_counts is None else len(byte_counts)}")
            arrays.append(as_token_array(byte_counts))
        self.stats[split]["documents"] += 1
        self.stats[split]["tokens"] += arrays[0].size
        while arrays[0].size:
            if not self._handles:
                self._open_file()
            take = min(self.shard_size - self._filled, arrays[0].size)
            for handle, array in zip(self._handles, arrays, strict=True):
                handle.write(array[:take].tobytes())
            self._filled += take
            arrays = [array[take:] for array in arrays]
            if self._filled == self.shard_size:
                self._close_file()

    def _has_sidecar(self, split: str) -> bool:
        return self.sidecar and split == "val"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
            return
        for handle in self._handles:  # a failed run's dataset is discarded whole
            handle.close()
        self._handles = []

    def close(self) -> dict[str, dict]:
        """Finish the last file; return documents, tokens and file names per split."""
        self._close_file()
        return self.stats

    def _open_file(self) -> None:
        files = self.stats[self._split]["files"]
        index = len(files)
        files.append(shard_name(self._split, index))
        names = [files[-1], *([shard_name(SIDECAR, index)] if self._has_sidecar(self._split) else [])]
        self._handles = [open(self.dataset_dir / name, "wb") for name in names]
        for handle in self._handles:
            handle.write(shard_header(0))
        self._filled = 0

    def _close_file(self) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.seek(0)
            handle.write(shard_header(self._filled))
            handle.close()
        self.stats[self._split]["file_tokens"].append(self._filled)
        self._handles = []
