"""Building a tokenized dataset: documents (or published shards) -> shards + manifest.

The tokenize stage's work. From a documents file (or the embedded corpus) it
trains or reuses a SentencePiece tokenizer and streams every document through
it into challenge-format shards, using all cores and constant memory, leaving out
of the training split any document that is a validation document too (a corpus
may hold the same text twice; the train stage refuses such a leak,
``pgolf.data.leakage``); from published shards it validates them and links them
into place. Either way the validation split passes a byte check and a manifest
records what went in and what came out. Plain text is checked by
``pgolf.data.tokenizer.ByteCheck`` (the lookup tables against the decoded text);
CaseOps text (``text_transform: caseops``) gets a byte sidecar, each validation
document's counts summing to its original UTF-8 bytes (``SidecarCheck``;
docs/BYTES.md).
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
from pgolf.data.caseops import ESC, MARKERS, encode_caseops, original_byte_counts
from pgolf.data.corpus import CorpusError, iter_documents, write_embedded_corpus
from pgolf.data.shards import (
    HEADER_INTS,
    MAGIC,
    SIDECAR,
    SPLITS,
    TOKEN_DTYPE,
    VERSION,
    ShardError,
    ShardWriter,
    check_sidecar,
    dataset_path,
    file_sha256,
    read_shard,
    shard_files,
    shard_name,
    split_documents,
    validate_dataset,
)
from pgolf.data.tokenizer import (
    ByteCheck,
    TokenizerError,
    byte_tables,
    check_reserved_markers,
    encode_with_surfaces,
    load_tokenizer,
    marker_pieces,
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
        check_transform(sp, cfg, tokenizer["source"])
        check = (SidecarCheck(tokenizer["source"]) if cfg.text_transform == "caseops"
                 else ByteCheck(sp, byte_tables(sp, cfg.vocab_size), tokenizer["source"], encode_threads(cfg)))
        splits, source = encode_documents(cfg, docs_path, sp, check, dataset_tmp)
    source["embedded"] = embedded
    source["docs_path"] = cfg.docs_path or None
    return build_manifest(cfg, source, tokenizer, model_tmp, splits, check.summary(), shard_size=cfg.shard_size,
                          dataset_dir=dataset_tmp)


def check_transform(sp: Any, cfg: TokenizeConfig, source: str | Path) -> None:
    """The tokenizer fits ``text_transform``: CaseOps markers reserved as ids 4..7 for caseops, none otherwise."""
    if cfg.text_transform == "caseops":
        check_reserved_markers(sp, source)
        return
    markers = marker_pieces(sp)
    if markers:
        raise TokenizerError(f"{source}: pieces {markers[:4]} hold CaseOps markers, but tokenize.text_transform is "
                             "none: set it to caseops (the shards then carry the byte sidecar its scores need)")


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
    reserved: tuple[str, ...] = ()
    if cfg.text_transform == "caseops":  # the record's recipe: transform the selected text, reserve the markers
        texts, reserved = map(encode_caseops, texts), MARKERS
    tally = {"documents": 0}  # the bar counts only on a terminal
    with progress_bar(desc="tokenizer text", unit=" docs", file=sys.stderr) as bar:
        model_tmp.write_bytes(train_tokenizer(counting(texts, bar, tally), cfg.vocab_size, reserved))
    return {"source": TRAINED, "trained": True, "train_documents": tally["documents"]}


def counting(texts: Iterator[str], bar: tqdm, tally: dict[str, int]) -> Iterator[str]:
    for text in texts:
        tally["documents"] += 1
        bar.update()
        yield text


def encode_documents(
    cfg: TokenizeConfig, docs_path: Path, sp: Any, check: ByteCheck | SidecarCheck, dataset_tmp: Path
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Stream documents -> ``[bos] + ids`` shards; validation documents also go through ``check``.

    With the CaseOps transform every document is transformed first, and each validation
    document's byte counts (0 for its BOS) go to the sidecar in step with its tokens.
    """
    digest = hashlib.sha256()
    threads = encode_threads(cfg)
    progress = progress_bar(total=docs_path.stat().st_size, desc="encode", unit="B", unit_scale=True, file=sys.stderr)
    read = {"bytes": 0}  # the bar counts only on a terminal

    def on_line(line: bytes) -> None:
        digest.update(line)
        read["bytes"] += len(line)
        progress.update(len(line))

    index, val_digests, dropped = 0, set(), 0
    caseops = cfg.text_transform == "caseops"
    with progress, ShardWriter(dataset_tmp, cfg.shard_size, sidecar=caseops) as writer:
        for texts in batched(iter_documents(docs_path, on_line), ENCODE_BATCH_DOCS):
            val_count = max(0, min(len(texts), cfg.num_val_docs - index))
            if caseops:
                transformed = [encode_caseops(text) for text in texts]
                pieces = encode_with_surfaces(sp, transformed[:val_count], threads)
                byte_counts = check.add(texts[:val_count], transformed[:val_count], pieces)
                encoded = [ids for ids, _ in pieces] + sp.encode(transformed[val_count:], out_type=int,
                                                                 num_threads=threads)
            else:
                encoded = sp.encode(texts, out_type=int, num_threads=threads)
                check.add(encoded[:val_count])
            for offset, ids in enumerate(encoded):
                document = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)  # [1 + n]
                document[0] = sp.bos_id()
                document[1:] = ids
                key = hashlib.sha256(document.tobytes()).digest()
                if offset < val_count:
                    val_digests.add(key)
                    counts = np.array([0, *byte_counts[offset]]) if caseops else None  # [1 + n]
                    writer.add_document("val", document, counts)
                elif key in val_digests:
                    dropped += 1
                else:
                    writer.add_document("train", document)
            index += len(texts)
    source = {"sha256": digest.hexdigest(), "bytes": read["bytes"], "documents": index}
    if dropped:  # recorded only when it happened: a clean corpus keeps the manifest it always had
        print(f"[pgolf tokenize] left {dropped} training document(s) out: each is also a validation document",
              flush=True)
        source["val_duplicates_left_out_of_train"] = dropped
    return writer.stats, source


class SidecarCheck:
    """Running check, document by document, that the byte sidecar counts each document's original bytes.

    A document's counts (``original_byte_counts`` of its pieces' surfaces) must sum to its
    UTF-8 length less the whitespace at its two ends: SentencePiece's normaliser drops that,
    so no piece covers it and no token predicts it (docs/BYTES.md). pgolf counts, as the
    record does, what the pieces cover; the plain lookup tables do not count edge whitespace
    either. Anything else uncovered, or a sum that differs, is an error naming the document.
    """

    def __init__(self, tokenizer: str | Path):
        self.tokenizer = tokenizer
        self.documents = self.sidecar_bytes = self.text_bytes = self.uncovered_bytes = 0

    def add(self, texts: list[str], transformed: list[str], pieces: list[tuple[list[int], list[str]]]
            ) -> list[list[int]]:
        """Check the next validation documents (original, transformed, (ids, surfaces)); their byte counts."""
        counts = []
        for text, shown, (_, surfaces) in zip(texts, transformed, pieces, strict=True):
            self.documents += 1
            document_counts = original_byte_counts(surfaces)
            uncovered = len(edge_whitespace(shown, surfaces, self.where()).encode("utf-8"))
            expected = len(text.encode("utf-8")) - uncovered
            if sum(document_counts) != expected:
                raise TokenizerError(f"{self.where()}: the byte sidecar counts {sum(document_counts)} bytes but the "
                                     f"document has {expected} (and {uncovered} of whitespace at its ends)")
            self.sidecar_bytes += expected
            self.text_bytes += expected + uncovered
            self.uncovered_bytes += uncovered
            counts.append(document_counts)
        return counts

    def where(self) -> str:
        return f"{self.tokenizer}: validation document {self.documents}"

    def summary(self) -> dict[str, int | bool | str]:
        return {"rule": "byte sidecar", "val_bytes": self.sidecar_bytes, "documents": self.documents,
                "text_bytes": self.text_bytes, "uncovered_bytes": self.uncovered_bytes, "agree": True}


def edge_whitespace(text: str, surfaces: list[str], where: str) -> str:
    """What of ``text`` no piece covers; only whitespace at its two ends may be (else ``TokenizerError``)."""
    covered = "".join(surfaces)
    start = text.find(covered)
    head, tail = text[:start], text[start + len(covered):]
    if start < 0 or not (head.isspace() or not head) or not (tail.isspace() or not tail):
        raise TokenizerError(f"{where}: its pieces do not cover its text (only whitespace at the two ends may be "
                             "left out): the byte sidecar could not count it")
    return head + tail


def check_marker_bytes(tokens: np.ndarray, counts: np.ndarray, source: Path) -> None:
    """CaseOps markers stand for no original byte; a marker right after an ESC is literal text (its 3 bytes)."""
    esc = 4 + MARKERS.index(ESC)
    is_marker = (tokens >= 4) & (tokens < 4 + len(MARKERS))  # [n]
    literal = np.zeros_like(is_marker)  # [n]
    for position in np.flatnonzero(tokens == esc):  # ESCs are rare: the loop is short
        if not literal[position] and position + 1 < tokens.size and is_marker[position + 1]:
            literal[position + 1] = True
    bad = np.flatnonzero(is_marker & (counts != np.where(literal, 3, 0)))
    if bad.size:
        position = int(bad[0])
        raise ShardError(f"{source}: {int(counts[position])} bytes at position {position} for marker id "
                         f"{int(tokens[position])}: a byte sidecar gives markers 0 (3 for a literal after ESC)")


def batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def import_shards(cfg: TokenizeConfig, model_tmp: Path, dataset_tmp: Path) -> dict[str, Any]:
    """Validate published shards (and their byte sidecar) and their tokenizer, then link all into the output layout."""
    source_dir = Path(cfg.shards_path)
    sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    check_transform(sp, cfg, cfg.tokenizer_path)
    splits = validate_dataset(source_dir, cfg.vocab_size, sp.bos_id())
    val_tokens = np.concatenate([read_shard(path) for path in shard_files(source_dir, "val")])  # [n]
    sidecar = check_sidecar(source_dir, sp.bos_id())
    if cfg.text_transform == "caseops":
        byte_check = imported_sidecar_check(source_dir, val_tokens, sidecar, splits["val"]["documents"])
    elif sidecar:
        raise ShardError(f"{source_dir / sidecar['files'][0]}: a byte sidecar beside shards that "
                         "tokenize.text_transform declares plain (none); set it to caseops if they are CaseOps text")
    else:
        byte_check = lookup_check(cfg, sp, val_tokens, source_dir)
    hashes = {}
    names = [*(name for split in SPLITS for name in splits[split]["files"]), *sidecar.get("files", [])]
    for name in progress_bar(names, desc="link", file=sys.stderr):
        hashes[name] = file_sha256(source_dir / name)
        link_or_copy(source_dir / name, dataset_tmp / name)
    shutil.copyfile(cfg.tokenizer_path, model_tmp)
    tokenizer = {"source": cfg.tokenizer_path, "trained": False, "train_documents": None}
    source = {"shards_path": str(source_dir), "sha256": hashes}
    return build_manifest(cfg, source, tokenizer, model_tmp, splits, byte_check, shard_size=None,
                          dataset_dir=dataset_tmp)


def lookup_check(cfg: TokenizeConfig, sp: Any, val_tokens: np.ndarray, source_dir: Path) -> dict[str, Any]:
    """``ByteCheck`` over every validation document of published plain shards; its summary."""
    check = ByteCheck(sp, byte_tables(sp, cfg.vocab_size), cfg.tokenizer_path, encode_threads(cfg))
    documents = split_documents(val_tokens, sp.bos_id(), source_dir)
    batches = range(0, len(documents), ENCODE_BATCH_DOCS)
    for start in progress_bar(batches, desc="byte check", unit=" batches", file=sys.stderr):
        check.add([doc.tolist() for doc in documents[start : start + ENCODE_BATCH_DOCS]])
    return check.summary()


def imported_sidecar_check(source_dir: Path, val_tokens: np.ndarray, sidecar: dict, documents: int) -> dict[str, Any]:
    """Published CaseOps shards: their sidecar is there (lengths and BOS entries checked) and counts markers as 0."""
    if not sidecar:
        raise ShardError(f"{source_dir / shard_name(SIDECAR, 0)}: byte sidecar not found: CaseOps shards are "
                         "scored in original bytes, which only their sidecar gives (download it with the shards)")
    counts = np.concatenate([read_shard(path) for path in shard_files(source_dir, SIDECAR)])  # [n]
    check_marker_bytes(val_tokens, counts, source_dir / sidecar["files"][0])
    return {"rule": "byte sidecar", "val_bytes": sidecar["bytes"], "documents": documents, "agree": True}


def build_manifest(
    cfg: TokenizeConfig,
    source: dict[str, Any],
    tokenizer: dict[str, Any],
    model_file: Path,
    splits: dict[str, dict],
    byte_check: dict[str, Any],
    shard_size: int | None,
    dataset_dir: Path,
) -> dict[str, Any]:
    """What went in and came out; the byte sidecar in ``dataset_dir`` (if any) is read, checked and hashed."""
    return {
        "dataset": dataset_path(cfg.data_dir, cfg.vocab_size).name,
        "vocab_size": cfg.vocab_size,
        "num_val_docs": splits["val"]["documents"],
        "shard_size": shard_size,
        "format": {"magic": MAGIC, "version": VERSION, "header_int32s": HEADER_INTS, "token_dtype": "<u2"},
        "input": source,
        "tokenizer": {**tokenizer, "sha256": file_sha256(model_file), "settings": model_settings(model_file)},
        "text_transform": cfg.text_transform,
        "splits": splits,
        "sidecar": check_sidecar(dataset_dir) or None,
        "byte_check": byte_check,
    }


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link ``source`` (no extra space, no copy time); copy across file systems."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
