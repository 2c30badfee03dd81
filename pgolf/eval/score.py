"""Validation loss and bits per byte of a model, in plain and sliding windows (docs/DESIGN.md §7).

Both evaluations score windows of ``seq_len`` tokens of the validation stream. The plain one
cuts the stream into consecutive non-overlapping windows and scores every token; the sliding
one starts a window every ``stride`` tokens, so each token after the first window is scored
with ``seq_len - stride`` tokens of context. Losses, token and byte counts are summed in
float64, and bpb follows §2: ``(nll_sum / tokens) / ln 2 * tokens / bytes``, each scored
target's bytes read from the ``ValidationStream`` (pgolf/data/accounting.py: lookup tables
for plain text, the byte sidecar for CaseOps text). Given a
``DistContext`` of several processes, each scores a contiguous share of the windows and the
sums are all-reduced, so N GPUs give the one-process score in 1/N of the time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pgolf.config import EvaluateConfig
from pgolf.data.accounting import ValidationStream, load_validation_stream
from pgolf.data.shards import check_dataset
from pgolf.distributed import DistContext
from pgolf.model.gpt import GPT
from pgolf.runtime import autocast, progress_bar, use_compile

if TYPE_CHECKING:
    from pgolf.clocks import Clocks


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
            sums += _score_batch(forward, stream.tokens, stream.target_bytes, batch, seq_len, device, temperature)
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


def evaluate_model(
    name: str, model: GPT, stream: ValidationStream, cfg: EvaluateConfig, ctx: DistContext, clocks: Clocks | None = None
) -> dict[str, float]:
    """The plain and sliding scores that ``cfg`` switches on, looping on, each printed when done.

    With ``clocks`` each evaluation is timed as phase ``eval_plain`` / ``eval_sliding`` (compile warm-up included).
    """
    model.looping_active = True
    compiled = use_compile(cfg.compile, ctx.device, "evaluate.compile")
    runs = {
        "plain": (cfg.eval_plain, "", lambda: eval_plain(
            model, stream, cfg.eval_seq_len, cfg.eval_batch_seqs, ctx.device, compiled, ctx,
            cfg.temperature)),
        "sliding": (cfg.eval_sliding, "sliding_", lambda: eval_sliding(
            model, stream, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, ctx.device, compiled, ctx,
            cfg.temperature)),
    }
    results: dict[str, float] = {}
    for label, (enabled, prefix, evaluate) in runs.items():
        if not enabled:
            continue
        start = time.perf_counter()
        try:
            score = evaluate()
        except NonFiniteScore as exc:
            raise NonFiniteScore(f"{name} {label} evaluation: {exc}") from None
        seconds = time.perf_counter() - start  # the score's all-reduce and .tolist() waited for the GPU
        if ctx.is_main:
            print(f"[pgolf evaluate] {name} {label}: val_loss {score.loss:.8f} val_bpb {score.bpb:.8f} "
                  f"({seconds:.1f} s)", flush=True)
        if clocks is not None:
            clocks.record(f"eval_{label}", seconds)
        # seconds stay out of the metrics: they would differ in every `dvc metrics diff`
        results |= {f"{prefix}val_loss": score.loss, f"{prefix}val_bpb": score.bpb}
    return results


def quantization_tax(quantized: dict[str, float], unquantized: dict[str, float]) -> dict[str, float]:
    """How much bpb the artifact loses against the unquantized weights, per evaluation."""
    keys = [key for key in ("val_bpb", "sliding_val_bpb") if key in quantized and key in unquantized]
    return {key: quantized[key] - unquantized[key] for key in keys}


SCORING_KEYS = ("eval_seq_len", "eval_stride", "eval_plain", "eval_sliding", "max_val_tokens", "temperature")  # equal: same scores


def tax_against_prequant(quantized: dict[str, float], metrics_path: Path, provenance_path: Path,
                         cfg: EvaluateConfig, val_bytes: int) -> dict[str, dict[str, float]]:
    """``{"quantization_tax": ...}`` against the prequant stage's scores, when they were made alike.

    Alike: the same scoring settings and the same byte total (``val_bytes``), so that both bpb
    divide by the same bytes.
    """
    if not (metrics_path.is_file() and provenance_path.is_file()):
        return {}
    scored_with = json.loads(provenance_path.read_text(encoding="utf-8"))["config"]["evaluate"]
    prequant = json.loads(metrics_path.read_text(encoding="utf-8"))
    if any(scored_with.get(key) != getattr(cfg, key) for key in SCORING_KEYS):
        print(f"[pgolf evaluate] {metrics_path} was scored with other evaluate settings: no quantization tax",
              flush=True)
        return {}
    if prequant.get("val_bytes") != val_bytes:
        print(f"[pgolf evaluate] {metrics_path} divided by {prequant.get('val_bytes')} validation bytes, this "
              f"evaluation by {val_bytes}: no quantization tax", flush=True)
        return {}
    return {"quantization_tax": quantization_tax(quantized, prequant["unquantized"])}


def validation_set(dataset_dir: Path, tokenizer_path: Path, vocab_size: int, cfg: EvaluateConfig
                   ) -> ValidationStream:
    """Validation tokens cut to whole windows (and to ``max_val_tokens``) with each target's bytes."""
    return load_validation_stream(dataset_dir, tokenizer_path, vocab_size, cfg.eval_seq_len, cfg.max_val_tokens)


def checked_validation_set(dataset_dir: Path, tokenizer_path: Path, vocab_size: int, cfg: EvaluateConfig
                           ) -> ValidationStream:
    """``validation_set`` of a pipeline dataset, first held to its manifest (the validation split read whole)."""
    check_dataset(dataset_dir, tokenizer_path, vocab_size, scan=("val",))
    return validation_set(dataset_dir, tokenizer_path, vocab_size, cfg)


def score_validation(label: str, model: GPT, source: Path, stream: ValidationStream, cfg: EvaluateConfig,
                     ctx: DistContext, clocks: Clocks | None = None) -> dict[str, Any]:
    """The evaluate and prequant stages' metrics of ``model`` (read from ``source``): its scores on ``stream``,
    the checked validation split (``checked_validation_set``)."""
    if ctx.is_main:
        print(f"[pgolf evaluate] {source}: {stream.tokens.numel() - 1:,} validation targets, "
              f"{stream.total_bytes():,} bytes ({stream.rule}) on {ctx.world_size} x {ctx.device}", flush=True)
    try:
        scores = evaluate_model(label, model, stream, cfg, ctx, clocks)
    except NonFiniteScore as exc:
        raise NonFiniteScore(f"{source}: {exc}") from None
    return {"val_tokens": stream.tokens.numel() - 1, "val_bytes": stream.total_bytes(), label: scores}
