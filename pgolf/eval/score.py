"""The evaluate and prequant stages' scores, and the exported script's: which, timed, printed, and the tax.

``score_validation`` checks the validation set against the tokenizer, scores the model with the
plain and sliding windows ``EvaluateConfig`` switches on (pgolf.eval.bpb), times and prints each
and returns them with the targets and bytes they cover; ``tax_against_prequant`` is the
quantization tax against the prequant stage's score of the same validation set (docs/DESIGN.md §7).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgolf.config import EvaluateConfig
from pgolf.data.accounting import ValidationStream, load_validation_stream
from pgolf.data.shards import check_dataset
from pgolf.distributed import DistContext
from pgolf.eval.bpb import NonFiniteScore, eval_plain, eval_sliding
from pgolf.model.gpt import GPT
from pgolf.runtime import use_compile

if TYPE_CHECKING:
    from pgolf.clocks import Clocks


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


def tax_against_prequant(quantized: dict[str, float], metrics_path: Path | None, provenance_path: Path,
                         cfg: EvaluateConfig, val_bytes: int) -> dict[str, dict[str, float]]:
    """``{"quantization_tax": ...}`` against the prequant stage's scores, when they were made alike.

    Alike: of the same trained weights (``metrics_path`` is None when they are another model's),
    the same scoring settings and the same byte total (``val_bytes``), so that both bpb divide by
    the same bytes.
    """
    if metrics_path is None or not (metrics_path.is_file() and provenance_path.is_file()):
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
