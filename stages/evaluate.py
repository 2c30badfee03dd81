"""DVC stage ``evaluate``: val_loss and val_bpb of the artifact and of the unquantized weights.

The quantized model is rebuilt from ``out/compress/artifact.ptz`` exactly as a submission
would be (decompress, deserialize, dequantize), so the score includes every loss of the
round trip. Both it and ``out/train/model.pt`` are scored with looping on, by the plain and
the sliding evaluation, on the validation shards of the model's vocabulary; each evaluation
and the unquantized model can be switched off in ``evaluate:``. Writes
``out/evaluate/metrics.json`` for ``dvc metrics diff``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pgolf.atomic import write_json
from pgolf.checkpoint import build_model, check_state_dict
from pgolf.cli import run_stage
from pgolf.codec import dequantize, load_artifact
from pgolf.config import EvaluateConfig, ModelConfig, TokenizeConfig, section, to_dict
from pgolf.evaluate import EvalScore, eval_plain, eval_sliding
from pgolf.model import GPT
from pgolf.provenance import log_provenance
from pgolf.distributed import DistContext, init_distributed, relaunch_under_torchrun, shutdown, under_torchrun
from pgolf.runtime import use_compile
from pgolf.shards import dataset_path, load_validation_tokens
from pgolf.tokenizer import ByteTables, byte_tables, tokenizer_file

ARTIFACT_PATH = Path("out/compress/artifact.ptz")
TRAINED_MODEL_PATH = Path("out/train/model.pt")
METRICS_PATH = Path("out/evaluate/metrics.json")
TORCHRUN_PARAMS = Path(".pgolf/evaluate_params.yaml")  # the resolved params, for the relaunched processes


def quantized_model(path: Path, device: torch.device) -> GPT:
    """The model a submission would score: the artifact decompressed and dequantized."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the compress stage first)")
    qm = load_artifact(path.read_bytes())
    model = GPT(qm.model_config)
    state = dequantize(qm)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return model.to(device)


def validation_data(data_dir: str, model_config: ModelConfig, cfg: EvaluateConfig) -> tuple[torch.Tensor, ByteTables]:
    """Validation tokens (cut to ``max_val_tokens`` when set) and byte tables of the model's vocabulary."""
    vocab = model_config.vocab_size
    tokens = load_validation_tokens(dataset_path(data_dir, vocab), cfg.eval_seq_len)  # [N]
    if cfg.max_val_tokens:
        usable = ((min(cfg.max_val_tokens, tokens.numel()) - 1) // cfg.eval_seq_len) * cfg.eval_seq_len
        if usable <= 0:
            raise ValueError(
                f"evaluate.max_val_tokens={cfg.max_val_tokens} is too few for eval_seq_len {cfg.eval_seq_len}"
            )
        tokens = tokens[: usable + 1]
    tables = byte_tables(tokenizer_file(data_dir, vocab), vocab)
    return tokens, tables


def score(
    name: str, model: GPT, tokens: torch.Tensor, tables: ByteTables, cfg: EvaluateConfig, ctx: DistContext
) -> dict:
    """Plain and sliding scores (those switched on) of ``model`` with looping on, over all processes."""
    model.looping_active = True
    device = ctx.device
    compiled = use_compile(cfg.compile, device, "evaluate.compile")
    results: dict[str, float] = {}
    if cfg.eval_plain:
        results |= timed(name, "", ctx, lambda: eval_plain(
            model, tokens, tables, cfg.eval_seq_len, cfg.eval_batch_seqs, device, compiled, ctx))
    if cfg.eval_sliding:
        results |= timed(name, "sliding_", ctx, lambda: eval_sliding(
            model, tokens, tables, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, device, compiled, ctx))
    return results


def timed(name: str, prefix: str, ctx: DistContext, evaluate: Callable[[], EvalScore]) -> dict[str, float]:
    start = time.perf_counter()
    result = evaluate()
    seconds = time.perf_counter() - start
    label = prefix.rstrip("_") or "plain"
    if ctx.is_main:
        print(f"[pgolf evaluate] {name} {label}: val_loss {result.loss:.8f} val_bpb {result.bpb:.8f} ({seconds:.1f} s)",
              flush=True)
    # seconds stay out of the metrics: they would differ in every `dvc metrics diff`
    return {f"{prefix}val_loss": result.loss, f"{prefix}val_bpb": result.bpb}


def quantization_tax(quantized: dict, unquantized: dict) -> dict:
    """How much bpb the artifact loses against the unquantized weights, per evaluation."""
    keys = [key for key in ("val_bpb", "sliding_val_bpb") if key in quantized and key in unquantized]
    return {key: quantized[key] - unquantized[key] for key in keys}


def run(params: dict) -> None:
    cfg = section(params, "evaluate", EvaluateConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    if not (cfg.eval_plain or cfg.eval_sliding):
        raise ValueError("evaluate: eval_plain and eval_sliding are both false: nothing to evaluate")
    if cfg.nproc_per_node > 1 and not under_torchrun(os.environ):
        relaunch_under_torchrun("stages.evaluate", params, cfg.nproc_per_node, TORCHRUN_PARAMS)
        return
    ctx = init_distributed(cfg.device)
    try:
        if ctx.is_main:
            log_provenance("evaluate", {"evaluate": to_dict(cfg), "tokenize.data_dir": data_dir,
                                        "world_size": ctx.world_size})
        metrics = evaluate_models(cfg, data_dir, ctx)
        if ctx.is_main:
            write_json(METRICS_PATH, metrics)
            print(f"[pgolf evaluate] metrics in {METRICS_PATH} (sizes in out/compress/metrics.json, training in "
                  "out/train/metrics.json); `dvc metrics show` prints them all, `dvc metrics diff` compares runs",
                  flush=True)
    finally:
        shutdown(ctx)


def evaluate_models(cfg: EvaluateConfig, data_dir: str, ctx: DistContext) -> dict:
    """Scores of the artifact and, when switched on, of the unquantized weights (every process)."""
    model = quantized_model(ARTIFACT_PATH, ctx.device)
    tokens, tables = validation_data(data_dir, model.config, cfg)
    if ctx.is_main:
        print(f"[pgolf evaluate] {tokens.numel() - 1:,} validation targets on {ctx.world_size} x {ctx.device}",
              flush=True)
    metrics = {"artifact_bytes": ARTIFACT_PATH.stat().st_size, "val_tokens": tokens.numel() - 1,
               "quantized": score("quantized", model, tokens, tables, cfg, ctx)}
    if cfg.eval_unquantized:
        unquantized = build_model(TRAINED_MODEL_PATH, ctx.device)
        if unquantized.config != model.config:
            raise ValueError(f"{TRAINED_MODEL_PATH} and {ARTIFACT_PATH} hold different model configs")
        metrics["unquantized"] = score("unquantized", unquantized, tokens, tables, cfg, ctx)
        metrics["quantization_tax"] = quantization_tax(metrics["quantized"], metrics["unquantized"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
