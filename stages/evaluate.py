"""DVC stages ``evaluate`` and ``prequant``: val_loss and val_bpb of the artifact or the trained weights.

``evaluate`` (``--weights artifact``) rebuilds the model from ``out/compress/artifact.ptz``
exactly as a submission would be (decompress, deserialize, dequantize), so the score includes
every loss of the round trip, and adds the quantization tax against ``prequant``'s scores.
``prequant`` (``--weights trained``) scores ``out/train/model.pt`` and depends on nothing
that quantization changes, so DVC keeps it cached through every quantization experiment.
Both score with looping on, by the plain and the sliding evaluation that ``evaluate:``
switches on, on one process or N under torchrun.
"""

from __future__ import annotations

import sys

from pgolf.artifact.compress import artifact_model
from pgolf.atomic import stage_outputs
from pgolf.config import EvaluateConfig, TokenizeConfig, section, to_dict
from pgolf.data.shards import dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import init_distributed, shutdown
from pgolf.eval.score import checked_validation_set, evaluate_model, tax_against_prequant
from pgolf.model.files import build_model
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage, stage_parser

# --weights: (model file, how to build it, metrics key, metrics file, provenance file)
WEIGHTS = {
    "artifact": (layout.COMPRESS_ARTIFACT, artifact_model, "quantized",
                 layout.EVALUATE_METRICS, layout.EVALUATE_PROVENANCE),
    "trained": (layout.TRAIN_MODEL, build_model, "unquantized", layout.PREQUANT_METRICS, layout.PREQUANT_PROVENANCE),
}


def run(params: dict, ws: Workspace, weights: str = "artifact") -> None:
    cfg = section(params, "evaluate", EvaluateConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    model_file, build, key, metrics_file, provenance_file = WEIGHTS[weights]
    ctx = init_distributed(cfg.device)
    try:
        record = log_provenance("evaluate", {"evaluate": to_dict(cfg), "weights": weights, "data_dir": data_dir,
                                             "world_size": ctx.world_size}) if ctx.is_main else {}
        model = build(ws.input(model_file), ctx.device)
        vocab = model.config.vocab_size
        stream = checked_validation_set(ws.input(dataset_path(data_dir, vocab)),
                                        ws.input(tokenizer_file(data_dir, vocab)), vocab, cfg)
        if ctx.is_main:
            print(f"[pgolf evaluate] {ws.input(model_file)}: {stream.tokens.numel() - 1:,} validation targets, "
                  f"{stream.total_bytes():,} bytes ({stream.rule}) on {ctx.world_size} x {ctx.device}", flush=True)
        metrics = {"val_tokens": stream.tokens.numel() - 1, "val_bytes": stream.total_bytes(),
                   key: evaluate_model(key, model, stream, cfg, ctx)}
        if weights == "artifact":
            metrics["artifact_bytes"] = ws.input(model_file).stat().st_size
            metrics |= tax_against_prequant(metrics["quantized"], ws.input(layout.PREQUANT_METRICS),
                                            ws.input(layout.PREQUANT_PROVENANCE), cfg, metrics["val_bytes"])
        if ctx.is_main:
            commit(ws, metrics, metrics_file, provenance_file, record)
    finally:
        shutdown(ctx)


def commit(ws: Workspace, metrics: dict, metrics_file: str, provenance_file: str, record: dict) -> None:
    with stage_outputs() as out:
        out.write_json(ws.output(provenance_file), record)
        out.write_json(ws.output(metrics_file), metrics)
    print(f"[pgolf evaluate] metrics in {ws.output(metrics_file)}; `dvc metrics show` prints every stage's, "
          "`dvc metrics diff` compares runs", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="artifact",
                        help="score the compressed artifact (stage evaluate) or the trained weights (stage prequant)")
    return run_stage("evaluate", run, argv, parser,
                     processes=lambda params: section(params, "evaluate", EvaluateConfig).nproc_per_node)


if __name__ == "__main__":
    sys.exit(main())
