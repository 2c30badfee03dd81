"""Plot data and PNG images that DVC shows and a user can open offline.

DVC's HTML plots load vega from a CDN, so every stage also renders its plots
as PNG files (listed as DVC plots, shown as images) beside the CSV data that
``dvc plots diff`` reads. Writes are atomic.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgolf.atomic import atomic_open, atomic_path

if TYPE_CHECKING:  # only for annotations: plotting needs no GPTQ
    from pgolf.quant.fit import FitResult


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


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


def training_plot(path: str | Path, history: list[dict[str, Any]], val_history: list[dict[str, Any]]) -> None:
    """Training loss (and validation loss when it was computed) above the learning-rate schedule."""
    fig, (loss_ax, lr_ax) = _figure(height=6.0, rows=2)
    steps = [row["step"] for row in history]
    loss_ax.plot(steps, [row["train_loss"] for row in history], label="train loss")
    if val_history:
        loss_ax.plot([row["step"] for row in val_history], [row["val_loss"] for row in val_history],
                     marker="o", label="validation loss")
    loss_ax.set(ylabel="loss (nats)", title="Training")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(steps, [row["lr_scale"] for row in history], color="tab:green")
    lr_ax.set(xlabel="step", ylabel="lr multiplier", ylim=(0, 1.05))
    lr_ax.grid(alpha=0.3)
    _save(fig, path)


def quantization_plots(directory: Path, rows: list[dict[str, Any]], fit: FitResult | None, limit: int) -> None:
    """Per-tensor error (CSV + bar chart) and, after a size search, its points (CSV + line plot)."""
    write_csv(directory / "tensors.csv", [{**row, "shape": "x".join(map(str, row["shape"]))} for row in rows])
    quantized = [row for row in rows if row["h_rel_error"] is not None and row["method"] != "fp16"]
    if quantized:
        bar_plot(directory / "tensor_errors.png", [row["name"] for row in quantized],
                 [row["h_rel_error"] for row in quantized], "tensor",
                 "tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)", "H-weighted relative quantization error")
    if fit is None:
        return
    points = sorted(fit.points, key=lambda p: p.clip_sigmas)
    write_csv(directory / "fit_search.csv", [
        {"step": fit.points.index(p), "clip_sigmas": p.clip_sigmas, "total_bytes": p.total_bytes,
         "fits": p.fits, "size_limit_bytes": limit} for p in points
    ])
    line_plot(directory / "fit_search.png", [p.clip_sigmas for p in points],
              {"submission bytes": [p.total_bytes for p in points], "size limit": [limit] * len(points)},
              "matrix_clip_sigmas", "bytes", f"Size search: chose {fit.clip_sigmas:.4f}")


def tensor_size_plot(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Bits per weight of every tensor, coloured by kind, with its share of the bytes in the label."""
    fig, ax = _figure(width=max(8.0, 0.22 * len(rows)), height=5.5)
    total = sum(row["compressed_bytes"] for row in rows) or 1
    colours = {"quantized": "tab:blue", "passthrough": "tab:orange"}
    for kind, colour in colours.items():
        xs = [i for i, row in enumerate(rows) if row["kind"] == kind]
        ax.bar(xs, [rows[i]["bits_per_weight"] for i in xs], color=colour, label=kind)
    labels = [f"{row['tensor']} ({100 * row['compressed_bytes'] / total:.1f}%)" for row in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    # log scale: a tiny passthrough tensor pays its stream's fixed overhead, hundreds of bits per weight
    ax.set_yscale("log")
    ax.set(xlabel="tensor (share of the compressed bytes)", ylabel="compressed bits per weight (log scale)",
           title="Compressed size per tensor (each compressed alone)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def running_bpb_plot(path: str | Path, chunks: list[dict[str, Any]], method: str) -> None:
    """Test-time training: the bpb of everything scored so far, chunk by chunk in scoring order."""
    line_plot(path, [row["chunk"] for row in chunks], {"running bpb": [row["running_bpb"] for row in chunks]},
              "chunk (sgd_all, adamw_tail) or document group (lora_doc, phased), in scoring order", "bpb",
              f"TTT {method}: running bpb")


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
