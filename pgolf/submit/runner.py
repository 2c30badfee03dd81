"""The submission's runner: train, calibrate, quantize, compress, evaluate (and test-time train) in one process group.

The exported ``train_gpt.py`` (``pgolf.submit.bundle.script_text``) bundles this module's import
closure with the run's params and calls :func:`main`, as the challenge runs it: ``torchrun
--standalone --nproc_per_node=N train_gpt.py`` (or ``python train_gpt.py``) in a folder with
the challenge's data layout (``./data/datasets/fineweb10B_sp{V}/``,
``./data/tokenizers/fineweb_{V}_bpe.model``); before the first step it checks every input it
will read (the tokenizer, every shard and its ids, the byte sidecar that CaseOps data needs) and
refuses to start when a validation document is also in the training shards
(``pgolf.data.leakage``), so bad data is one line naming the file, not a failure hours in. Each
step calls the library function its DVC stage calls, with the same seeds, so the artifact is byte
for byte the pipeline's and, with ``ttt.enabled``, the TTT score is the ttt stage's: the
evaluation phase runs ``run_ttt`` on the decompressed artifact after the plain and sliding
scores, and that score is the submission's.
Rank 0 prints the records' log lines (the run's fingerprints, pre-quantization, artifact and
submission size, every score with its time, ``submission val_loss:X val_bpb:Y`` last) and writes
``final_model.pt``, ``final_model.ptz`` (the artifact) and ``final_metrics.json`` (the
submission's ``val_loss``/``val_bpb`` at its top). Every phase is timed on its own clock
(``pgolf.clocks``): the training phase, judged against the 600 s rule, runs from the start
of training to the written artifact (calibration, which reads training data after the loop,
and GPTQ included; calibration is checked against ``train.gptq_reserve_seconds``); the
evaluation phase from the artifact's bytes to the submission's score (decompression, every
evaluation and TTT with its compile warm-up), reading only the validation split.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
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
from pgolf.clocks import Clocks, process_seconds
from pgolf.config import (
    EvaluateConfig,
    TrainConfig,
    TTTConfig,
)
from pgolf.data.accounting import ValidationStream
from pgolf.data.leakage import check_no_leaks
from pgolf.data.shards import dataset_path, validate_dataset
from pgolf.data.tokenizer import load_tokenizer, tokenizer_file
from pgolf.distributed import DistContext, barrier, init_distributed, shutdown
from pgolf.eval.score import evaluate_model, validation_set
from pgolf.fingerprint import data_fingerprint, environment, log_lines
from pgolf.model.files import build_model, load_model, save_model
from pgolf.model.gpt import GPT, count_parameters
from pgolf.quant.calibrate import calibration_hessians, calibration_model
from pgolf.quant.fit import FitResult, needs_size, quantize_for_size
from pgolf.runtime import enable_tf32, resolve_device
from pgolf.submit.rundir import METRICS_FILE, SEED_ENV, artifact_score
from pgolf.submit.sections import RunConfigs
from pgolf.train.loop import run_metrics, train_model

DATA_DIR = "data"  # the challenge's layout, relative to the folder the script runs in
MODEL_FILE = "final_model.pt"
ARTIFACT_FILE = "final_model.ptz"
# record log line prefix of each evaluation (the records' train_gpt.py print these)
EVAL_LABELS = {"plain": "quantized", "sliding": "quantized_sliding_window"}
TTT_LABEL = "quantized_ttt"
SUBMISSION_LABEL = "submission"  # the last score line: the submission's score, as final_metrics.json's val_bpb


@dataclass(frozen=True)
class ValidationSets:
    """The validation stream the evaluations score and the one TTT scores (the same when cut alike)."""

    evaluate: ValidationStream
    ttt: ValidationStream | None


def main(params: dict[str, dict[str, Any]], script: str) -> int:
    """Run the submission in the current folder; ``script`` is the file whose bytes count as code.

    ``SEED`` in the environment replaces the baked ``train.seed`` (the seeds of a record run
    one script). Bad input (missing data, a size over the limit, a seed that is not a
    number) is one line on stderr and exit code 2.
    """
    startup = process_seconds()
    try:
        run(RunConfigs.from_baked(seeded(params, os.environ.get(SEED_ENV))), Path("."), Path(script).read_bytes(),
            startup)
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


def run(cfgs: RunConfigs, root: Path, script: bytes, startup: float | None = None) -> dict[str, Any]:
    """Train to a scored artifact under ``root``; the metrics (rank 0 writes them).

    ``script``: the bytes that count as code. ``startup``: the process's age when the runner
    started (interpreter, bundle, imports).
    """
    code = len(script)
    ctx = init_distributed(cfgs.train.device)
    for key, device in (("evaluate.device", cfgs.evaluate.device), ("ttt.device", cfgs.ttt.device)):
        if device not in ("auto", ctx.device.type):
            raise ValueError(f"{key}={device} but training runs on {ctx.device.type}: one process group scores "
                             "where it trains")
    if ctx.device.type == "cuda":
        enable_tf32()
    clocks = Clocks.on_rank(ctx)
    if startup is not None:
        clocks.record("startup", startup)
    vocab = cfgs.model.vocab_size
    dataset_dir, tokenizer = root / dataset_path(DATA_DIR, vocab), root / tokenizer_file(DATA_DIR, vocab)
    log(ctx, f"seed:{cfgs.train.seed}")
    try:
        with clocks.phase("data_checks"):
            check_inputs(dataset_dir, tokenizer, vocab)
            check_no_leaks(dataset_dir)  # before the training clock: no validation document among the training ones
            # before training: data whose bytes cannot be counted (CaseOps without its sidecar) is refused at once
            streams = validation_sets(cfgs, dataset_dir, tokenizer)
            fingerprint = {"data": data_fingerprint(dataset_dir, tokenizer, streams.evaluate),
                           "environment": environment(ctx.device, ctx.world_size, cfgs.compress.compressor)}
        for line in log_lines(fingerprint["data"], fingerprint["environment"]):
            log(ctx, line)
        metrics = training_phase(cfgs, root, dataset_dir, tokenizer, ctx, code, clocks)
        metrics |= evaluation_phase(cfgs, root, streams, ctx, clocks)
        clocks.record_process("whole_process")
        metrics |= {"seed": cfgs.train.seed, "params": cfgs.baked(),  # what `pgolf seeds` pools and compares
                    "clocks": clocks.seconds, "fingerprint": fingerprint,
                    "code_sha256": hashlib.sha256(script).hexdigest()}  # what `pgolf export --measured` holds it to
        log(ctx, f"{SUBMISSION_LABEL} val_loss:{metrics['val_loss']:.8f} val_bpb:{metrics['val_bpb']:.8f} "
                 f"score:{metrics['score']}")  # the log's last line: what final_metrics.json's val_bpb is
        if ctx.is_main:
            (root / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return metrics
    finally:
        shutdown(ctx)


def check_inputs(dataset_dir: Path, tokenizer: Path, vocab: int) -> None:
    """Every file the run will read, before the first step: the tokenizer of ``vocab`` pieces and every shard (the
    challenge's data has no manifest: the format and every id below ``vocab``, read through a memory map)."""
    load_tokenizer(tokenizer, vocab)
    validate_dataset(dataset_dir, vocab)


def validation_sets(cfgs: RunConfigs, dataset_dir: Path, tokenizer: Path) -> ValidationSets:
    """Validation tokens and bytes (lookup tables or sidecar) cut as evaluate cuts them, and as the ttt stage does."""
    vocab = cfgs.model.vocab_size
    stream = validation_set(dataset_dir, tokenizer, vocab, cfgs.evaluate)
    if not cfgs.ttt.enabled:
        return ValidationSets(stream, None)
    cut = EvaluateConfig(eval_seq_len=cfgs.ttt.seq_len, max_val_tokens=cfgs.ttt.max_val_tokens)  # the ttt stage's
    same = (cut.eval_seq_len, cut.max_val_tokens) == (cfgs.evaluate.eval_seq_len, cfgs.evaluate.max_val_tokens)
    return ValidationSets(stream, stream if same else validation_set(dataset_dir, tokenizer, vocab, cut))


def training_phase(cfgs: RunConfigs, root: Path, dataset_dir: Path, tokenizer: Path, ctx: DistContext, code: int,
                   clocks: Clocks) -> dict[str, Any]:
    """Train on every rank, then calibrate, quantize and compress on rank 0: the 600 s of the rules."""
    with clocks.phase("training_phase"):
        start = time.perf_counter()
        model, result = train_model(cfgs.model, cfgs.train, dataset_dir, tokenizer, ctx, checkpoints=None)
        clocks.record_training(time.perf_counter() - start, result.elapsed_s)
        metrics: dict[str, Any] = {"train": run_metrics(result, count_parameters(model), ctx), "code_bytes": code}
        log(ctx, f"model_params:{metrics['train']['model_params']}")
        log(ctx, f"train_time:{result.elapsed_s * 1000:.0f}ms step:{result.steps}/{cfgs.train.iterations} "
                 f"train_loss:{result.losses[-1]:.4f}")
        if ctx.is_main:
            with clocks.phase("calibration"):  # the loop's end to the last read of training data
                save_model(root / MODEL_FILE, cfgs.model, result.final_state)
                hessians, sensitivity = calibration_hessians(calibration_model(root / MODEL_FILE, cfgs.calibrate),
                                                             dataset_dir, cfgs.calibrate)
            print(f"GPTQ:collected {len(hessians)} Hessians in {clocks.seconds['calibration']:.1f}s", flush=True)
            metrics["calibration_reserve"] = reserve_check(cfgs.train, result.elapsed_s, clocks.seconds["calibration"])
            if metrics["calibration_reserve"]["overran"]:
                print(reserve_warning(metrics["calibration_reserve"]), flush=True)
            metrics |= make_artifact(cfgs, root / MODEL_FILE, hessians, sensitivity, root / ARTIFACT_FILE, code, clocks)
        barrier(ctx)
    return metrics | {"training_phase_s": clocks.seconds["training_phase"]}


def reserve_check(cfg: TrainConfig, loop_s: float, calibration_s: float) -> dict[str, Any]:
    """Calibration's time against ``train.gptq_reserve_seconds``, and until when training data was read.

    The loop stops at ``max_wallclock_seconds - gptq_reserve_seconds`` on its clock, so the
    training data is read within ``max_wallclock_seconds`` only when calibration fits the reserve.
    """
    read_until = loop_s + calibration_s
    cap = cfg.max_wallclock_seconds
    return {"calibration_s": calibration_s, "gptq_reserve_seconds": cfg.gptq_reserve_seconds,
            "overran": calibration_s > cfg.gptq_reserve_seconds, "training_data_read_until_s": read_until,
            "max_wallclock_seconds": cap, "past_wallclock": cap > 0 and read_until > cap}


def reserve_warning(check: dict[str, Any]) -> str:
    cap = check["max_wallclock_seconds"]
    limit = f"past train.max_wallclock_seconds={cap:g} s" if check["past_wallclock"] else \
        (f"within train.max_wallclock_seconds={cap:g} s" if cap > 0 else "with no wallclock cap set")
    return (f"WARNING: calibration overran the reserve: it read training data for {check['calibration_s']:.3f} s after "
            f"the loop, more than train.gptq_reserve_seconds={check['gptq_reserve_seconds']:g} s; training data was "
            f"read until {check['training_data_read_until_s']:.3f} s on the training clock, {limit}")


def evaluation_phase(cfgs: RunConfigs, root: Path, streams: ValidationSets, ctx: DistContext, clocks: Clocks
                     ) -> dict[str, Any]:
    """The trained weights' plain score (for the quantization tax), then the artifact's, timed from its bytes.

    With ``ttt.enabled`` the artifact is then test-time trained as the ttt stage does (on a copy
    made before any evaluation, looping on) and its TTT score is the submission's.
    """
    plain_only = dataclasses.replace(cfgs.evaluate, eval_plain=True, eval_sliding=False)
    with clocks.phase("prequant_eval"):
        unquantized = score(build_model(root / MODEL_FILE, ctx.device), streams.evaluate, plain_only, ctx,
                            {"plain": "pre-quantization post-ema"})
    metrics: dict[str, Any] = {"unquantized": unquantized}
    with clocks.phase("evaluation_phase"):
        with clocks.phase("decompression"):
            model = artifact_model(root / ARTIFACT_FILE, ctx.device)
            adapted = copy.deepcopy(model) if cfgs.ttt.enabled else None  # TTT changes its weights
        metrics["quantized"] = score(model, streams.evaluate, cfgs.evaluate, ctx, EVAL_LABELS, clocks)
        metrics |= {"val_tokens": streams.evaluate.tokens.numel() - 1, "val_bytes": streams.evaluate.total_bytes()}
        if adapted is not None:
            metrics["ttt"] = test_time_train(adapted, streams.ttt, cfgs.ttt, ctx, clocks, metrics)
    if adapted is not None:
        final = {"val_loss": metrics["ttt"]["val_loss"], "val_bpb": metrics["ttt"]["val_bpb"], "score": TTT_LABEL}
    else:
        kind, figures = artifact_score(metrics["quantized"])
        final = figures | {"score": EVAL_LABELS[kind]}
    return metrics | final | {"evaluation_phase_s": clocks.seconds["evaluation_phase"],
                              "world_size": ctx.world_size, "device": ctx.device.type, "hardware": hardware(ctx)}


def test_time_train(model: GPT, stream: ValidationStream, cfg: TTTConfig, ctx: DistContext, clocks: Clocks,
                    evaluated: dict[str, Any]) -> dict[str, Any]:
    """The ttt stage's scoring of the artifact, on its clock; its metrics (the stage's ``out/ttt/metrics.json``)."""
    from pgolf.eval.ttt import run_ttt, ttt_metrics  # here, not above: a script ships TTT only when it is on

    with clocks.phase("ttt"):  # compile warm-up included: run_ttt compiles inside
        model.looping_active = True
        result = run_ttt(model, stream, cfg, ctx.device, ctx)
    log(ctx, f"{TTT_LABEL} val_loss:{result.score.loss:.8f} val_bpb:{result.score.bpb:.8f} "
             f"eval_time:{clocks.seconds['ttt'] * 1000:.0f}ms")
    log(ctx, f"ttt_method:{cfg.method} optimizer_steps:{result.optimizer_steps} tokens:{result.tokens}")
    return ttt_metrics(result, cfg, evaluated, ctx.world_size)


def make_artifact(cfgs: RunConfigs, model_file: Path, hessians: dict[str, torch.Tensor],
                  sensitivity: dict[str, torch.Tensor] | None, artifact_file: Path, code: int, clocks: Clocks
                  ) -> dict[str, Any]:
    """Quantize the trained model on its Hessians and compress it into ``artifact_file``; its sizes."""
    model_config, state_dict = load_model(model_file)
    sized_by = cfgs.compress if needs_size(cfgs.quantize) else None
    with clocks.phase("quantization"):
        qm, _, search = quantize_for_size(model_config, state_dict, hessians, cfgs.quantize, sized_by, code,
                                          resolve_device(cfgs.quantize.device), sensitivity)
    with clocks.phase("serialization"):
        raw = serialize(qm)
    with clocks.phase("compression"):
        blob = pack_artifact(raw, cfgs.compress, code)
        artifact_file.write_bytes(blob)
    print(f"Serialized model: {len(raw)} bytes", flush=True)
    print(f"Code size: {code} bytes", flush=True)
    print(f"Serialized model quantized+{cfgs.compress.compressor}: {len(blob)} bytes", flush=True)
    print(f"Total submission size quantized+{cfgs.compress.compressor}: {len(blob) + code} bytes", flush=True)
    sizes = {"artifact_bytes": len(blob), "total_bytes": len(blob) + code, "raw_bytes": len(raw),
             "artifact_sha256": hashlib.sha256(blob).hexdigest()}
    if not isinstance(search, FitResult):  # a fixed clip, or the allocator's choice: no size search to report
        return sizes
    return sizes | {"fit_clip_sigmas": search.clip_sigmas, "fit_rate_lambda": search.rate_lambda}


def score(model: GPT, stream: ValidationStream, cfg: EvaluateConfig, ctx: DistContext, labels: dict[str, str],
          clocks: Clocks | None = None) -> dict[str, float]:
    """The evaluations ``cfg`` switches on, one at a time so that each prints its record line and time.

    With ``clocks`` each is timed as phase ``eval_plain`` / ``eval_sliding``.
    """
    scores: dict[str, float] = {}
    for kind, flag in (("plain", "eval_plain"), ("sliding", "eval_sliding")):
        if not getattr(cfg, flag):
            continue
        alone = dataclasses.replace(cfg, eval_plain=kind == "plain", eval_sliding=kind == "sliding")
        start = time.perf_counter()
        result = evaluate_model(labels[kind], model, stream, alone, ctx, clocks)
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
