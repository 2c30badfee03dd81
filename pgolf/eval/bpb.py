"""Bits per byte of a model over windows of the validation stream: what every score shares.

Both evaluations score windows of ``seq_len`` tokens of the validation stream. The plain one
cuts the stream into consecutive non-overlapping windows and scores every token; the sliding
one starts a window every ``stride`` tokens, so each token after the first window is scored
with ``seq_len - stride`` tokens of context. Losses, token and byte counts are summed in
float64, and bpb follows docs/DESIGN.md §2: ``(nll_sum / tokens) / ln 2 * tokens / bytes``, each
scored target's bytes read from the ``ValidationStream`` (pgolf/data/accounting.py: lookup
tables for plain text, the byte sidecar for CaseOps text). Given a ``DistContext`` of several
processes, each scores a contiguous share of the windows and the sums are all-reduced, so N
GPUs give the one-process score in 1/N of the time. Training's validation curve, the stages'
scores and TTT's scoring pass all go through here; the stages' reporting (pgolf.eval.score)
does not, so changing it re-trains nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pgolf.data.accounting import ValidationStream
from pgolf.distributed import DistContext
from pgolf.model.gpt import GPT
from pgolf.runtime import autocast, progress_bar


class EvalScore(NamedTuple):
    """Mean negative log-likelihood per token (nats) and bits per byte."""

    loss: float
    bpb: float

class Window(NamedTuple):
    """``seq_len`` tokens from ``start``; predictions from position ``score_from`` on are scored."""

    start: int
    score_from: int

def plain_windows(num_tokens: int, seq_len: int) -> list[Window]:
    """Consecutive windows covering the first ``(num_tokens - 1) // seq_len`` full sequences."""
    return [Window(i * seq_len, 0) for i in range((num_tokens - 1) // seq_len)]

def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """A window every ``stride`` tokens while ``start + seq_len - stride < num_tokens - 1``.

    The first window scores all of its predictions, each later one its last ``stride``.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"eval stride must be in 1..{seq_len} (the sequence length), got {stride}")
    context = seq_len - stride
    targets = num_tokens - 1
    starts = [start for start in range(0, targets, stride) if start + context < targets]
    return [Window(start, 0 if start == 0 else context) for start in starts]

def eval_plain(
    model: GPT, stream: ValidationStream, seq_len: int, batch_seqs: int, device: torch.device,
    compile_model: bool = False, ctx: DistContext | None = None, temperature: float = 1.0,
) -> EvalScore:
    """Loss and bpb over consecutive non-overlapping windows of ``seq_len``."""
    windows = plain_windows(stream.tokens.numel(), seq_len)
    return score_windows(model, stream, windows, seq_len, batch_seqs, device, "eval plain",
                         compile_model, ctx, temperature)

def eval_sliding(
    model: GPT, stream: ValidationStream, seq_len: int, stride: int, batch_seqs: int,
    device: torch.device, compile_model: bool = False, ctx: DistContext | None = None, temperature: float = 1.0,
) -> EvalScore:
    """Loss and bpb with a window every ``stride`` tokens, each scoring only its new tokens."""
    windows = sliding_windows(stream.tokens.numel(), seq_len, stride)
    return score_windows(model, stream, windows, seq_len, batch_seqs, device, "eval sliding",
                         compile_model, ctx, temperature)

def padded(batch: list[Window], batch_seqs: int, seq_len: int) -> list[Window]:
    """``batch`` filled up to ``batch_seqs`` windows with copies of its last that score nothing
    (``score_from = seq_len``): a forward compiled for fixed shapes then compiles no graph of its
    own for a shorter last batch (about half a minute per graph on an H200: docs/RESULTS.md, "GPU")."""
    return batch + [Window(batch[-1].start, seq_len)] * (batch_seqs - len(batch))

def rank_share(windows: list[Window], ctx: DistContext) -> list[Window]:
    """This process's contiguous share of the windows."""
    count = len(windows)
    return windows[count * ctx.rank // ctx.world_size : count * (ctx.rank + 1) // ctx.world_size]

def score_windows(
    model: GPT, stream: ValidationStream, windows: list[Window], seq_len: int, batch_seqs: int,
    device: torch.device, desc: str, compile_model: bool = False, ctx: DistContext | None = None,
    temperature: float = 1.0,
) -> EvalScore:
    """Sum the scored predictions of ``windows`` (batched ``batch_seqs`` at a time) into loss and bpb.

    With ``ctx`` of several processes every process must call this; each scores its share.
    ``temperature`` divides the soft-capped logits (a fixed, pre-declared T; 1: none).
    """
    if temperature <= 0:
        raise ValueError(f"{desc}: temperature must be positive, got {temperature}")
    if not windows:
        raise ValueError(f"{desc}: {stream.tokens.numel()} validation tokens are too few for one window of {seq_len}")
    distributed = ctx is not None and ctx.distributed
    if distributed:
        windows = rank_share(windows, ctx)
    model.eval()
    forward = model.forward_logits
    if compile_model:  # fullgraph, as the record: a graph break is an error, not a silent slowdown
        forward = torch.compile(forward, dynamic=False, fullgraph=True)
    stream = stream.to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    quiet = distributed and not ctx.is_main
    bar = progress_bar(total=len(windows), desc=desc, unit="win", leave=False, show=not quiet)
    with torch.inference_mode(), bar:
        for first in range(0, len(windows), batch_seqs):
            batch = windows[first:first + batch_seqs]
            shaped = padded(batch, batch_seqs, seq_len) if compile_model else batch
            sums += _score_batch(forward, stream.tokens, stream.target_bytes, shaped, seq_len, device, temperature)
            bar.update(len(batch))
    if distributed:
        dist.all_reduce(sums)
    nll_sum, token_count, byte_count = sums.tolist()
    return score_from_sums(nll_sum, token_count, byte_count)

class NonFiniteScore(ValueError):
    """A loss that is NaN or infinite: the model's predictions are not finite, and there is no score to report."""

def score_from_sums(nll_sum: float, token_count: float, byte_count: float) -> EvalScore:
    """Mean NLL and bpb (docs/DESIGN.md §2) from the summed NLL, tokens and bytes; a non-finite loss is an error."""
    if not math.isfinite(nll_sum):
        raise NonFiniteScore(f"the loss summed over {token_count:,.0f} scored tokens is {nll_sum}: the model's "
                             "predictions are not finite (NaN or inf), so there is no score")
    loss = nll_sum / token_count
    return EvalScore(loss=loss, bpb=loss / math.log(2.0) * token_count / byte_count)

class ScoredTokens(NamedTuple):
    """The scored predictions of a batch of windows, one entry each."""

    targets: Tensor  # [S] int64: index in the stream of the predicted token, minus one
    nll: Tensor  # [S] float32: its negative log-likelihood (nats)
    bytes: Tensor  # [S] int32: the original UTF-8 bytes it stands for (ValidationStream.target_bytes)

def score_batch_tokens(
    forward: Callable[[Tensor, int], Tensor], tokens: Tensor, target_bytes: Tensor, batch: list[Window], seq_len: int,
    device: torch.device, temperature: float = 1.0,
) -> ScoredTokens:
    """Per-prediction NLL and bytes (``target_bytes`` [N - 1] of the stream) of one batch of windows, in window order.

    Logits are computed only from the first scored position of the batch on: the head is
    vocabulary-sized, and at small strides most positions are context that nobody scores.
    ``temperature`` divides the soft-capped logits (PR #576's ``softcap(z) / T``); 1 leaves
    them as they are.
    """
    targets = tokens.numel() - 1
    keep_from = min(w.score_from for w in batch)
    starts = torch.tensor([w.start for w in batch], device=device)  # [B]
    score_from = torch.tensor([w.score_from for w in batch], device=device)  # [B]
    positions = starts[:, None] + torch.arange(seq_len, device=device)  # [B, T]
    valid = positions < targets  # [B, T]: a window near the end is shorter than seq_len
    # past the end inputs and targets are 0 (as in the reference); causal attention keeps them from scored positions
    inputs = torch.where(valid, tokens[positions.clamp(max=targets - 1)], 0)  # [B, T]
    labels = torch.where(valid, tokens[(positions + 1).clamp(max=targets)], 0)  # [B, T]
    with autocast(device):
        logits = forward(inputs, keep_from)  # [B, T - keep_from, V]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    labels, valid = labels[:, keep_from:], valid[:, keep_from:]  # [B, T - keep_from]
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")  # [B*(T - keep_from)]
    columns = torch.arange(keep_from, seq_len, device=device)  # [T - keep_from]
    scored = (valid & (columns >= score_from[:, None])).flatten()  # [B*(T - keep_from)]
    scored_positions = positions[:, keep_from:].flatten()[scored]  # [S]
    return ScoredTokens(targets=scored_positions, nll=nll[scored], bytes=target_bytes[scored_positions])

def _score_batch(
    forward: Callable[[Tensor, int], Tensor], tokens: Tensor, target_bytes: Tensor, batch: list[Window], seq_len: int,
    device: torch.device, temperature: float = 1.0,
) -> Tensor:
    """``[nll_sum, token_count, byte_count]`` (float64) of one batch of windows."""
    scored = score_batch_tokens(forward, tokens, target_bytes, batch, seq_len, device, temperature)
    return torch.stack([
        scored.nll.to(torch.float64).sum(),
        torch.tensor(float(scored.nll.numel()), dtype=torch.float64, device=device),
        scored.bytes.to(torch.float64).sum(),
    ])
