"""DVC stage ``plots``: every stage's plot data (CSV) -> PNG images in ``out/plots/images/``.

Reads the plot directories of train, quantize, compress and ttt and renders what each holds
(``pgolf.pipeline.plots``): ``train_loss.png`` (training and validation loss above the
learning-rate schedule), ``tensor_errors.png`` and, after a size search, ``fit_search.png``
(quantize), ``tensor_sizes.png`` (compress) and, with TTT, ``running_bpb.png``. It is the
only stage that imports the plotting code, so a change to a picture re-renders pictures and
re-runs nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.atomic import stage_outputs
from pgolf.pipeline import layout
from pgolf.pipeline.plots import (
    fit_search_plot,
    read_csv,
    running_bpb_plot,
    tensor_error_plot,
    tensor_size_plot,
    training_plot,
)
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage


def run(params: dict, ws: Workspace) -> None:
    ws = ws.begin("plots", params)
    record = log_provenance("plots", {})
    data = {name: read_csv(ws.input(path)) for name, path in (
        ("train", layout.TRAIN_CURVE), ("val", layout.TRAIN_VAL_CURVE), ("tensors", layout.QUANTIZE_TENSORS),
        ("fit", layout.QUANTIZE_FIT), ("sizes", layout.COMPRESS_SIZES), ("chunks", layout.TTT_CHUNKS))}
    with stage_outputs() as out:
        images = out.path(ws.output(layout.PLOTS_IMAGES))
        images.mkdir()
        drawn = render(images, data)
        ws.lineage.commit(out, ws.output(layout.PLOTS_PROVENANCE), record)
    print(f"[pgolf plots] {ws.output(layout.PLOTS_IMAGES)}: {', '.join(drawn) or 'no plot data yet'}", flush=True)


def render(images: Path, data: dict[str, list[dict[str, str]]]) -> list[str]:
    """Draw every plot whose data a stage wrote; the names of the images."""
    plots = {
        "train_loss.png": (data["train"], lambda path: training_plot(path, data["train"], data["val"])),
        "tensor_errors.png": (data["tensors"], lambda path: tensor_error_plot(path, data["tensors"])),
        "fit_search.png": (data["fit"], lambda path: fit_search_plot(path, data["fit"])),
        "tensor_sizes.png": (data["sizes"], lambda path: tensor_size_plot(path, data["sizes"])),
        "running_bpb.png": (data["chunks"], lambda path: running_bpb_plot(path, data["chunks"])),
    }
    drawn = []
    for name, (rows, draw) in plots.items():
        if rows:
            draw(images / name)
            drawn.append(name)
    return drawn


def main(argv: list[str] | None = None) -> int:
    return run_stage("plots", run, argv)


if __name__ == "__main__":
    sys.exit(main())
