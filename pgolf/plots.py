"""Plot data and PNG images that DVC shows and a user can open offline.

DVC's HTML plots load vega from a CDN, so every stage also renders its plots
as PNG files (listed as DVC plots, shown as images) beside the CSV data that
``dvc plots diff`` reads. Writes are atomic.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgolf.atomic import atomic_open, atomic_path


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _figure(width: float = 8.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


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
