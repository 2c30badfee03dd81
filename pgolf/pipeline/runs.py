"""``pgolf runs``: every run side by side, each figure saying what it scored.

A row per run — the pipeline's own outputs, each hand-run directory (``runs/``, or the
directories named), and with ``--exps`` each DVC experiment — with the figures a researcher
compares: the trained weights' bpb (prequant), the quantized artifact's plain and sliding bpb
and TTT's, the quantization tax, the submission's bytes, and how many validation targets the
scores cover (of the validation split's) and the params digest of the scores (prequant's and
evaluate's: one when they were scored alike). bpb is printed to 5 decimals and bytes exactly (``dvc exp show`` rounds to 5
significant digits and needs a long ``--keep`` to show them). A run's params column names what
it was made with: for an experiment the params that differ from its baseline commit, for a
hand run the settings its stages recorded that differ from the pipeline's ``params.yaml``. Its
lineage column says whether a workspace's figures are one run's (``pgolf.pipeline.lineage``:
every file one version across their records): ``mixed`` when a stage was re-run without the
ones after it (``pgolf export --from DIR`` names the files).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgolf.pipeline import layout
from pgolf.pipeline.lineage import MixedInputs, consistent_set, targets_text
from pgolf.pipeline.stage import Workspace

METRICS = {"prequant": layout.PREQUANT_METRICS, "evaluate": layout.EVALUATE_METRICS, "compress": layout.COMPRESS_METRICS,
           "ttt": layout.TTT_METRICS}
PROVENANCE = {"train": layout.TRAIN_PROVENANCE, "prequant": layout.PREQUANT_PROVENANCE,
              "calibrate": layout.CALIBRATE_PROVENANCE, "quantize": layout.QUANTIZE_PROVENANCE,
              "compress": layout.COMPRESS_PROVENANCE, "evaluate": layout.EVALUATE_PROVENANCE,
              "ttt": layout.TTT_PROVENANCE}
COLUMNS = ("run", "params", "prequant", "quantized", "sliding", "ttt", "tax", "bytes", "targets", "digest", "lineage")


@dataclass
class Run:
    """One run's figures, from its metrics files (each keyed by the stage that wrote it)."""

    name: str
    params: str
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    lineage: str = "-"  # a workspace's: "one run", "mixed" or "unrecorded"; experiments: not checked

    def cells(self) -> list[str]:
        scored = self.metrics.get("prequant", {})
        prequant = scored.get("unquantized", {})
        evaluate = self.metrics.get("evaluate", {})
        quantized = evaluate.get("quantized", {})
        ttt = self.metrics.get("ttt", {})
        tax = evaluate.get("quantization_tax", {})
        total = self.metrics.get("compress", {}).get("total_bytes")
        return [self.name, self.params, bpb(prequant.get("sliding_val_bpb", prequant.get("val_bpb"))),
                bpb(quantized.get("val_bpb")), bpb(quantized.get("sliding_val_bpb")),
                bpb(ttt.get("val_bpb")) if ttt.get("enabled", True) else "off",
                signed(tax.get("sliding_val_bpb", tax.get("val_bpb"))),
                f"{total:,}" if isinstance(total, int) else "-", targets(evaluate, ttt), digests(scored, evaluate),
                self.lineage]


def bpb(value: Any) -> str:
    return f"{value:.5f}" if isinstance(value, (int, float)) else "-"


def signed(value: Any) -> str:
    return f"{value:+.5f}" if isinstance(value, (int, float)) else "-"


def targets(*scores: dict[str, Any]) -> str:
    """The validation targets each score covers, of the split's (one entry when they agree)."""
    scored = [targets_text(m["targets"], m.get("split_targets")) for m in scores if isinstance(m.get("targets"), int)]
    return " / ".join(dict.fromkeys(scored)) or "-"


def digests(*scores: dict[str, Any]) -> str:
    """The params digests of the scores (one entry when they agree)."""
    made = [m["params_digest"][:8] for m in scores if isinstance(m.get("params_digest"), str)]
    return " / ".join(dict.fromkeys(made)) or "-"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def workspace_run(name: str, root: Path, baseline: dict[str, Any]) -> Run | None:
    """The run whose outputs lie under ``root`` (None when it holds no metrics)."""
    metrics = {stage: found for stage, path in METRICS.items() if (found := read_json(root / path)) is not None}
    if not metrics:
        return None
    return Run(name, recorded_differences(root, baseline), metrics, lineage_state(root, list(metrics)))


def lineage_state(root: Path, stages: list[str]) -> str:
    """Whether the figures of ``stages`` under ``root`` are one run's: their records chain."""
    records = {stage: root / PROVENANCE[stage] for stage in stages}
    if any("lineage" not in (read_json(path) or {}) for path in records.values()):
        return "unrecorded"  # written before pgolf recorded lineage
    try:
        consistent_set(records, Workspace(root).find)
    except MixedInputs:
        return "mixed"
    return "one run"


def recorded_differences(root: Path, baseline: dict[str, Any]) -> str:
    """The settings the stages under ``root`` recorded that differ from ``baseline``'s sections."""
    changed: dict[str, Any] = {}
    for path in PROVENANCE.values():
        record = read_json(root / path) or {}
        for section, values in (record.get("config") or {}).items():
            if isinstance(values, dict) and isinstance(baseline.get(section), dict):
                changed |= {f"{section}.{k}": v for k, v in values.items() if baseline[section].get(k, v) != v}
    return ", ".join(f"{key}={value}" for key, value in sorted(changed.items())) or "as params.yaml"


def experiment_runs(repo: Path) -> list[Run]:
    """DVC's experiments, each with the params that differ from its baseline commit."""
    done = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"dvc exp show failed in {repo}: {' '.join(done.stderr.split())[-300:]}")
    runs = []
    for baseline in json.loads(done.stdout):
        if baseline["rev"] == "workspace":
            continue  # the pipeline's own row
        base_params = flat_params(baseline.get("data"))
        runs.append(experiment_run(baseline.get("name") or baseline["rev"][:7], baseline.get("data"), base_params))
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                runs.append(experiment_run(rev.get("name") or rev["rev"][:7], rev.get("data"), base_params))
    return runs


def flat_params(data: dict[str, Any] | None) -> dict[str, Any]:
    params = ((data or {}).get("params") or {}).get("params.yaml", {}).get("data") or {}
    return {f"{section}.{key}": value for section, values in params.items() if isinstance(values, dict)
            for key, value in values.items()}


def experiment_run(name: str, data: dict[str, Any] | None, base_params: dict[str, Any]) -> Run:
    params = flat_params(data)
    changed = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if base_params.get(k, v) != v)
    metrics = {}
    for stage, path in METRICS.items():
        found = ((data or {}).get("metrics") or {}).get(path, {}).get("data")
        if isinstance(found, dict):
            metrics[stage] = found
    return Run(name, changed or "baseline", metrics)


def table(runs: list[Run]) -> str:
    rows = [list(COLUMNS)] + [run.cells() for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgolf runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", help=f"hand-run directories (default: {layout.HAND_RUNS_DIR}/ if present)")
    parser.add_argument("--exps", action="store_true", help="also DVC's experiments (dvc exp show)")
    parser.add_argument("--params", default="params.yaml", help="the pipeline's params file (default: params.yaml)")
    args = parser.parse_args(argv)
    baseline = yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) if Path(args.params).is_file() else {}
    dirs = args.dirs or ([layout.HAND_RUNS_DIR] if Path(layout.HAND_RUNS_DIR).is_dir() else [])
    runs = [run for run in [workspace_run("pipeline (out/)", Path("."), baseline),
                            *(workspace_run(f"hand run ({d}/)", Path(d), baseline) for d in dirs)] if run]
    if args.exps:
        runs += experiment_runs(Path("."))
    if not runs:
        print("no run has metrics yet: `dvc repro` makes the pipeline's")
        return 0
    print(table(runs), end="")
    return 0
