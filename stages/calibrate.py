"""DVC stage ``calibrate``: trained weights + training shards -> GPTQ Hessians.

Rebuilds the model from ``out/train/model.pt`` (its configuration travels in the
file), switches looping on, runs ``calibration_batches`` batches of
``calibration_batch_tokens`` training tokens through it, drawn from the training
shards by the training sampler with the calibration seed, and writes the
Hessians ``Σ XᵀX / batches`` (docs/DESIGN.md §4) to
``out/calibrate/hessians.pt``; with ``output_sensitivity`` the same file also carries each
weight's output sensitivity (a backward pass per batch), which the rate–distortion
allocator can weigh its errors by.
"""

from __future__ import annotations

import sys

from pgolf.atomic import stage_outputs
from pgolf.clocks import Clocks
from pgolf.config import CalibrateConfig, TokenizeConfig, section, to_dict
from pgolf.data.shards import check_dataset, dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage
from pgolf.quant.calibrate import calibration_hessians, calibration_model
from pgolf.quant.hessians import save_hessians


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "calibrate", CalibrateConfig)
    data_dir = section(params, "tokenize", TokenizeConfig).data_dir
    ws = ws.begin("calibrate", params)
    record = log_provenance("calibrate", {"calibrate": to_dict(cfg), "tokenize.data_dir": data_dir})
    clocks = Clocks()
    model = calibration_model(ws.input(layout.TRAIN_MODEL), cfg)
    vocab = model.config.vocab_size
    dataset_dir = ws.input(dataset_path(data_dir, vocab))
    with clocks.phase("data_checks"):
        check_dataset(dataset_dir, ws.input(tokenizer_file(data_dir, vocab)), vocab, scan=("train",))
    with clocks.phase("calibration"):
        hessians, sensitivity = calibration_hessians(model, dataset_dir, cfg)
    clocks.record_process("whole_process")
    record["clocks"] = clocks.seconds
    destination = ws.output(layout.CALIBRATE_HESSIANS)
    with stage_outputs() as out:
        save_hessians(out.path(destination), hessians, sensitivity)
        ws.lineage.commit(out, ws.output(layout.CALIBRATE_PROVENANCE), record)
    print(f"[pgolf calibrate] {len(hessians)} Hessians from {cfg.calibration_batches} batches -> {destination}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_stage("calibrate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
