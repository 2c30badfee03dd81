"""Byte accounting: the validation stream with the original UTF-8 bytes of every target.

Bits per byte divides a model's loss by the bytes of the text it predicted (docs/BYTES.md).
Every score in pgolf (evaluate plain and sliding, prequant, the quantization tax, every TTT
method, training's validation, the exported script) reads those bytes from one place, a
``ValidationStream``: the tokens and, for target ``tokens[i + 1]``, ``target_bytes[i]``.
The bytes come from one of two rules, chosen by the data, never by the caller:
- plain text: the lookup tables of docs/DESIGN.md §2 (a piece's bytes, plus its leading space
  unless the previous token is a boundary), which the tokenize stage checked against the text;
- transformed text (CaseOps): the byte sidecar the shards carry, the bytes of the original
  text. A tokenizer whose pieces hold the transform's markers, or data declared
  transformed, without a sidecar is refused: its tables would count marker bytes and
  lower-cased text, and the score would be silently too low.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pgolf.data.shards import (
    MANIFEST_NAME,
    SIDECAR,
    ShardError,
    load_validation_bytes,
    load_validation_tokens,
    shard_files,
    shard_name,
)
from pgolf.data.tokenizer import ByteTables, byte_tables, count_bytes, load_tokenizer, marker_pieces


@dataclass(frozen=True)
class ValidationStream:
    """Validation tokens and the original UTF-8 bytes each target stands for."""

    tokens: Tensor  # [N] int64
    target_bytes: Tensor  # [N - 1] int32: bytes of target tokens[i + 1] (0 for a BOS)
    rule: str  # "lookup tables" or "byte sidecar": how target_bytes were counted

    def __post_init__(self) -> None:
        if self.target_bytes.shape != (self.tokens.numel() - 1,):
            raise ValueError(f"{self.rule}: {tuple(self.target_bytes.shape)} byte counts for "
                             f"{self.tokens.numel() - 1} targets")

    def to(self, device: torch.device | str) -> ValidationStream:
        return ValidationStream(self.tokens.to(device=device, dtype=torch.int64), self.target_bytes.to(device),
                                self.rule)

    def total_bytes(self) -> int:
        return int(self.target_bytes.sum(dtype=torch.int64))


def lookup_stream(tokens: Tensor, tables: ByteTables) -> ValidationStream:
    """Plain text: each target's bytes by the lookup tables, after the token before it."""
    target_bytes = count_bytes(tokens[:-1], tokens[1:], tables.to(tokens.device)).to(torch.int32)  # [N - 1]
    return ValidationStream(tokens, target_bytes, "lookup tables")


def sidecar_stream(tokens: Tensor, sidecar: Tensor) -> ValidationStream:
    """Transformed text: each target's bytes from the sidecar entry at its position (``sidecar`` [N])."""
    return ValidationStream(tokens, sidecar[1:].to(torch.int32), "byte sidecar")


def load_validation_stream(
    dataset_dir: str | Path, tokenizer_path: str | Path, vocab_size: int, seq_len: int, max_tokens: int = 0
) -> ValidationStream:
    """The validation tokens cut to whole ``seq_len`` windows, with their bytes by the data's rule.

    A dataset with a byte sidecar is scored from it; one without must be plain text: data
    its manifest declares transformed, or a tokenizer holding CaseOps markers, is refused
    naming the missing sidecar file.
    """
    dataset_dir = Path(dataset_dir)
    tokens = load_validation_tokens(dataset_dir, seq_len, max_tokens)  # [N]
    if shard_files(dataset_dir, SIDECAR):
        return sidecar_stream(tokens, load_validation_bytes(dataset_dir, tokens.numel()))
    missing = dataset_dir / shard_name(SIDECAR, 0)
    transform = declared_transform(dataset_dir)
    if transform != "none":
        raise ShardError(f"{missing}: byte sidecar not found, but {dataset_dir / MANIFEST_NAME} declares "
                         f"{transform} text: its scores must count the original bytes")
    sp = load_tokenizer(tokenizer_path, vocab_size)
    markers = marker_pieces(sp)
    if markers:
        raise ShardError(f"{missing}: byte sidecar not found, but {tokenizer_path} holds CaseOps markers (ids "
                         f"{markers[:4]}): its lookup tables would count marker bytes, not the original text")
    return lookup_stream(tokens, byte_tables(sp, vocab_size))


def declared_transform(dataset_dir: Path) -> str:
    """The ``text_transform`` the dataset's manifest records (``none`` without a manifest or the key)."""
    path = dataset_dir / MANIFEST_NAME
    if not path.is_file():
        return "none"
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("text_transform", "none"))
    except (ValueError, AttributeError) as exc:
        raise ShardError(f"{path}: not a pgolf dataset manifest ({exc})") from None
