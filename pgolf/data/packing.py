"""Segment boundaries of document-packed rows (PR #1855, docs/FRONTIER.md).

A packed row holds whole documents back to back, each starting at a BOS; attention must stay
inside a document, and inside pieces of at most ``max_segment`` tokens of it. ``cu_seqlens``
lists where each such segment starts, then the row's length, padded with the row's length to a
multiple of ``bucket`` entries so that a compiled model sees few distinct shapes. The training
loader, the evaluation of packed rows and the global phases of test-time training build them
here, so every path cuts documents the same way.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor

from pgolf.data.shards import BOS_ID

CU_BUCKET = 64  # the record's padding of cu_seqlens (PR #1855)


def build_cu_seqlens(doc_starts: list[int], length: int, max_segment: int = 0,
                     bucket: int = CU_BUCKET) -> tuple[Tensor, int]:
    """(cu_seqlens [S] int32, the longest segment) of a row of ``length`` tokens.

    ``doc_starts``: the offsets where documents start (the BOS positions); a row that does not
    start with one starts with a piece of a document all the same. Each document is cut into
    segments of ``max_segment`` tokens from its start (0: uncut).
    """
    starts = doc_starts if doc_starts and doc_starts[0] == 0 else [0, *doc_starts]
    segments = []
    for start, end in zip(starts, [*starts[1:], length]):
        step = max_segment if max_segment > 0 else max(end - start, 1)
        segments.extend(range(start, end, step))
    bounds = [*segments, length]
    padded = -(-len(bounds) // bucket) * bucket
    cu_seqlens = torch.full((padded,), length, dtype=torch.int32)
    cu_seqlens[: len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
    return cu_seqlens, max(end - start for start, end in pairwise(bounds))


def row_cu_seqlens(row: Tensor, max_segment: int, bucket: int = CU_BUCKET) -> Tensor:
    """cu_seqlens [S] of one packed row of token ids [T], its documents found at their BOS."""
    doc_starts = (row == BOS_ID).nonzero().flatten().tolist()
    return build_cu_seqlens(doc_starts, row.numel(), max_segment, bucket)[0].to(row.device)
