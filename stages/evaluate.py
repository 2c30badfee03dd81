"""DVC stage ``evaluate``: val_loss and val_bpb of the compressed artifact, and the quantization tax.

Rebuilds the model from ``out/compress/artifact.ptz`` exactly as a submission would
(decompress, deserialize, dequantize), so the score includes every loss of the round trip,
scores it with looping on by the plain and the sliding evaluation that ``evaluate:``
switches on, on one process or N under torchrun, and adds the quantization tax against the
prequant stage's scores of the trained weights (when both were scored alike).
"""

from __future__ import annotations

import sys

from pgolf.artifact.load import artifact_model
from pgolf.clocks import Clocks
from pgolf.config import EvaluateConfig, TokenizeConfig, section, to_dict
from pgolf.data.shards import dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.distributed import init_distributed, shutdown
from pgolf.eval.score import checked_validation_set, score_validation, tax_against_prequant
from pgolf.fingerprint import data_fingerprint
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, evaluate_processes, run_stage


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "evaluate", EvaluateConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    ws = ws.begin("evaluate", params)
    ctx = init_distributed(cfg.device)
    try:
        record = log_provenance("evaluate", {"evaluate": to_dict(cfg), "data_dir": data_dir,
                                             "world_size": ctx.world_size}) if ctx.is_main else {}
        clocks = Clocks.on_rank(ctx)
        artifact = ws.input(layout.COMPRESS_ARTIFACT)
        with clocks.phase("evaluation_phase"):
            with clocks.phase("decompression"):
                model = artifact_model(artifact, ctx.device)
            vocab = model.config.vocab_size
            dataset_dir, tokenizer = ws.input(dataset_path(data_dir, vocab)), ws.input(tokenizer_file(data_dir, vocab))
            with clocks.phase("data_checks"):  # the manifest check: the exported script reads the split unchecked
                stream = checked_validation_set(dataset_dir, tokenizer, vocab, cfg)
            metrics = score_validation("quantized", model, artifact, stream, cfg, ctx, clocks)
        metrics["artifact_bytes"] = artifact.stat().st_size
        metrics |= tax_against_prequant(metrics["quantized"], ws.reference(layout.PREQUANT_METRICS),
                                        ws.input(layout.PREQUANT_PROVENANCE), cfg, metrics["val_bytes"])
        if ctx.is_main:
            clocks.record_process("whole_process")
            record |= {"clocks": clocks.seconds, "fingerprint": data_fingerprint(dataset_dir, tokenizer, stream)}
            ws.lineage.commit_score(ws.output(layout.EVALUATE_METRICS), metrics, dataset_dir,
                                    ws.output(layout.EVALUATE_PROVENANCE), record)
            print(f"[pgolf evaluate] metrics in {ws.output(layout.EVALUATE_METRICS)}; `dvc metrics show` prints "
                  "every stage's, `dvc metrics diff` compares runs", flush=True)
    finally:
        shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", run, argv, processes=evaluate_processes)


if __name__ == "__main__":
    sys.exit(main())
