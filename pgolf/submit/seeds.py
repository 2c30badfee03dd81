"""N seeds of one frozen configuration: run them, gather them, and read the baselines they are tested against.

:func:`run_seeds` runs the exported ``train_gpt.py`` once per seed, each in a folder of its
own under a runs directory (``seed_S/``: a byte-identical copy of the script, a link to the
challenge's data, the run's ``final_metrics.json`` and its log ``train_seed{S}.log``), with
``SEED=S`` in the environment as the challenge's records are run; every start is first
appended to the directory's ledger (``runs.jsonl``). :func:`gather` reads every run folder
back: the score from ``final_metrics.json``, held to the last score line of the run's log,
and disclosing runs that did not finish. It refuses to pool runs whose output-affecting
params (``pgolf.config.output_keys``) differ in anything but ``train.seed``, or whose
scripts differ, naming the key, and refuses a directory whose ledger lists a run that is no
longer there, so the statistics cover every seed tried. A baseline is another runs
directory, a records folder (its ``submission.json``, each seed's figure taken at full
precision from that seed's log where the log agrees), or a published record whose per-seed
scores pgolf carries in ``published_records.json`` (read from the challenge repository's
records by ``tools/published_records.py``). ``pgolf.submit.stats`` turns them into the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from pgolf.atomic import write_bytes
from pgolf.config import SECTIONS, output_keys
from pgolf.data.shards import file_sha256
from pgolf.submit.rundir import METRICS_FILE, SEED_ENV, artifact_score
from pgolf.submit.stats import Sample, SeedScore, comparison, markdown, summary

SCRIPT = "train_gpt.py"
LEDGER = "runs.jsonl"
RUN_PREFIX = "seed_"
REPORT_JSON, REPORT_MD = "seeds.json", "seeds.md"
SEED_KEY = "train.seed"  # the one output-affecting key that may differ between pooled runs
PUBLISHED = Path(__file__).with_name("published_records.json")
# a full-precision score line, as the runner and the records' scripts print them ("label val_loss:X val_bpb:Y")
SCORE_LINE = re.compile(r"^(?P<label>[A-Za-z][^\n]*?) val_loss:(?P<loss>\d+\.\d+) val_bpb:(?P<bpb>\d+\.\d+)", re.M)


class PoolError(ValueError):
    """Runs that are not seeds of one configuration."""


@dataclass(frozen=True)
class SeedRun:
    """One finished run of the exported script."""

    folder: Path
    seed: int
    params: dict[str, dict[str, Any]]  # the output-affecting params it ran with
    metrics: dict[str, Any]  # its final_metrics.json
    script_sha256: str | None  # of the train_gpt.py beside it, when there is one
    log: Path
    score: SeedScore

    def row(self) -> dict[str, Any]:
        """Its line in the per-seed table."""
        train = self.metrics.get("train", {})
        return {"seed": self.seed, "val_bpb": self.score.val_bpb, "val_loss": self.score.val_loss,
                "steps": train.get("steps"), "artifact_bytes": self.metrics.get("artifact_bytes"),
                "total_bytes": self.metrics.get("total_bytes"),
                "training_phase_s": self.metrics.get("training_phase_s"),
                "evaluation_phase_s": self.metrics.get("evaluation_phase_s"),
                "hardware": self.metrics.get("hardware"), "folder": self.folder.name, "source": self.score.source}


@dataclass(frozen=True)
class Unfinished:
    """A run that was started and left no metrics: disclosed, not scored."""

    folder: Path
    seed: int | None
    log: Path | None
    reason: str


@dataclass(frozen=True)
class RunSet:
    """The runs of one configuration: every finished one and every one that did not finish."""

    runs: tuple[SeedRun, ...]
    unfinished: tuple[Unfinished, ...]
    source: str

    def sample(self, label: str) -> Sample:
        return Sample(label, tuple(run.score for run in self.runs), self.source)


# ---------------------------------------------------------------- running


def run_seeds(script: Path, seeds: list[int], data_dir: Path, runs_dir: Path, nproc: int = 1,
              echo: Callable[[str], None] = lambda line: print(line, end="", flush=True)) -> dict[int, int]:
    """Run ``script`` once per seed under ``runs_dir``; each seed's exit code (0: finished)."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: a seed is listed twice")
    if not (data_dir / "datasets").is_dir():
        raise FileNotFoundError(f"{data_dir}: not the challenge's data folder (no datasets/ in it)")
    if not script.is_file():
        raise FileNotFoundError(f"{script}: not found (the bundle or export stage writes train_gpt.py)")
    taken = [str(runs_dir / f"{RUN_PREFIX}{seed}") for seed in seeds if (runs_dir / f"{RUN_PREFIX}{seed}").exists()]
    if taken:
        raise ValueError(f"{', '.join(taken)}: already there: a seed runs once (gather it, or use another runs "
                         "directory)")
    return {seed: run_seed(script, seed, data_dir, runs_dir, nproc, echo) for seed in seeds}


def run_seed(script: Path, seed: int, data_dir: Path, runs_dir: Path, nproc: int, echo: Callable[[str], None]) -> int:
    """One run in ``runs_dir/seed_S/``, entered in the ledger before it starts; its exit code."""
    folder = runs_dir / f"{RUN_PREFIX}{seed}"
    folder.mkdir(parents=True)
    shutil.copyfile(script, folder / SCRIPT)
    (folder / "data").symlink_to(data_dir.resolve(), target_is_directory=True)
    command = [sys.executable, SCRIPT] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
    with open(runs_dir / LEDGER, "a", encoding="utf-8") as ledger:
        ledger.write(json.dumps({"seed": seed, "folder": folder.name, "command": command,
                                 "script_sha256": file_sha256(script),
                                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}) + "\n")
    environment = {**os.environ, SEED_ENV: str(seed)}
    with open(folder / f"train_seed{seed}.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            echo(line)
        return process.wait()


# ---------------------------------------------------------------- gathering


def last_score_line(text: str) -> re.Match[str] | None:
    """The log's last full-precision score line: the submission's score in the runner's and the records' logs."""
    matches = list(SCORE_LINE.finditer(text))
    return matches[-1] if matches else None


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (metrics, a report), else one error naming the file: empty, not JSON, not one."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{path}: empty (a JSON object expected)")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}, not an object")
    return value


def read_metrics(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """A run's ``final_metrics.json`` with every key of ``required`` (dotted: nested), else one error naming the file
    and what is wrong with it (``read_object``, or every missing key)."""
    metrics = read_object(path)
    require_keys(metrics, required, path)
    return metrics


def require_keys(metrics: dict[str, Any], required: tuple[str, ...], path: Path) -> None:
    """Refuse ``metrics`` (read from ``path``) without a key of ``required``, naming every missing one."""
    missing = [key for key in required if not _has_key(metrics, key)]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}: not the {METRICS_FILE} of a finished run of this pgolf's "
                         "exported train_gpt.py (an older runner's, or edited); run it again with this pgolf's script")


def _has_key(metrics: dict[str, Any], dotted: str) -> bool:
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def run_score(metrics: dict[str, Any], path: Path) -> dict[str, float]:
    """A run's submission score: its top-level val_bpb when the runner wrote one (TTT's, with TTT), else the
    artifact's score."""
    if "val_bpb" in metrics:
        require_keys(metrics, ("val_loss",), path)
        return {"val_loss": metrics["val_loss"], "val_bpb": metrics["val_bpb"]}
    require_keys(metrics, ("quantized.val_loss", "quantized.val_bpb"), path)
    return artifact_score(metrics["quantized"])[1]


def read_run(folder: Path) -> SeedRun | Unfinished:
    """One run folder: its score (metrics held to its log), seed and params; or why it did not finish."""
    logs = sorted(folder.glob("*.log"))
    metrics_path = folder / METRICS_FILE
    if not metrics_path.is_file():
        last = logs[-1].read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if logs else []
        reason = f"no {METRICS_FILE}" + (f"; its log ends: {last[0][:200]}" if last else "; no log")
        return Unfinished(folder, _seed_from_name(folder.name), logs[-1] if logs else None, reason)
    metrics = read_metrics(metrics_path, ("seed", "params"))
    if len(logs) != 1:
        raise ValueError(f"{folder}: {len(logs)} *.log files; a run folder holds its one log (the score is checked "
                         "against it)")
    score = run_score(metrics, metrics_path)
    line = last_score_line(logs[0].read_text(encoding="utf-8", errors="replace"))
    if line is None or (line["bpb"], line["loss"]) != (f"{score['val_bpb']:.8f}", f"{score['val_loss']:.8f}"):
        found = "no score line" if line is None else f"val_bpb {line['bpb']}, val_loss {line['loss']}"
        raise ValueError(f"{folder}: {METRICS_FILE} scores val_bpb {score['val_bpb']:.8f}, val_loss "
                         f"{score['val_loss']:.8f}, but its log {logs[0].name} ends with {found}: not one run's files")
    script = folder / SCRIPT
    return SeedRun(folder, int(metrics["seed"]), metrics["params"], metrics,
                   file_sha256(script) if script.is_file() else None, logs[0],
                   SeedScore(int(metrics["seed"]), score["val_bpb"], score["val_loss"], f"{folder.name}/{logs[0].name}"))


def _seed_from_name(name: str) -> int | None:
    match = re.fullmatch(rf"{RUN_PREFIX}(\d+)", name)
    return int(match[1]) if match else None


def _is_run(folder: Path) -> bool:
    return (folder / METRICS_FILE).is_file() or (folder / SCRIPT).is_file() or any(folder.glob("*.log"))


def run_folders(path: Path) -> list[Path]:
    """``path`` itself when it is a run folder, else its run folders (every one its ledger lists), in run order."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: runs directory not found")
    if _is_run(path):
        return [path]
    folders = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
    ledger = path / LEDGER
    started = [json.loads(line)["folder"] for line in ledger.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if ledger.is_file() else []
    gone = sorted(set(started) - {folder.name for folder in folders})
    if gone:
        raise ValueError(f"{ledger}: run(s) {', '.join(gone)} were started but their folders are gone; every run "
                         "tried is part of the evidence")
    if not folders:
        raise ValueError(f"{path}: no run folders (each holds a {METRICS_FILE} and its log)")
    order = {name: i for i, name in enumerate(started)}  # the order they ran in, then by seed
    return sorted(folders, key=lambda f: (order.get(f.name, len(order)), _seed_from_name(f.name) or 0, f.name))


def gather(paths: list[Path]) -> RunSet:
    """Every run under ``paths``: the finished ones pooled (one configuration, distinct seeds), the rest disclosed."""
    items = [read_run(folder) for path in paths for folder in run_folders(path)]
    runs = tuple(item for item in items if isinstance(item, SeedRun))
    if not runs:
        raise ValueError(f"{', '.join(map(str, paths))}: no finished run to gather")
    check_pool(runs)
    return RunSet(runs, tuple(item for item in items if isinstance(item, Unfinished)), ", ".join(map(str, paths)))


def check_pool(runs: tuple[SeedRun, ...]) -> None:
    """Refuse runs that are not distinct seeds of one configuration, naming the key or the seed."""
    first, seen = runs[0], {}
    for run in runs:
        if run.seed in seen:
            raise PoolError(f"seed {run.seed} twice ({seen[run.seed]} and {run.folder}): each seed is one run")
        seen[run.seed] = run.folder
        differs = differing_key(first.params, run.params)
        if differs:
            key, ours, theirs = differs
            raise PoolError(f"cannot pool {run.folder} with {first.folder}: {key} is {theirs!r} in {run.folder.name} "
                            f"but {ours!r} in {first.folder.name}; only {SEED_KEY} may differ between the seeds of a "
                            "record")
        if None not in (first.script_sha256, run.script_sha256) and first.script_sha256 != run.script_sha256:
            raise PoolError(f"cannot pool {run.folder} with {first.folder}: their {SCRIPT} differ (sha256 "
                            f"{run.script_sha256[:16]} and {first.script_sha256[:16]}): the runs ran different code")


def differing_key(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> tuple[str, Any, Any] | None:
    """The first output-affecting ``section.key`` (other than the seed) whose values differ, with both values."""
    mine, other = affecting(ours), affecting(theirs)
    for key in sorted(set(mine) | set(other)):
        if mine.get(key, "(absent)") != other.get(key, "(absent)"):
            return key, mine.get(key, "(absent)"), other.get(key, "(absent)")
    return None


def affecting(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``section.key -> value`` of every key that shapes the outputs, the seed left out."""
    run_settings = {f"{name}.{key}" for name, cls in SECTIONS.items() for key in
                    (f.name for f in dataclasses.fields(cls)) if key not in output_keys(cls)}
    flat = {f"{name}.{key}": value for name, values in params.items() for key, value in values.items()}
    return {key: value for key, value in flat.items() if key not in run_settings and key != SEED_KEY}


# ---------------------------------------------------------------- baselines


def read_records_folder(folder: Path, results_key: str = "") -> Sample:
    """A records folder's per-seed scores: submission.json's, at full precision from each seed's agreeing log."""
    path = folder / "submission.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a records folder holds its submission.json)")
    info = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)  # keeps each figure's printed digits
    results = per_seed_results(info, results_key, path)
    logs = sorted(folder.rglob("*.log"))
    scores = tuple(seed_score(int(seed), figures, logs, folder) for seed, figures in results.items())
    return Sample(str(info.get("name") or folder.name), scores, str(folder))


def per_seed_results(info: dict[str, Any], results_key: str, path: Path) -> dict[str, dict[str, Any]]:
    """The submission's ``{seed: {val_bpb, val_loss, ...}}``: at ``results_key`` (dotted), else seed_results or seeds."""
    keys = [results_key] if results_key else ["seed_results", "seeds"]
    for key in keys:
        value: Any = info
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict) and value and all(isinstance(v, dict) and "val_bpb" in v for v in value.values()):
            return value
    raise ValueError(f"{path}: no per-seed results at {' or '.join(keys)} (a mapping seed -> {{val_bpb, ...}})")


def seed_score(seed: int, figures: dict[str, Any], logs: list[Path], folder: Path) -> SeedScore:
    """The seed's score from the one log whose last score line rounds to the published figure, else the figure."""
    published = float(figures["val_bpb"])
    digits = max(0, -Decimal(str(figures["val_bpb"])).as_tuple().exponent)  # 1.06400: 5 digits, not 3
    pattern = re.compile(rf"(?<![0-9])seed_?{seed}(?![0-9])")
    agreeing = []
    for log in (log for log in logs if pattern.search(log.name.lower())):
        line = last_score_line(log.read_text(encoding="utf-8", errors="replace"))
        if line and abs(float(line["bpb"]) - published) <= 0.5 * 10.0 ** -digits + 1e-12:
            agreeing.append((log, line))
    if len(agreeing) == 1:
        log, line = agreeing[0]
        return SeedScore(seed, float(line["bpb"]), float(line["loss"]), str(log.relative_to(folder)))
    loss = figures.get("val_loss")
    return SeedScore(seed, published, None if loss is None else float(loss), "submission.json")


def published_records() -> dict[str, dict[str, Any]]:
    return json.loads(PUBLISHED.read_text(encoding="utf-8"))["records"]


def published_record(name: str) -> Sample:
    """A published record by its PR number (``#1855``, ``1855``, ``#1868-rerun``), from pgolf's carried data."""
    records = published_records()
    key = name.removeprefix("#")
    if key not in records:
        raise ValueError(f"{name}: not a published record pgolf carries (known: "
                         f"{', '.join('#' + k for k in records)})")
    record = records[key]
    scores = tuple(SeedScore(int(seed), s["val_bpb"], s.get("val_loss"), s["source"])
                   for seed, s in record["seeds"].items())
    return Sample(f"#{key}", scores, f"{record['repository']}@{record['commit'][:12]}:{record['folder']}")


def load_baseline(spec: str) -> Sample:
    """``#PR`` (a published record), a records folder (has submission.json) or a directory of runs."""
    if spec.startswith("#") or spec.split("-")[0].isdigit():
        return published_record(spec)
    path = Path(spec)
    if (path / "submission.json").is_file():
        return read_records_folder(path)
    return gather([path]).sample(str(path))


# ---------------------------------------------------------------- the report


def seeds_report(runset: RunSet, baselines: list[Sample], label: str) -> dict[str, Any]:
    """Per-seed table, summary, undisclosed nothing, and both tests against each baseline (JSON-ready)."""
    sample = runset.sample(label)
    return {"label": label, "source": runset.source, "seeds": [run.seed for run in runset.runs],
            "runs": [run.row() for run in runset.runs],
            "unfinished": [{"folder": u.folder.name, "seed": u.seed, "reason": u.reason} for u in runset.unfinished],
            "params": runset.runs[0].params, "seed_key": SEED_KEY, "summary": summary(sample),
            "baselines": [comparison(sample, baseline) for baseline in baselines]}


def submission_fields(report: dict[str, Any]) -> dict[str, Any]:
    """What submission.json takes from the report: the mean score, every seed's, and the tests."""
    total = report["summary"]
    nats = total["nats"] or {"mean": None, "std": None}
    return {
        "val_loss": _round(nats["mean"]), "val_bpb": _round(total["bpb"]["mean"]),
        "val_loss_std": _round(nats["std"]), "val_bpb_std": _round(total["bpb"]["std"]), "seeds": report["seeds"],
        "seed_results": {str(r["seed"]): {"val_loss": _round(r["val_loss"]), "val_bpb": _round(r["val_bpb"]),
                                          "artifact_bytes": r["artifact_bytes"], "steps": r["steps"]}
                         for r in report["runs"]},
        "unfinished_runs": report["unfinished"],
        "statistics": {b["label"]: {"readme_rule_p": b["readme_rule"]["p"], "readme_rule_passes": b["readme_rule"]["passes"],
                                    "progression_p": b["progression"]["p"], "progression_passes": b["progression"]["passes"]}
                       for b in report["baselines"]},
    }


def write_report(dest: Path, report: dict[str, Any]) -> None:
    """``seeds.json`` and ``seeds.md`` in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    write_bytes(dest / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    write_bytes(dest / REPORT_MD, markdown(report).encode("utf-8"))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 8)
