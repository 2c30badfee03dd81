"""The PNG images of the stages' plot data, which a user can open offline.

Stages write their plot data as CSV (``dvc plots diff`` reads it); DVC's HTML plots load
vega from a CDN, so the plots stage (``stages/plots.py``) renders every CSV as a PNG too,
here. Only the plots stage imports this module, so a change to a picture re-runs nothing
else. Each ``*_plot`` function takes the rows of its CSV as ``csv.DictReader`` gives them
(strings), writes atomically, and the benchmarks use the same functions.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgolf.atomic import atomic_path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a plot-data CSV (empty when the stage wrote none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _figure(width: float = 8.0, height: float = 4.5, rows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=(width, height), dpi=100, sharex=rows > 1)


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def line_plot(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
) -> None:
    fig, ax = _figure()
    for label, ys in series.items():
        ax.plot(x, ys, label=label, marker="o" if len(x) <= 30 else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def bar_plot(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    xlabel: str,
    ylabel: str,
    title: str,
) -> None:
    fig, ax = _figure(width=max(8.0, 0.22 * len(labels)), height=5.0)
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def training_plot(path: str | Path, history: list[dict[str, str]], val_history: list[dict[str, str]]) -> None:
    """Training loss (and validation loss when it was computed) above the learning-rate schedule."""
    fig, (loss_ax, lr_ax) = _figure(height=6.0, rows=2)
    steps = [int(row["step"]) for row in history]
    loss_ax.plot(steps, [float(row["train_loss"]) for row in history], label="train loss")
    if val_history:
        loss_ax.plot([int(row["step"]) for row in val_history], [float(row["val_loss"]) for row in val_history],
                     marker="o", label="validation loss")
    loss_ax.set(ylabel="loss (nats)", title="Training")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(steps, [float(row["lr_scale"]) for row in history], color="tab:green")
    lr_ax.set(xlabel="step", ylabel="lr multiplier", ylim=(0, 1.05))
    lr_ax.grid(alpha=0.3)
    _save(fig, path)


def tensor_error_plot(path: str | Path, rows: list[dict[str, str]]) -> None:
    """The H-weighted relative error of every quantized tensor."""
    quantized = [row for row in rows if row["h_rel_error"] not in ("", "None") and row["method"] != "fp16"]
    bar_plot(path, [row["name"] for row in quantized], [float(row["h_rel_error"]) for row in quantized], "tensor",
             "tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)", "H-weighted relative quantization error")


def fit_search_plot(path: str | Path, points: list[dict[str, str]]) -> None:
    """The size search's tries: submission bytes against the knob it moved (matrix_clip_sigmas or
    rate_lambda), with the limit."""
    knob = points[0].get("knob", "clip_sigmas")
    points = sorted(points, key=lambda p: float(p[knob]))
    chosen = next(float(p[knob]) for p in points if p["chosen"] == "True")
    line_plot(path, [float(p[knob]) for p in points],
              {"submission bytes": [int(p["total_bytes"]) for p in points],
               "size limit": [int(p["size_limit_bytes"]) for p in points]},
              "matrix_clip_sigmas" if knob == "clip_sigmas" else knob, "bytes", f"Size search: chose {chosen:.4f}")


def tensor_size_plot(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Bits per weight of every tensor, coloured by kind, with its share of the bytes in the label."""
    fig, ax = _figure(width=max(8.0, 0.22 * len(rows)), height=5.5)
    total = sum(int(row["compressed_bytes"]) for row in rows) or 1
    colours = {"quantized": "tab:blue", "passthrough": "tab:orange"}
    for kind, colour in colours.items():
        xs = [i for i, row in enumerate(rows) if row["kind"] == kind]
        ax.bar(xs, [float(rows[i]["bits_per_weight"]) for i in xs], color=colour, label=kind)
    labels = [f"{row['tensor']} ({100 * int(row['compressed_bytes']) / total:.1f}%)" for row in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    # log scale: a tiny passthrough tensor pays its stream's fixed overhead, hundreds of bits per weight
    ax.set_yscale("log")
    ax.set(xlabel="tensor (share of the compressed bytes)", ylabel="compressed bits per weight (log scale)",
           title="Compressed size per tensor (each compressed alone)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def running_bpb_plot(path: str | Path, chunks: list[dict[str, str]]) -> None:
    """Test-time training: the bpb of everything scored so far, chunk by chunk in scoring order."""
    line_plot(path, [int(row["chunk"]) for row in chunks],
              {"running bpb": [float(row["running_bpb"]) for row in chunks]},
              "chunk (sgd_all, adamw_tail) or document group (lora_doc, phased), in scoring order", "bpb",
              "Test-time training: running bpb")


def rate_distortion_plot(path: str | Path, points: list[dict[str, Any]], sdclip_bytes: int) -> None:
    """Bytes against bpb (above) and against the total H-weighted error (below), one line per method."""
    fig, (bpb_ax, err_ax) = _figure(height=7.0, rows=2)
    methods = sorted({p["method"] for p in points})
    for method in methods:
        curve = sorted((p["total_bytes"], p["bpb"], p["h_error"]) for p in points if p["method"] == method)
        bpb_ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", label=method)
        err_ax.plot([c[0] for c in curve], [c[2] for c in curve], "o-", label=method)
    for ax, label in ((bpb_ax, "validation bpb"), (err_ax, "Σ H-weighted error")):
        ax.axvline(sdclip_bytes, color="grey", linestyle=":", label="SDClip at the record's settings")
        ax.set_xlabel("submission bytes (artifact + code)")
        ax.set_ylabel(label)
        ax.legend()
    err_ax.set_yscale("log")
    bpb_ax.set_title("Rate–distortion: bytes against quantized bpb and H-weighted error")
    _save(fig, path)
