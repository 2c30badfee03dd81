"""The submission's runner: train, calibrate, quantize, compress and evaluate in one process group.

The exported ``train_gpt.py`` (``pgolf.submit.bundle.script_text``) bundles this module's import
closure with the run's params and calls :func:`main`, as the challenge runs it: ``torchrun
--standalone --nproc_per_node=N train_gpt.py`` (or ``python train_gpt.py``) in a folder with
the challenge's data layout (``./data/datasets/fineweb10B_sp{V}/``,
``./data/tokenizers/fineweb_{V}_bpe.model``); it refuses to start when a validation document is
also in the training shards (``pgolf.data.leakage``). Each step calls the library function its DVC
stage calls, with the same seeds, so the artifact is byte for byte the pipeline's. Rank 0
prints the records' log lines (pre-quantization, artifact and submission size, quantized
and sliding-window ``val_bpb`` with their times) and writes ``final_model.pt``,
``final_model.ptz`` (the artifact) and ``final_metrics.json``. The training phase, timed
against the 600 s rule, runs from the start to the written artifact (calibration and GPTQ
included); the evaluation phase times the artifact's load and scoring, which read only the
validation split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pgolf.artifact.format import serialize
from pgolf.artifact.load import artifact_model
from pgolf.artifact.size import pack_artifact
from pgolf.config import (
    SECTIONS,
    CalibrateConfig,
    CompressConfig,
    EvaluateConfig,
    ModelConfig,
    QuantizeConfig,
    TrainConfig,
    from_dict,
    output_keys,
    to_dict,
)
from pgolf.data.accounting import ValidationStream
from pgolf.data.leakage import check_no_leaks
from pgolf.data.shards import check_headers, dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import DistContext, barrier, init_distributed, shutdown
from pgolf.eval.score import evaluate_model, validation_set
from pgolf.model.files import build_model, load_model, save_model
from pgolf.model.gpt import GPT, count_parameters
from pgolf.quant.calibrate import calibration_hessians, calibration_model
from pgolf.quant.fit import FitResult, needs_size, quantize_for_size
from pgolf.runtime import enable_tf32, resolve_device
from pgolf.submit.rundir import METRICS_FILE, SEED_ENV
from pgolf.train.loop import run_metrics, train_model

DATA_DIR = "data"  # the challenge's layout, relative to the folder the script runs in
MODEL_FILE = "final_model.pt"
ARTIFACT_FILE = "final_model.ptz"
# record log line prefix of each evaluation (the records' train_gpt.py print these)
EVAL_LABELS = {"plain": "quantized", "sliding": "quantized_sliding_window"}


@dataclass(frozen=True)
class RunConfigs:
    """Every section the runner reads: the params an exported script carries."""

    model: ModelConfig
    train: TrainConfig
    calibrate: CalibrateConfig
    quantize: QuantizeConfig
    compress: CompressConfig
    evaluate: EvaluateConfig

    def baked(self) -> dict[str, dict[str, Any]]:
        """The keys that shape the outputs, by section (run settings keep their defaults)."""
        return {name: {key: to_dict(getattr(self, name))[key] for key in output_keys(SECTIONS[name])}
                for name in self.section_names()}

    @classmethod
    def from_baked(cls, params: dict[str, dict[str, Any]]) -> RunConfigs:
        return cls(**{name: from_dict(SECTIONS[name], params[name], f"baked params: {name}")
                      for name in cls.section_names()})

    @classmethod
    def section_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def main(params: dict[str, dict[str, Any]], script: str) -> int:
    """Run the submission in the current folder; ``script`` is the file whose bytes count as code.

    ``SEED`` in the environment replaces the baked ``train.seed`` (the seeds of a record run
    one script). Bad input (missing data, a size over the limit, a seed that is not a
    number) is one line on stderr and exit code 2.
    """
    try:
        run(RunConfigs.from_baked(seeded(params, os.environ.get(SEED_ENV))), Path("."), Path(script).stat().st_size)
    except (ValueError, OSError) as exc:  # ConfigError, SizeLimitError and FileNotFoundError among them
        print(f"{Path(script).name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def seeded(params: dict[str, dict[str, Any]], seed: str | None) -> dict[str, dict[str, Any]]:
    """The baked params with ``train.seed`` set to ``seed`` (a decimal integer) when one is given."""
    if seed is None:
        return params
    if not seed.strip().isdigit():
        raise ValueError(f"{SEED_ENV}={seed!r}: not a seed (a non-negative integer)")
    return {**params, "train": {**params["train"], "seed": int(seed)}}


def run(cfgs: RunConfigs, root: Path, code: int) -> dict[str, Any]:
    """Train to a scored artifact under ``root``; the metrics (rank 0 writes them)."""
    ctx = init_distributed(cfgs.train.device)
    if cfgs.evaluate.device not in ("auto", ctx.device.type):
        raise ValueError(f"evaluate.device={cfgs.evaluate.device} but training runs on {ctx.device.type}: "
                         "one process group scores where it trains")
    if ctx.device.type == "cuda":
        enable_tf32()
    vocab = cfgs.model.vocab_size
    dataset_dir, tokenizer = root / dataset_path(DATA_DIR, vocab), root / tokenizer_file(DATA_DIR, vocab)
    log(ctx, f"seed:{cfgs.train.seed}")
    try:
        check_headers(dataset_dir)  # the challenge's data has no manifest: the shard format is what can be checked
        check_no_leaks(dataset_dir)  # before the training clock: no validation document among the training ones
        # before training: data whose bytes cannot be counted (CaseOps without its sidecar) is refused at once
        stream = validation_set(dataset_dir, tokenizer, vocab, cfgs.evaluate)  # bytes: lookup tables or sidecar
        metrics = training_phase(cfgs, root, dataset_dir, tokenizer, ctx, code)
        metrics |= evaluation_phase(cfgs, root, stream, ctx)
        metrics |= {"seed": cfgs.train.seed, "params": cfgs.baked()}  # what `pgolf seeds` pools and compares
        if ctx.is_main:
            (root / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return metrics
    finally:
        shutdown(ctx)


def training_phase(cfgs: RunConfigs, root: Path, dataset_dir: Path, tokenizer: Path, ctx: DistContext, code: int
                   ) -> dict[str, Any]:
    """Train on every rank, then calibrate, quantize and compress on rank 0: the 600 s of the rules."""
    start = time.perf_counter()
    model, result = train_model(cfgs.model, cfgs.train, dataset_dir, tokenizer, ctx, checkpoints=None)
    metrics: dict[str, Any] = {"train": run_metrics(result, count_parameters(model), ctx), "code_bytes": code}
    log(ctx, f"model_params:{metrics['train']['model_params']}")
    log(ctx, f"train_time:{result.elapsed_s * 1000:.0f}ms step:{result.steps}/{cfgs.train.iterations} "
             f"train_loss:{result.losses[-1]:.4f}")
    if ctx.is_main:
        save_model(root / MODEL_FILE, cfgs.model, result.final_state)
        metrics |= make_artifact(cfgs, root / MODEL_FILE, dataset_dir, root / ARTIFACT_FILE, code)
    barrier(ctx)
    return metrics | {"training_phase_s": time.perf_counter() - start}


def evaluation_phase(cfgs: RunConfigs, root: Path, stream: ValidationStream, ctx: DistContext
                     ) -> dict[str, Any]:
    """The trained weights' plain score (for the quantization tax), then the artifact's, timed from its load."""
    plain_only = dataclasses.replace(cfgs.evaluate, eval_plain=True, eval_sliding=False)
    unquantized = score(build_model(root / MODEL_FILE, ctx.device), stream, plain_only, ctx,
                        {"plain": "pre-quantization post-ema"})
    start = time.perf_counter()
    quantized = score(artifact_model(root / ARTIFACT_FILE, ctx.device), stream, cfgs.evaluate, ctx,
                      EVAL_LABELS)
    return {"unquantized": unquantized, "quantized": quantized, "evaluation_phase_s": time.perf_counter() - start,
            "val_tokens": stream.tokens.numel() - 1, "val_bytes": stream.total_bytes(),
            "world_size": ctx.world_size, "device": ctx.device.type,
            "hardware": hardware(ctx)}


def make_artifact(cfgs: RunConfigs, model_file: Path, dataset_dir: Path, artifact_file: Path, code: int
                  ) -> dict[str, Any]:
    """Calibrate, quantize and compress the trained model into ``artifact_file``; its sizes."""
    start = time.perf_counter()
    hessians, sensitivity = calibration_hessians(calibration_model(model_file, cfgs.calibrate), dataset_dir,
                                                 cfgs.calibrate)
    print(f"GPTQ:collected {len(hessians)} Hessians in {time.perf_counter() - start:.1f}s", flush=True)
    model_config, state_dict = load_model(model_file)
    sized_by = cfgs.compress if needs_size(cfgs.quantize) else None
    qm, _, search = quantize_for_size(model_config, state_dict, hessians, cfgs.quantize, sized_by, code,
                                      resolve_device(cfgs.quantize.device), sensitivity)
    raw = serialize(qm)
    blob = pack_artifact(raw, cfgs.compress, code)
    artifact_file.write_bytes(blob)
    print(f"Serialized model: {len(raw)} bytes", flush=True)
    print(f"Code size: {code} bytes", flush=True)
    print(f"Serialized model quantized+{cfgs.compress.compressor}: {len(blob)} bytes", flush=True)
    print(f"Total submission size quantized+{cfgs.compress.compressor}: {len(blob) + code} bytes", flush=True)
    sizes = {"artifact_bytes": len(blob), "total_bytes": len(blob) + code, "raw_bytes": len(raw)}
    fit = {"fit_clip_sigmas": search.clip_sigmas, "fit_rate_lambda": search.rate_lambda}
    return sizes | (fit if isinstance(search, FitResult) else {})


def score(model: GPT, stream: ValidationStream, cfg: EvaluateConfig, ctx: DistContext, labels: dict[str, str]
          ) -> dict[str, float]:
    """The evaluations ``cfg`` switches on, one at a time so that each prints its record line and time."""
    scores: dict[str, float] = {}
    for kind, flag in (("plain", "eval_plain"), ("sliding", "eval_sliding")):
        if not getattr(cfg, flag):
            continue
        alone = dataclasses.replace(cfg, eval_plain=kind == "plain", eval_sliding=kind == "sliding")
        start = time.perf_counter()
        result = evaluate_model(labels[kind], model, stream, alone, ctx)
        prefix = "sliding_" if kind == "sliding" else ""
        log(ctx, f"{labels[kind]} val_loss:{result[prefix + 'val_loss']:.8f} val_bpb:{result[prefix + 'val_bpb']:.8f} "
                 f"eval_time:{(time.perf_counter() - start) * 1000:.0f}ms")
        scores |= result
    return scores


def hardware(ctx: DistContext) -> str:
    """Where the run ran, as ``8xNVIDIA H100 80GB HBM3`` or ``1xcpu``."""
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    return f"{ctx.world_size}x{name}"


def log(ctx: DistContext, line: str) -> None:
    if ctx.is_main:
        print(line, flush=True)
