"""Building a tokenized dataset: documents (or published shards) -> shards + manifest.

The tokenize stage's work. From a documents file (or the embedded corpus) it
trains or reuses a SentencePiece tokenizer and streams every document through
it into challenge-format shards, using all cores and constant memory, leaving out
of the training split any document that is a validation document too (a corpus
may hold the same text twice; the train stage refuses such a leak,
``pgolf.data.leakage``); from published shards it validates them and links them
into place. Either way the
validation split passes the byte check of ``pgolf.data.tokenizer.ByteCheck`` and a
manifest records what went in and what came out.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pgolf.config import TokenizeConfig
from pgolf.data.corpus import CorpusError, iter_documents, write_embedded_corpus
from pgolf.data.shards import (
    HEADER_INTS,
    MAGIC,
    SPLITS,
    TOKEN_DTYPE,
    VERSION,
    ShardWriter,
    dataset_path,
    file_sha256,
    read_shard,
    shard_files,
    split_documents,
    validate_dataset,
)
from pgolf.data.tokenizer import (
    ByteCheck,
    byte_tables,
    load_tokenizer,
    model_settings,
    train_tokenizer,
    training_texts,
)
from pgolf.runtime import progress_bar

ENCODE_BATCH_DOCS = 1024  # documents per SentencePiece call: amortises threads, bounds memory
TRAINED = "the tokenizer trained on the documents"


def build_dataset(cfg: TokenizeConfig, model_file: Path, dataset_dir: Path) -> dict[str, Any]:
    """Write the tokenizer to ``model_file`` and the shards into ``dataset_dir``; return the manifest.

    ``cfg`` was validated when it was built (``TokenizeConfig.check``).
    """
    if cfg.shards_path:
        return import_shards(cfg, model_file, dataset_dir)
    return tokenize_documents(cfg, model_file, dataset_dir)


def encode_threads(cfg: TokenizeConfig) -> int:
    return cfg.num_workers or os.cpu_count() or 1


def tokenize_documents(cfg: TokenizeConfig, model_tmp: Path, dataset_tmp: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pgolf-tokenize-") as work:
        docs_path, embedded = documents_file(cfg, Path(work))
        label = cfg.docs_path or f"the embedded corpus ({cfg.embedded_corpus})"
        check_document_count(docs_path, label, cfg.num_val_docs)
        tokenizer = obtain_tokenizer(cfg, docs_path, model_tmp)
        sp = load_tokenizer(model_tmp, cfg.vocab_size)
        check = ByteCheck(sp, byte_tables(sp, cfg.vocab_size), tokenizer["source"], encode_threads(cfg))
        splits, source = encode_documents(cfg, docs_path, sp, check, dataset_tmp)
    source["embedded"] = embedded
    source["docs_path"] = cfg.docs_path or None
    return build_manifest(cfg, source, tokenizer, model_tmp, splits, check, shard_size=cfg.shard_size)


def documents_file(cfg: TokenizeConfig, work: Path) -> tuple[Path, dict[str, Any] | None]:
    """The configured documents file, or the embedded corpus written into ``work``."""
    if cfg.docs_path:
        path = Path(cfg.docs_path)
        if not path.is_file():
            raise CorpusError(f"params.yaml: tokenize.docs_path: {path}: documents file not found")
        return path, None
    path = work / "embedded_docs.jsonl"
    print(f"[pgolf tokenize] no docs_path: building the embedded corpus ({cfg.embedded_corpus})", flush=True)
    return path, write_embedded_corpus(path, cfg.embedded_max_docs, cfg.embedded_corpus)


def check_document_count(docs_path: Path, label: str, num_val_docs: int) -> None:
    """Refuse a documents file that leaves no training split, before any training.

    It reads at most ``num_val_docs + 1`` lines, however large the file.
    """
    documents = sum(1 for _ in itertools.islice(iter_documents(docs_path), num_val_docs + 1))
    if documents <= num_val_docs:
        raise CorpusError(
            f"{label}: {documents} documents, but num_val_docs is {num_val_docs}: the first num_val_docs documents "
            "are the validation split and at least one more is needed for training"
        )


def obtain_tokenizer(cfg: TokenizeConfig, docs_path: Path, model_tmp: Path) -> dict[str, Any]:
    """Train a tokenizer into ``model_tmp``, or copy the configured one there."""
    if cfg.tokenizer_path:
        load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)  # refuse a wrong one before any copying
        shutil.copyfile(cfg.tokenizer_path, model_tmp)
        return {"source": cfg.tokenizer_path, "trained": False, "train_documents": None}
    print(f"[pgolf tokenize] training a {cfg.vocab_size}-piece BPE tokenizer", flush=True)
    texts = training_texts(iter_documents(docs_path), cfg.tokenizer_train_docs)
    tally = {"documents": 0}  # the bar counts only on a terminal
    with progress_bar(desc="tokenizer text", unit=" docs", file=sys.stderr) as bar:
        model_tmp.write_bytes(train_tokenizer(counting(texts, bar, tally), cfg.vocab_size))
    return {"source": TRAINED, "trained": True, "train_documents": tally["documents"]}


def counting(texts: Iterator[str], bar: tqdm, tally: dict[str, int]) -> Iterator[str]:
    for text in texts:
        tally["documents"] += 1
        bar.update()
        yield text


def encode_documents(
    cfg: TokenizeConfig, docs_path: Path, sp: Any, check: ByteCheck, dataset_tmp: Path
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Stream documents -> ``[bos] + ids`` shards; validation documents also go through ``check``."""
    digest = hashlib.sha256()
    threads = encode_threads(cfg)
    progress = progress_bar(total=docs_path.stat().st_size, desc="encode", unit="B", unit_scale=True, file=sys.stderr)
    read = {"bytes": 0}  # the bar counts only on a terminal

    def on_line(line: bytes) -> None:
        digest.update(line)
        read["bytes"] += len(line)
        progress.update(len(line))

    index, val_digests, dropped = 0, set(), 0
    with progress, ShardWriter(dataset_tmp, cfg.shard_size) as writer:
        for texts in batched(iter_documents(docs_path, on_line), ENCODE_BATCH_DOCS):
            encoded = sp.encode(texts, out_type=int, num_threads=threads)
            val_count = max(0, min(len(encoded), cfg.num_val_docs - index))
            check.add(encoded[:val_count])
            for offset, ids in enumerate(encoded):
                document = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)  # [1 + n]
                document[0] = sp.bos_id()
                document[1:] = ids
                key = hashlib.sha256(document.tobytes()).digest()
                if offset < val_count:
                    val_digests.add(key)
                    writer.add_document("val", document)
                elif key in val_digests:
                    dropped += 1
                else:
                    writer.add_document("train", document)
            index += len(encoded)
    source = {"sha256": digest.hexdigest(), "bytes": read["bytes"], "documents": index}
    if dropped:  # recorded only when it happened: a clean corpus keeps the manifest it always had
        print(f"[pgolf tokenize] left {dropped} training document(s) out: each is also a validation document",
              flush=True)
        source["val_duplicates_left_out_of_train"] = dropped
    return writer.stats, source


def batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def import_shards(cfg: TokenizeConfig, model_tmp: Path, dataset_tmp: Path) -> dict[str, Any]:
    """Validate published shards and their tokenizer, then link both into the output layout."""
    source_dir = Path(cfg.shards_path)
    sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    splits = validate_dataset(source_dir, cfg.vocab_size, sp.bos_id())
    check = ByteCheck(sp, byte_tables(sp, cfg.vocab_size), cfg.tokenizer_path, encode_threads(cfg))
    val_tokens = np.concatenate([read_shard(path) for path in shard_files(source_dir, "val")])  # [n]
    documents = split_documents(val_tokens, sp.bos_id(), source_dir)
    batches = range(0, len(documents), ENCODE_BATCH_DOCS)
    for start in progress_bar(batches, desc="byte check", unit=" batches", file=sys.stderr):
        check.add([doc.tolist() for doc in documents[start : start + ENCODE_BATCH_DOCS]])
    hashes = {}
    for name in progress_bar([name for split in SPLITS for name in splits[split]["files"]], desc="link", file=sys.stderr):
        hashes[name] = file_sha256(source_dir / name)
        link_or_copy(source_dir / name, dataset_tmp / name)
    shutil.copyfile(cfg.tokenizer_path, model_tmp)
    tokenizer = {"source": cfg.tokenizer_path, "trained": False, "train_documents": None}
    source = {"shards_path": str(source_dir), "sha256": hashes}
    return build_manifest(cfg, source, tokenizer, model_tmp, splits, check, shard_size=None)


def build_manifest(
    cfg: TokenizeConfig,
    source: dict[str, Any],
    tokenizer: dict[str, Any],
    model_file: Path,
    splits: dict[str, dict],
    check: ByteCheck,
    shard_size: int | None,
) -> dict[str, Any]:
    return {
        "dataset": dataset_path(cfg.data_dir, cfg.vocab_size).name,
        "vocab_size": cfg.vocab_size,
        "num_val_docs": splits["val"]["documents"],
        "shard_size": shard_size,
        "format": {"magic": MAGIC, "version": VERSION, "header_int32s": HEADER_INTS, "token_dtype": "<u2"},
        "input": source,
        "tokenizer": {**tokenizer, "sha256": file_sha256(model_file), "settings": model_settings(model_file)},
        "splits": splits,
        "byte_check": check.summary(),
    }


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link ``source`` (no extra space, no copy time); copy across file systems."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
