"""SentencePiece tokenizers: the challenge's training recipe, loading checks and byte accounting.

Bits per byte divides a model's loss by the UTF-8 bytes of the text it
predicted. Those bytes come from per-id lookup tables (docs/DESIGN.md §2):
a piece's own bytes, plus one for its leading "▁" unless the previous token is
a boundary (BOS and the other control ids). ``document_byte_counts`` checks the
tables against the decoded text of each document, because a table that
miscounts silently inflates or deflates every score. Those tables count the
text the tokenizer saw; for transformed text (CaseOps) that is not the
original, so a tokenizer whose pieces hold the transform's markers is scored
from a byte sidecar instead (``marker_pieces``; pgolf.data.accounting).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from pgolf.data.caseops import MARKERS

SPACE_PIECE = "\u2581"  # SentencePiece's visible space, "▁"
# The challenge's trainer settings (docs/DESIGN.md §1).
TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained, loaded or trusted for byte counting."""


def tokenizer_file(data_dir: str | Path, vocab_size: int) -> Path:
    """Where the challenge's layout keeps the tokenizer of a vocab size."""
    return Path(data_dir) / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"


def training_texts(texts: Iterable[str], max_docs: int) -> Iterator[str]:
    """The challenge's training text: the first ``max_docs`` documents, NUL -> space, stripped, empty ones skipped."""
    for index, text in enumerate(texts):
        if index >= max_docs:
            return
        text = text.replace("\x00", " ").strip()
        if text:
            yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int, reserved: tuple[str, ...] = ()) -> bytes:
    """Train a BPE tokenizer with ``TRAINER_SETTINGS`` on ``texts``; return the ``.model`` bytes.

    ``texts`` are used as given (``training_texts`` makes the challenge's
    selection). ``reserved`` symbols (CaseOps: its four markers) become
    user-defined pieces right after the control ids, each always a token of its
    own. The model is built in memory, so no output path (which SentencePiece
    would record in the file) makes two runs differ.
    """
    failures: list[BaseException] = []

    def guarded() -> Iterator[str]:
        # SentencePiece turns an exception raised by the iterator into a bare
        # RuntimeError; keep the original so the user sees which file and line.
        try:
            yield from texts
        except BaseException as exc:
            failures.append(exc)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_writer=model,
            vocab_size=vocab_size,
            minloglevel=1,  # warnings only: the merge log is thousands of lines
            **TRAINER_SETTINGS,
            **({"user_defined_symbols": list(reserved)} if reserved else {}),
        )
    except RuntimeError as exc:
        if failures:
            raise failures[0] from None
        raise TokenizerError(f"SentencePiece training failed ({vocab_size} pieces): {exc}") from None
    return model.getvalue()


def load_tokenizer(path: str | Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """Load a ``.model`` and check what the pipeline relies on: vocab size, "▁" piece, BOS id."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(f"{path}: not a SentencePiece model ({exc})") from None
    if sp.vocab_size() != vocab_size:
        raise TokenizerError(f"{path}: tokenizer has {sp.vocab_size()} pieces but vocab_size is {vocab_size}")
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise TokenizerError(
            f"{path}: tokenizer has no \"{SPACE_PIECE}\" piece of its own; bits-per-byte counting needs it"
        )
    if sp.bos_id() < 0:
        raise TokenizerError(f"{path}: tokenizer has no BOS id; every document starts with one")
    return sp


def marker_pieces(sp: spm.SentencePieceProcessor) -> list[int]:
    """Ids of the pieces that hold a CaseOps marker: such a tokenizer's byte tables count no original text."""
    return [token_id for token_id in range(sp.vocab_size())
            if not sp.is_control(token_id) and any(marker in sp.id_to_piece(token_id) for marker in MARKERS)]


def check_reserved_markers(sp: spm.SentencePieceProcessor, path: str | Path) -> None:
    """A CaseOps tokenizer: the four markers are ids 4..7 (as the record's), each a user-defined piece."""
    ids = [sp.piece_to_id(marker) for marker in MARKERS]
    if ids != list(range(4, 4 + len(MARKERS))):
        raise TokenizerError(f"{path}: a CaseOps tokenizer keeps its markers U+E001..U+E004 as ids 4..7, "
                             f"this one as {ids} (3 = unknown)")


def encode_with_surfaces(
    sp: spm.SentencePieceProcessor, texts: list[str], num_threads: int
) -> list[tuple[list[int], list[str]]]:
    """Per text its ids and each piece's surface (the fragment of the text, before normalising, it covers)."""
    encoded = sp.encode(texts, return_type="proto", num_threads=num_threads)
    return [([piece.id for piece in proto.pieces], [piece.surface for piece in proto.pieces]) for proto in encoded]


@dataclass(frozen=True)
class ByteTables:
    """Per-id lookup tables of docs/DESIGN.md §2 (each of length max(vocab, pieces))."""

    base_bytes: torch.Tensor  # [V] int16: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: torch.Tensor  # [V] bool: the piece starts with "▁"
    is_boundary: torch.Tensor  # [V] bool: control, unknown and unused ids (no bytes, no space after)

    def to(self, device: torch.device | str) -> ByteTables:
        return ByteTables(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))


def byte_tables(sp: spm.SentencePieceProcessor | str | Path, vocab_size: int) -> ByteTables:
    """The byte-counting tables of a tokenizer (a processor or a ``.model`` path)."""
    if not isinstance(sp, spm.SentencePieceProcessor):
        sp = load_tokenizer(sp, vocab_size)
    size = max(sp.vocab_size(), vocab_size)
    base_bytes = np.zeros(size, dtype=np.int16)
    has_leading_space = np.zeros(size, dtype=np.bool_)
    is_boundary = np.ones(size, dtype=np.bool_)
    for token_id in range(sp.vocab_size()):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        is_boundary[token_id] = False
        if sp.is_byte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith(SPACE_PIECE):
            has_leading_space[token_id] = True
            piece = piece[len(SPACE_PIECE) :]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return ByteTables(
        torch.from_numpy(base_bytes), torch.from_numpy(has_leading_space), torch.from_numpy(is_boundary)
    )


def count_bytes(prev_ids: torch.Tensor, target_ids: torch.Tensor, tables: ByteTables) -> torch.Tensor:
    """UTF-8 bytes of each predicted token ``target_ids`` after ``prev_ids`` (same shape, int16)."""
    leading_space = tables.has_leading_space[target_ids] & ~tables.is_boundary[prev_ids]
    return tables.base_bytes[target_ids] + leading_space.to(torch.int16)


def document_byte_counts(
    sp: spm.SentencePieceProcessor, tables: ByteTables, documents: list[list[int]], num_threads: int
) -> tuple[list[int], list[int]]:
    """Per document ``ids`` (without its BOS): table bytes and UTF-8 bytes of ``sp.decode(ids)``.

    Each document is scored as in a shard, after its BOS, so its first token
    gets no leading-space byte. The decoded text is the normalised text the
    tokenizer saw (NFKC, whitespace runs collapsed, no leading space); the two
    counts agree for a tokenizer that bits per byte can trust.
    """
    if not documents:
        return [], []
    bos = sp.bos_id()
    stream = torch.tensor([t for ids in documents for t in (bos, *ids)], dtype=torch.int64)  # [N]
    per_token = torch.zeros_like(stream)  # [N]: bytes of each position as a target; BOS targets count 0
    per_token[1:] = count_bytes(stream[:-1], stream[1:], tables)
    starts = np.cumsum([0] + [len(ids) + 1 for ids in documents[:-1]])  # [D]: position of each BOS
    table_counts = np.add.reduceat(per_token.numpy(), starts)  # [D]
    decoded = sp.decode(documents, num_threads=num_threads)
    return table_counts.tolist(), [len(text.encode("utf-8")) for text in decoded]


class ByteCheck:
    """Running check, document by document, that table bytes equal decoded UTF-8 bytes.

    The first document that disagrees is an error naming the tokenizer: its
    bits per byte would be wrong.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, tables: ByteTables, tokenizer: str | Path, num_threads: int):
        self.sp, self.tables, self.tokenizer, self.num_threads = sp, tables, tokenizer, num_threads
        self.documents = self.table_bytes = self.decoded_bytes = 0

    def add(self, documents: list[list[int]]) -> None:
        """Check the next validation documents (ids without BOS, in split order)."""
        table, decoded = document_byte_counts(self.sp, self.tables, documents, self.num_threads)
        for offset, (table_count, decoded_count) in enumerate(zip(table, decoded, strict=True)):
            if table_count != decoded_count:
                number = self.documents + offset + 1
                raise TokenizerError(
                    f"{self.tokenizer}: validation document {number}: the byte tables count {table_count} bytes "
                    f"but its decoded text has {decoded_count}; bits per byte would be miscounted with this tokenizer"
                )
        self.documents += len(documents)
        self.table_bytes += sum(table)
        self.decoded_bytes += sum(decoded)

    def summary(self) -> dict[str, int | bool | str]:
        return {
            "rule": "lookup tables",
            "val_bytes": self.table_bytes,
            "documents": self.documents,
            "table_bytes": self.table_bytes,
            "decoded_bytes": self.decoded_bytes,
            "agree": self.table_bytes == self.decoded_bytes,
        }


# Trainer fields of sentencepiece_model.proto that the challenge's recipe sets.
_TRAINER_KEYS = ("vocab_size", "character_coverage", "byte_fallback", "split_digits", "pad_id", "bos_id",
                 "eos_id", "unk_id", "hard_vocab_limit")


def model_settings(path: str | Path) -> dict[str, object]:
    """The trainer and normaliser settings stored in a ``.model`` file (keys of ``TRAINER_SETTINGS``)."""
    path = Path(path)
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise TokenizerError(f"{path}: cannot read the settings of this SentencePiece model ({exc})") from None
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    settings: dict[str, object] = {key: getattr(trainer, key) for key in _TRAINER_KEYS}
    settings["character_coverage"] = round(trainer.character_coverage, 6)  # stored as float32
    settings["model_type"] = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type).lower()
    settings["normalization_rule_name"] = normalizer.name
    settings["add_dummy_prefix"] = normalizer.add_dummy_prefix
    return settings
