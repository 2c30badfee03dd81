"""A records folder from a finished run: the script, submission.json, README, requirements, logs, compliance.

The challenge accepts an entry as a folder under ``records/track_10min_16mb/`` holding the
``train_gpt.py`` that the organisers run, a ``submission.json``, a ``README.md`` and the
run's logs. :func:`write_records_folder` fills one from the bundle stage's script (copied,
byte for byte what compress counted) and the stages' metrics and provenance, adds the
``requirements.txt`` found from the bundled modules' imports and ``compliance.json``: each
rule of the challenge with its figure, its limit, whether it holds and how that is
guaranteed. The submission's score is the one the script computes: the TTT score (the ttt
stage's) when the script test-time trains, else the sliding-window one, and ``submission.json``
and the README say which. Times measured by running the exported script (its
``final_metrics.json``: every phase's clock, ``pgolf.clocks``) are used where given, the run
made this submission (:func:`measured_run`: the script's and the artifact's sha256) and it ran
on the declared hardware; the compliance report says which clock each 600 s budget
uses and what it counts, and checks calibration against ``train.gptq_reserve_seconds``.
``submission.json`` carries the run's fingerprint (``pgolf.fingerprint``: data, tokenizer,
byte accounting, versions, GPUs, attention kernels), the measured run's when given, else the
pipeline's (its evaluate and train stages' provenance). Every figure comes from one run's
consistent set (:func:`lineage_of`: the pipeline's outputs, or a named hand-run directory's,
each stage's record chaining to the files the next read, each made with the params the
script bakes); ``submission.json``'s ``provenance`` and the README say which run, each
figure's params digest and how many validation targets it covers. Given the report of the script's seed
runs (``pgolf.submit.seeds``), the folder scores the mean of every seed, lists each seed in
``submission.json`` and the README's results table, carries every run's log and metrics,
writes ``seeds.json``/``seeds.md``, judges the time rules by each clock's slowest run (the
seeds must share one fingerprint) and adds the record's tests to the compliance report.
Every folder it writes lists its files with their sha256 in ``.pgolf-export.json``, and it
replaces no folder holding a file it did not write (:func:`check_replaceable`).
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pgolf.atomic import atomic_path
from pgolf.clocks import EVALUATION, PHASES, TRAINING
from pgolf.config import ExportConfig
from pgolf.data.shards import file_sha256
from pgolf.pipeline import layout
from pgolf.pipeline.lineage import SHORT, check_baked, consistent_set, targets_text
from pgolf.submit.bundle import read_bundle, read_params
from pgolf.submit.rundir import METRICS_FILE, artifact_score
from pgolf.submit.sections import expand_baked
from pgolf.submit.seeds import (
    REPORT_JSON,
    REPORT_MD,
    SCRIPT,
    RunSet,
    gather,
    load_baseline,
    read_metrics,
    read_object,
    require_keys,
    seeds_report,
    submission_fields,
)
from pgolf.submit.stats import markdown, seeds_table, tests_section

TRACK = "10min_16mb"
TIME_LIMIT_S = 600.0
NETWORK_MODULES = frozenset({"socket", "ssl", "http", "urllib", "ftplib", "smtplib", "requests", "urllib3",
                             "httpx", "aiohttp", "huggingface_hub", "datasets"})
# the stages whose provenance and metrics travel as the folder's logs
LOGGED = {"tokenize": (layout.TOKENIZE_PROVENANCE, layout.TOKENIZE_METRICS),
          "train": (layout.TRAIN_PROVENANCE, layout.TRAIN_METRICS),
          "prequant": (layout.PREQUANT_PROVENANCE, layout.PREQUANT_METRICS),
          "calibrate": (layout.CALIBRATE_PROVENANCE, None),
          "quantize": (layout.QUANTIZE_PROVENANCE, layout.QUANTIZE_REPORT),
          "compress": (layout.COMPRESS_PROVENANCE, layout.COMPRESS_METRICS),
          "evaluate": (layout.EVALUATE_PROVENANCE, layout.EVALUATE_METRICS),
          "ttt": (layout.TTT_PROVENANCE, layout.TTT_METRICS)}
# each 600 s budget: the clock it is judged by (pgolf.clocks.PHASES lists what each clock counts)
BUDGET_CLOCKS = {TRAINING: "training_phase", EVALUATION: "evaluation_phase"}
# the fingerprint fields seeds pooled into one record must share (the data and what ran it)
SHARED_ENVIRONMENT = ("torch", "cuda", "cudnn", "device", "gpu", "gpu_count", "attention", "coder")
# what the folder reads from a run's final_metrics.json (dotted: nested): the times the rules judge, where it ran
RUN_TIMES = ("hardware", "clocks.training_phase", "clocks.evaluation_phase", "calibration_reserve.calibration_s",
             "calibration_reserve.overran", "calibration_reserve.training_data_read_until_s",
             *(f"fingerprint.data.{key}" for key in ("dataset", "manifest_sha256", "docs_sha256", "published",
                                                     "train_shards", "val_tokens", "val_bytes", "tokenizer_sha256",
                                                     "byte_accounting")),
             *(f"fingerprint.environment.{key}" for key in ("python", "torch", "cuda", "cudnn", "device", "gpu",
                                                            "gpu_count", "attention", "system_binaries")))
SEED_TIMES = (*RUN_TIMES, "device", "training_phase_s", "evaluation_phase_s")  # and what the seeds' slowest run takes
# what makes a run this submission's: the script it ran and the artifact it made
RUN_IDENTITY = ("code_sha256", "code_bytes", "artifact_sha256", "artifact_bytes")
# in every folder export writes: each file it wrote with its sha256, so that a later export replaces only those
EXPORT_MARKER = ".pgolf-export.json"


@dataclass(frozen=True)
class RunRecord:
    """What the pipeline (and, when given, a run of the exported script) measured."""

    script: str  # the exported train_gpt.py
    compress: dict[str, Any]  # out/compress/metrics.json
    evaluate: dict[str, Any]
    prequant: dict[str, Any]
    train: dict[str, Any]
    measured: dict[str, Any] | None  # final_metrics.json of the exported script's own run (the slowest of its seeds)
    seeds: dict[str, Any] | None = None  # pgolf.submit.seeds.seeds_report of the script's runs, one per seed
    ttt: dict[str, Any] | None = None  # out/ttt/metrics.json, when the script test-time trains (ttt_record)
    fingerprint: dict[str, Any] | None = None  # the pipeline's (pipeline_fingerprint), when its stages recorded one
    provenance: dict[str, Any] | None = None  # which run each figure comes from, its params digest and targets

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        return baked_params(self.script)

    @property
    def scored_by(self) -> str:
        """Which score is the submission's: ``ttt`` when the script test-time trains, else ``sliding`` or ``plain``."""
        return "ttt" if self.params["ttt"]["enabled"] else artifact_score(self.evaluate["quantized"])[0]

    @property
    def final(self) -> dict[str, float]:
        """val_loss and val_bpb of the submission: the TTT score with TTT, else the sliding one when there is one."""
        if self.scored_by == "ttt":
            return {"val_loss": self.ttt["val_loss"], "val_bpb": self.ttt["val_bpb"]}
        return artifact_score(self.evaluate["quantized"])[1]

    @property
    def run_fingerprint(self) -> dict[str, Any] | None:
        """The measured run's fingerprint, else the pipeline's; with where it comes from."""
        if self.measured is not None:
            return {"source": f"the exported train_gpt.py's run ({METRICS_FILE})", **self.measured["fingerprint"]}
        return self.fingerprint


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the pipeline to the evaluate stage first)")
    return read_object(path)


def measured_run(folder: Path, script: str, artifact: Path, artifact_bytes: int) -> dict[str, Any]:
    """``folder``'s final_metrics.json when it is a run of ``script`` that made this submission's ``artifact``, else
    one error naming the file and what differs (or the keys it lacks)."""
    path = folder / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (--measured names a folder where the exported train_gpt.py ran "
                                "to its end)")
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact}: not found (the compress stage writes it; --measured holds the run to it)")
    measured = read_metrics(path, (*RUN_IDENTITY, *RUN_TIMES))
    code = script.encode("utf-8")
    ours = {"code_sha256": hashlib.sha256(code).hexdigest(), "code_bytes": len(code),
            "artifact_sha256": file_sha256(artifact), "artifact_bytes": artifact_bytes}
    differs = [f"{key} {measured[key]} (this submission's: {value})" for key, value in ours.items()
               if measured[key] != value]
    if differs:
        raise ValueError(f"{path} is another run's: {'; '.join(differs)}; --measured takes a run of this "
                         "submission's train_gpt.py that made its artifact")
    return measured


def check_replaceable(dest: Path) -> None:
    """Refuse ``dest`` unless it is absent, empty, or a folder export wrote that nobody changed since: an export
    never deletes what pgolf did not write (another submission's script, logs, README)."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ValueError(f"{dest}: not a folder; refusing to replace it with a records folder")
    if not dest.exists():
        return
    written = exported_files(dest)
    found = sorted(path.relative_to(dest).as_posix() for path in dest.rglob("*")
                   if path.is_symlink() or not path.is_dir())
    foreign = [name for name in found if name != EXPORT_MARKER and
               ((dest / name).is_symlink() or written.get(name) != file_sha256(dest / name))]
    if foreign:
        whose = "added or changed since pgolf export wrote the folder" if written else \
            f"no {EXPORT_MARKER}: not a folder pgolf export wrote"
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{dest}: holds {shown} ({whose}); refusing to replace it: give --dest a folder of its own, "
                         "or move them away first")


def exported_files(folder: Path) -> dict[str, str]:
    """The files ``folder``'s marker says export wrote, with their sha256 ({} without a readable marker)."""
    try:
        files = read_object(folder / EXPORT_MARKER).get("files")
    except (OSError, ValueError):
        return {}
    return files if isinstance(files, dict) else {}


def ttt_record(baked: dict[str, Any], metrics_path: Path) -> dict[str, Any] | None:
    """The ttt stage's metrics when the script bakes ``ttt.enabled`` (with the baked ``ttt:``: ``lineage_of``)."""
    if not baked["enabled"]:
        return None
    metrics = read_json(metrics_path)
    if not metrics.get("enabled"):
        raise ValueError(f"{metrics_path}: the ttt stage did not test-time train, but the script bakes ttt.enabled: "
                         "true (its score is the TTT score): re-run the ttt stage")
    return metrics


# the stages whose figures a records folder shows: their metrics, and what each stands for in the README
FIGURES = {"train": (layout.TRAIN_PROVENANCE, layout.TRAIN_METRICS, "Steps"),
           "prequant": (layout.PREQUANT_PROVENANCE, layout.PREQUANT_METRICS, "Pre-quant BPB"),
           "compress": (layout.COMPRESS_PROVENANCE, layout.COMPRESS_METRICS, "Artifact and code bytes"),
           "evaluate": (layout.EVALUATE_PROVENANCE, layout.EVALUATE_METRICS, "Post-quant and sliding BPB"),
           "ttt": (layout.TTT_PROVENANCE, layout.TTT_METRICS, "TTT BPB")}


def baked_params(script: str) -> dict[str, dict[str, Any]]:
    """Every output key the exported ``script`` bakes, with those it leaves to the defaults filled in as its runner
    fills them (``compress.bake_params: changed``)."""
    return expand_baked(read_params(script))


def lineage_of(locate: Callable[[str], Path], root: Path, script: Path, ttt: bool) -> dict[str, Any]:
    """Which run the figures come from, each one's params digest and targets; refused for a mixed set.

    ``locate`` finds a pipeline path in the source (``root``: ``.`` for the pipeline). The
    stages' records must chain, every file with one version (``consistent_set``), and every
    stage behind them must have run with the params ``script`` bakes (``check_baked``).
    """
    stages = [stage for stage in FIGURES if ttt or stage != "ttt"]
    records = consistent_set({stage: locate(FIGURES[stage][0]) for stage in stages}, locate)
    check_baked(records, baked_params(script.read_text(encoding="utf-8")), script)
    figures = {}
    for stage in stages:
        path = locate(FIGURES[stage][1])
        metrics = read_json(path)
        figures[stage] = {"figure": FIGURES[stage][2], "file": path.as_posix(),
                          "params_digest": metrics.get("params_digest"),
                          "targets": metrics.get("targets"), "split_targets": metrics.get("split_targets")}
    used = {layout.BUNDLE_SCRIPT: script} | {FIGURES[stage][1]: Path(figures[stage]["file"]) for stage in stages}
    return {"source": source_of(root, used), "figures": figures}


def source_of(root: Path, used: dict[str, Path]) -> str:
    """The run the files ``used`` (pipeline path -> where read) come from, in words."""
    if root == Path("."):
        return "the pipeline's outputs (out/)"
    own = sorted({Path(name).parts[1] for name, path in used.items() if path == root / name})
    others = sorted({Path(name).parts[1] for name, path in used.items() if path != root / name})
    return (f"the hand-run directory {root.as_posix()}/ (its own {', '.join(own) or 'nothing'}"
            + (f"; the pipeline's {', '.join(others)}" if others else "") + ")")


def pipeline_fingerprint(train_provenance: Path, evaluate_provenance: Path) -> dict[str, Any] | None:
    """The data the evaluate stage read and the environment training ran in, from their provenance."""
    if not (train_provenance.is_file() and evaluate_provenance.is_file()):
        return None
    trained, evaluated = read_json(train_provenance), read_json(evaluate_provenance)
    if "fingerprint" not in evaluated or "environment" not in trained:
        return None  # written before pgolf recorded fingerprints
    return {"source": f"the pipeline: {evaluate_provenance} (data), {train_provenance} (environment)",
            "data": evaluated["fingerprint"], "environment": trained["environment"],
            "evaluation_environment": evaluated["environment"]}


def third_party_imports(files: dict[str, str]) -> set[str]:
    """Top-level modules outside the standard library and pgolf that the sources import unconditionally.

    An import inside ``try: ... except ImportError`` is optional (flash attention) and not required.
    """
    names: set[str] = set()
    for name, source in files.items():
        tree = ast.parse(source, filename=name)
        optional = {id(node) for handler_try in ast.walk(tree) if isinstance(handler_try, ast.Try)
                    and any(_catches_import_error(h) for h in handler_try.handlers)
                    for stmt in handler_try.body for node in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("pgolf", "__future__")}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in caught)


def requirements(script: str) -> list[str]:
    """The distributions the script's imports come from (its bootstrap's too), one line each with the version used."""
    bundle = read_bundle(script)
    modules = third_party_imports({**bundle["files"], "train_gpt.py": script})
    providers = metadata.packages_distributions()
    missing = sorted(m for m in modules if m not in providers)
    if missing:
        raise ValueError(f"the bundle imports {', '.join(missing)}, which no installed distribution provides")
    dists = sorted({providers[m][0] for m in modules}, key=str.lower)
    return [f"{dist}  # {metadata.version(dist)} when exported" for dist in dists]


def compliance(run: RunRecord, cfg: ExportConfig) -> dict[str, Any]:
    """Every rule of the track: figure, limit, status (pass | fail | not measured) and how it is guaranteed.

    ``clocks`` says which clock each 600 s budget is judged by, what each clock counts, what
    counts toward neither, and whether the measured run ran on the declared hardware.
    """
    files = read_bundle(run.script)["files"]
    train, evaluate = run.params["train"], run.params["evaluate"]
    code = len(run.script.encode("utf-8"))
    if code != run.compress["code_bytes"]:
        raise ValueError(f"the script has {code:,} bytes but compress counted {run.compress['code_bytes']:,}: "
                         "re-run the bundle and compress stages")
    total = run.compress["artifact_bytes"] + code
    imported = {name for source in [*files.values(), run.script] for name in _all_imports(source)}
    cap = train["max_wallclock_seconds"]
    rules = {
        "artifact_under_16mb": _rule(
            total, run.compress["limit"], "pass" if total <= run.compress["limit"] else "fail",
            f"{run.compress['artifact_bytes']:,} artifact + {code:,} code bytes (the exported train_gpt.py itself, "
            "counted by the compress stage's gate; the runner's gate refuses a larger submission)"),
        "train_under_600s": _timing(
            run, TRAINING, cfg,
            f"the training loop stops at train.max_wallclock_seconds={cap:g} s minus "
            f"train.gptq_reserve_seconds={train['gptq_reserve_seconds']:g} s kept for calibration and GPTQ"
            + ("" if cap > 0 else " (no cap set: this run is scheduled by steps, not guaranteed)")),
        "eval_under_600s": _timing(
            run, EVALUATION, cfg, "the artifact's decompression, every evaluation"
            + (" and test-time training" if run.scored_by == "ttt" else "") + ", timed by the exported script"),
        "calibration_within_reserve": _reserve_rule(run, cfg),
        "no_training_data_in_eval": _rule(
            None, None, "pass",
            "evaluation reads only the fineweb_val_* shards and the tokenizer (pgolf.eval.score.validation_set); "
            "calibration reads training shards inside the training phase, before the artifact is written"),
        "no_network": _rule(
            sorted(imported & NETWORK_MODULES), [], "pass" if not imported & NETWORK_MODULES else "fail",
            "no bundled module imports a network module; torchrun's rendezvous is local (--standalone)"),
        "causal_scoring": _rule(
            None, None, "pass",
            "issue #1017 condition 1: causal attention; a sliding window scores its last stride positions "
            "from the tokens before them only"),
        "full_normalized_distribution": _rule(
            None, None, "pass",
            f"condition 2: cross-entropy over all {run.params['model']['vocab_size']} logits (softmax of the full "
            "vocabulary), fixed before the target is read"),
        "score_before_update": _score_before_update(run),
        "single_pass": _rule(
            None, None, "pass",
            f"condition 4: one left-to-right pass, every target scored exactly once (plain windows partition the "
            f"tokens; sliding windows of {evaluate['eval_seq_len']} at stride {evaluate['eval_stride']} score "
            "disjoint ranges: tests/eval/test_score.py::test_sliding_windows_score_every_target_exactly_once)"),
    }
    rules |= seed_rules(run.seeds)
    return {"track": TRACK, "declared_hardware": cfg.hardware, "clocks": clocks_report(run, cfg), "rules": rules,
            "all_pass": all(rule["status"] == "pass" for rule in rules.values())}


def clocks_report(run: RunRecord, cfg: ExportConfig) -> dict[str, Any]:
    """Each budget's clock and the phases it counts, what counts toward neither, and the measured seconds."""
    measured = run.measured["clocks"] if run.measured is not None else {}
    budgets = {budget: {"limit_s": TIME_LIMIT_S, "clock": clock, "measured_s": measured.get(clock),
                        "counts": {name: {"what": what, "measured_s": measured.get(name)}
                                   for name, (counted, what) in PHASES.items() if counted == budget and name != clock}}
               for budget, clock in BUDGET_CLOCKS.items()}
    neither = {name: {"what": what, "measured_s": measured.get(name)}
               for name, (counted, what) in PHASES.items() if counted is None}
    return {"budgets": budgets, "counted_by_neither": neither, "declared_hardware": cfg.hardware,
            "measured_on": None if run.measured is None else run.measured["hardware"],
            "on_declared_hardware": run.measured is not None and on_declared_hardware(cfg.hardware, run.measured)}


def on_declared_hardware(declared: str, measured: dict[str, Any]) -> bool:
    """Whether a run's GPUs are the declared ones: ``8xH100 80GB SXM`` is 8 GPUs whose name holds ``H100``."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\S+).*", declared)
    env = measured["fingerprint"]["environment"]
    return bool(match) and env["device"] == "cuda" and env["gpu_count"] == int(match[1]) \
        and match[2].lower() in env["gpu"].lower()


def _timing(run: RunRecord, budget: str, cfg: ExportConfig, how: str) -> dict[str, Any]:
    """A budget's rule, judged by its clock in the exported script's own run on the declared hardware."""
    clock = BUDGET_CLOCKS[budget]
    counted = [name for name, (counts, _) in PHASES.items() if counts == budget and name != clock]
    how = f"{how}; clock {clock} = {' + '.join(counted)} (compliance.json clocks: what each counts)"
    measured = run.measured
    if measured is None:
        return _rule(None, TIME_LIMIT_S, "not measured", f"{how}; not measured on {cfg.hardware}: run train_gpt.py "
                     "there and export with --measured or --seeds")
    seconds = measured["clocks"][clock]
    parts = ", ".join(f"{name} {measured['clocks'][name]:.1f} s" for name in counted if name in measured["clocks"])
    if not on_declared_hardware(cfg.hardware, measured):
        return _rule(None, TIME_LIMIT_S, "not measured", f"{how}; measured {seconds:.1f} s on "
                     f"{measured['hardware']} ({parts}), not the declared {cfg.hardware}")
    return _rule(seconds, TIME_LIMIT_S, "pass" if seconds <= TIME_LIMIT_S else "fail",
                 f"{how}; measured by train_gpt.py on {measured['hardware']} (declared: {cfg.hardware}): {parts}")


def _reserve_rule(run: RunRecord, cfg: ExportConfig) -> dict[str, Any]:
    """Calibration, the last read of training data, within the reserve the loop left it (train.gptq_reserve_seconds)."""
    reserve = run.params["train"]["gptq_reserve_seconds"]
    how = ("clock calibration (the loop's end to the last training batch read for the Hessians) against "
           f"train.gptq_reserve_seconds={reserve:g} s: beyond it, training data is read past the loop's budget")
    if run.measured is None:
        return _rule(None, reserve, "not measured", f"{how}; no run of train_gpt.py given")
    check = run.measured["calibration_reserve"]
    seen = (f"calibration {check['calibration_s']:.1f} s, training data read until "
            f"{check['training_data_read_until_s']:.1f} s on the training clock, on {run.measured['hardware']}")
    if not on_declared_hardware(cfg.hardware, run.measured):
        return _rule(None, reserve, "not measured", f"{how}; {seen}, not the declared {cfg.hardware}")
    return _rule(check["calibration_s"], reserve, "fail" if check["overran"] else "pass", f"{how}; {seen}")


def _score_before_update(run: RunRecord) -> dict[str, Any]:
    """Condition 3 of issue #1017: without TTT the weights never change; with it, each chunk is scored first."""
    if run.scored_by != "ttt":
        return _rule(None, None, "pass", "condition 3: no test-time training; the weights are the artifact's "
                     "throughout")
    rule = run.ttt["compliance"]["score_before_update"]
    return _rule(None, None, "pass" if rule["holds"] else "fail",
                 f"condition 3, score-first TTT (ttt.method={run.ttt['method']}): {rule['how']} ({rule['test']})")


def seed_rules(seeds: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The record's evidence: every seed disclosed, and the tests against the first baseline (the SOTA claimed)."""
    if seeds is None:
        how = "one run: export with --seeds RUNS (the script's runs, `pgolf seeds run`) for a record's evidence"
        return {"significance_vs_sota": _rule(None, 0.01, "not measured", how)}
    tried = len(seeds["runs"]) + len(seeds["unfinished"])
    rules = {"every_seed_disclosed": _rule(
        tried, None, "pass", f"{len(seeds['runs'])} finished and {len(seeds['unfinished'])} unfinished runs: every "
        "run folder of the runs directory, whose ledger lists every run started (seeds.json)")}
    if not seeds["baselines"]:
        rules["significance_vs_sota"] = _rule(None, 0.01, "not measured", "no --baseline given")
        return rules
    base = seeds["baselines"][0]
    rule, step = base["readme_rule"], base["progression"]
    rules["significance_vs_sota"] = _rule(
        rule["p"], rule["alpha"], "pass" if rule["passes"] else "fail",
        f"{rule['improvement_nats']:.5f} nats better than {base['label']} (needed: {rule['margin_nats']}), one-sided "
        f"Welch p of the margin {rule['p']:.4g} (the README's rule: p < {rule['alpha']})")
    rules["progression_vs_previous"] = _rule(
        step["p"], step["alpha"], "pass" if step["passes"] else "fail",
        f"one-sided Welch p {step['p']:.4g} against {base['label']} on the per-seed bpb (the maintainers' "
        f"leaderboard test: p < {step['alpha']})")
    return rules


def _all_imports(source: str) -> set[str]:
    """Every top-level module a source imports, optional imports included."""
    tree = ast.parse(source)
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}


def _rule(value: Any, limit: Any, status: str, how: str) -> dict[str, Any]:
    return {"value": value, "limit": limit, "status": status, "how": how}


def submission_json(run: RunRecord, cfg: ExportConfig, date: str, report: dict[str, Any]) -> dict[str, Any]:
    """The fields merged records' submission.json carry, filled from the run, with which score it is and the
    run's fingerprint."""
    seed = run.params["train"]["seed"]
    code = len(run.script.encode("utf-8"))
    final = run.final
    fingerprint = run.run_fingerprint
    return {
        "author": cfg.author, "github_id": cfg.github_id, "name": cfg.name, "blurb": cfg.blurb, "date": date,
        "track": TRACK, "val_loss": round(final["val_loss"], 8), "val_bpb": round(final["val_bpb"], 8),
        "score": score_source(run),
        "seeds": [seed],
        "seed_results": {str(seed): {**{k: round(v, 8) for k, v in final.items()},
                                     "artifact_bytes": run.compress["artifact_bytes"], "steps": run.train["steps"]}},
        "hardware": cfg.hardware,
        "pytorch_version": fingerprint["environment"]["torch"] if fingerprint else torch.__version__,
        "bytes_total": run.compress["artifact_bytes"] + code, "bytes_code": code,
        "compliance": {name: rule["status"] == "pass" for name, rule in report["rules"].items()},
        "fingerprint": fingerprint, "provenance": run.provenance,
    } | (submission_fields(run.seeds) if run.seeds else {})


def score_source(run: RunRecord) -> dict[str, Any]:
    """Which score ``val_bpb`` is (``ttt``, ``sliding`` or ``plain``), in words, with the artifact's other scores."""
    quantized = run.evaluate["quantized"]
    source = {"kind": run.scored_by, "plain_val_bpb": quantized.get("val_bpb"),
              "sliding_val_bpb": quantized.get("sliding_val_bpb")}
    if run.scored_by == "ttt":
        return source | {"ttt_method": run.ttt["method"], "ttt_val_bpb": run.ttt["val_bpb"], "what": (
            f"score-first test-time training of the artifact (ttt.method={run.ttt['method']}): the ttt stage's "
            "score, which train_gpt.py computes the same way in its evaluation phase")}
    stride = run.params["evaluate"]["eval_stride"]
    return source | {"what": f"the artifact's sliding-window evaluation at stride {stride}, no test-time training"
                     if run.scored_by == "sliding" else "the artifact's plain evaluation, no test-time training"}


def lrzip_needs(compress: dict[str, Any]) -> str:
    """The README's line on the lrzip program, when the artifact's or the script's coder is lrzip; else nothing."""
    users = [what for what, used in (
        ("the artifact's compressor is PR #1855's per-group lrzip (`compress.compressor: pergroup`)",
         compress["compressor"] == "pergroup"),
        ("the script's code is lrzip-coded (`compress.code_compressor: lrzip`)",
         compress["compress_code"] and compress.get("code_compressor") == "lrzip"))  # absent: a run before the key
        if used]
    if not users:
        return ""
    return f"\nThe `lrzip` program must be installed where it runs (`apt-get install lrzip`): {' and '.join(users)}.\n"


def readme(run: RunRecord, cfg: ExportConfig, info: dict[str, Any], report: dict[str, Any]) -> str:
    """The folder's README: the score and which one it is, how to run it, the settings, the compliance table
    with the clocks, and the run's fingerprint."""
    seed = run.params["train"]["seed"]
    vocab = run.params["model"]["vocab_size"]
    rows = "\n".join(f"| `{name}` | {rule['status']} | {_figure(rule)} | {rule['how']} |"
                     for name, rule in report["rules"].items())
    settings = "\n".join(f"| `{section}` | " + ", ".join(f"{k}={v}" for k, v in values.items()) + " |"
                         for section, values in run.params.items())
    system_needs = lrzip_needs(run.params["compress"])
    results = results_table(run, info) if run.seeds is None else f"""{seeds_table(run.seeds)}
{tests_section(run.seeds, "###")}
Every run's log and `final_metrics.json` are in `logs/`; `{REPORT_JSON}` holds these figures and tests."""
    ttt = " and test-time trains (score-first, as the ttt stage)" if run.scored_by == "ttt" else ""
    return f"""# {cfg.name}: val_bpb {info['val_bpb']:.5f}

{cfg.blurb or 'Exported by pgolf from a DVC pipeline run.'}

{results}

**The submission's score** (`val_bpb` of `submission.json`, the `submission` line at the end of
each log) is the **{SCORE_NAMES[run.scored_by]}** score: {info['score']['what']}.

## Run

The data in the challenge's layout beside the script (`./data/datasets/fineweb10B_sp{vocab}/`,
`./data/tokenizers/fineweb_{vocab}_bpe.model`), then

```bash
pip install -r requirements.txt
SEED=42 torchrun --standalone --nproc_per_node=8 train_gpt.py   # or: python train_gpt.py (one process)
```
{system_needs}
`SEED` sets the training seed (`train.seed`; without it, the baked {seed}). It trains,
calibrates, GPTQ-quantizes and compresses, writes `final_model.ptz`, evaluates{ttt}, prints
every score with its time, the submission's last (`submission val_loss:X val_bpb:Y`), the
wall time of every phase (`clock:NAME S.SSSs budget:B`) and the run's fingerprint (data,
tokenizer, byte accounting, versions, GPUs, attention kernels), and writes all of them to
`final_metrics.json`. `train_gpt.py` is a bootstrap and a brotli-compressed bundle of pgolf's
modules (the import closure of `pgolf/submit/runner.py`) with the run's params baked in; its
{info['bytes_code']:,} bytes are the code bytes counted.

## Settings

| section | keys |
|-|-|
{settings}

## Compliance (`compliance.json`)

Declared hardware: {cfg.hardware}. The training budget is judged by the clock
`{BUDGET_CLOCKS[TRAINING]}`, the evaluation budget by `{BUDGET_CLOCKS[EVALUATION]}`;
`compliance.json`'s `clocks` lists what each clock counts and what counts toward neither.

| rule | status | figure | how it is guaranteed |
|-|-|-|-|
{rows}

## Fingerprint (`submission.json`'s `fingerprint`)

{fingerprint_table(info['fingerprint'])}

## Provenance (`submission.json`'s `provenance`)

{provenance_table(run.provenance)}

`logs/` holds each pipeline stage's provenance (commit, versions, hardware, config, clocks) and metrics.
"""


SCORE_NAMES = {"ttt": "TTT", "sliding": "sliding-window", "plain": "plain"}


def results_table(run: RunRecord, info: dict[str, Any]) -> str:
    """One run's row: every score of the artifact, the submission's in bold, and the sizes."""
    quantized, unquantized = run.evaluate["quantized"], run.prequant.get("unquantized", {})
    scores = [("Pre-quant BPB", unquantized.get("val_bpb"), None),
              ("Post-quant BPB", quantized.get("val_bpb"), "plain"),
              ("Sliding BPB", quantized.get("sliding_val_bpb"), "sliding")]
    if run.scored_by == "ttt":
        scores.append(("TTT BPB", run.ttt["val_bpb"], "ttt"))
    names = " | ".join(f"**{name}**" if kind == run.scored_by else name for name, _, kind in scores)
    figures = " | ".join(f"**{_bpb(value)}**" if kind == run.scored_by else _bpb(value) for _, value, kind in scores)
    return f"""| Seed | Steps | {names} | Artifact | Code | Total |
|-|-|{'-|' * len(scores)}-|-|-|
| {run.params['train']['seed']} | {run.train['steps']} | {figures} | {run.compress['artifact_bytes']:,} | \
{info['bytes_code']:,} | {info['bytes_total']:,} |
"""


def fingerprint_table(fingerprint: dict[str, Any] | None) -> str:
    """The fingerprint's main fields as a table (all of them are in submission.json)."""
    if fingerprint is None:
        return "Not recorded: the pipeline's stages ran before pgolf recorded fingerprints; re-run them."
    data, env = fingerprint["data"], fingerprint["environment"]
    published = data["published"]
    rows = {
        "source": fingerprint["source"],
        "dataset": f"{data['dataset']}, manifest sha256 {data['manifest_sha256']}, docs sha256 {data['docs_sha256']}",
        "published data": "not recorded" if published is None else
        f"{published['repo_id']} at {published['revision']} ({len(published['files'])} files with their hashes)",
        "train_shards": data["train_shards"], "val_tokens": data["val_tokens"],
        "tokenizer sha256": data["tokenizer_sha256"],
        "byte accounting": f"{data['byte_accounting']}, {data['val_bytes']:,} validation bytes",
        "versions": f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}",
        "GPUs": f"{env['gpu_count']} x {env['gpu']}" if env["gpu"] else "none (CPU)",
        "attention": ", ".join(f"{use}: {name}" for use, name in env["attention"].items()),
        "coder": f"{env.get('coder', '–')}; system binaries: "
                 + (", ".join(f"{name} ({version})" for name, version in env["system_binaries"].items()) or "none"),
    }
    return "| field | value |\n|-|-|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows.items())


def provenance_table(provenance: dict[str, Any] | None) -> str:
    """Which run the figures come from and, for each, the params digest and the validation targets it covers."""
    if provenance is None:
        return "Not recorded."
    rows = "\n".join(f"| {f['figure']} | `{f['file']}` | `{(f['params_digest'] or '–')[:SHORT]}` | "
                     f"{targets_text(f['targets'], f['split_targets'])} |" for f in provenance["figures"].values())
    return f"""Every figure comes from {provenance['source']}: each stage's record names the files it read
and wrote (one version of each, chaining from stage to stage) and the params it ran with, the ones
`train_gpt.py` bakes. The digest is the sha256 of those params (the keys `dvc.yaml` lists for the stage).

| figure | from | params digest | validation targets scored |
|-|-|-|-|
{rows}"""


def _bpb(value: float | None) -> str:
    return "–" if value is None else f"{value:.5f}"


def _figure(rule: dict[str, Any]) -> str:
    if rule["value"] is None or rule["value"] == []:
        return "–"
    value = f"{rule['value']:,.1f}" if isinstance(rule["value"], float) else f"{rule['value']:,}"
    return value if rule["limit"] in (None, []) else f"{value} of {rule['limit']:,}"


def records_name(cfg: ExportConfig, date: str) -> str:
    """The folder's name in ``records/track_10min_16mb/``: the date and the name, file-name safe."""
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in cfg.name).strip("_") or "pgolf"
    return f"{date}_{slug}"


def export_date(cfg: ExportConfig) -> str:
    return cfg.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def seed_evidence(runs_dir: Path, script: str, baselines: list[str], label: str
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """The seeds report of ``script``'s runs in ``runs_dir``, the slowest run's times, and each run's log and metrics."""
    runset = gather([runs_dir])
    digest = hashlib.sha256(script.encode("utf-8")).hexdigest()
    for run in runset.runs:
        if run.script_sha256 != digest:
            raise ValueError(f"{run.folder}: its {SCRIPT} (sha256 {str(run.script_sha256)[:16]}) is not the exported "
                             f"one ({digest[:16]}): the seeds of a record are runs of the script it submits")
    report = seeds_report(runset, [load_baseline(spec) for spec in baselines], label)
    logs = {f"{run.folder.name}/{name}": path for run in runset.runs
            for name, path in ((run.log.name, run.log), (METRICS_FILE, run.folder / METRICS_FILE))}
    logs |= {f"{u.folder.name}/{u.log.name}": u.log for u in runset.unfinished if u.log is not None}
    return report, slowest(runset), logs


def slowest(runset: RunSet) -> dict[str, Any]:
    """What the rules judge the seeds by: each clock's longest over the runs, the calibration that came closest to
    its reserve, where they ran, and the fingerprint they share."""
    metrics = [run.metrics for run in runset.runs]
    for run in runset.runs:
        require_keys(run.metrics, SEED_TIMES, run.folder / METRICS_FILE)
    clocks = {name: max(m["clocks"][name] for m in metrics if name in m["clocks"])
              for name in dict.fromkeys(name for m in metrics for name in m["clocks"])}
    devices = {m["device"] for m in metrics}
    return {key: max(m[key] for m in metrics) for key in ("training_phase_s", "evaluation_phase_s")} | {
        "clocks": clocks, "calibration_reserve": max((m["calibration_reserve"] for m in metrics),
                                                     key=lambda check: check["calibration_s"]),
        "fingerprint": shared_fingerprint(runset),
        "device": devices.pop() if len(devices) == 1 else "mixed",
        "hardware": " / ".join(sorted({m["hardware"] for m in metrics}))}


def shared_fingerprint(runset: RunSet) -> dict[str, Any]:
    """The fingerprint every seed ran with: the same data and the same software and GPUs, else an error naming
    the field and the runs."""
    first = runset.runs[0]
    expected = first.metrics["fingerprint"]
    for run in runset.runs[1:]:
        theirs = run.metrics["fingerprint"]
        fields = [("data", key) for key in expected["data"]] + [("environment", key) for key in SHARED_ENVIRONMENT]
        for part, key in fields:
            if theirs[part].get(key) != expected[part].get(key):
                raise ValueError(f"{run.folder} and {first.folder} ran with different {part}: fingerprint {key} is "
                                 f"{theirs[part].get(key)!r} in {run.folder.name} but {expected[part].get(key)!r} in "
                                 f"{first.folder.name}; the seeds of a record run one script on one data set and "
                                 "one kind of machine")
    return expected


def write_records_folder(dest: Path, run: RunRecord, cfg: ExportConfig, logs: dict[str, Path]) -> dict[str, Any]:
    """Write the folder at ``dest`` whole or not at all, its marker last; its submission.json."""
    report = compliance(run, cfg)
    info = submission_json(run, cfg, export_date(cfg), report)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "train_gpt.py").write_text(run.script, encoding="utf-8")
        (tmp / "requirements.txt").write_text("\n".join(requirements(run.script)) + "\n", encoding="utf-8")
        (tmp / "submission.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "compliance.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(run, cfg, info, report), encoding="utf-8")
        (tmp / "logs").mkdir()
        for name, source in logs.items():
            (tmp / "logs" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / "logs" / name)
        if run.seeds is not None:
            (tmp / REPORT_JSON).write_text(json.dumps(run.seeds, indent=2) + "\n", encoding="utf-8")
            (tmp / REPORT_MD).write_text(markdown(run.seeds), encoding="utf-8")
        write_marker(tmp)
    return info


def write_marker(folder: Path) -> None:
    """List every file of ``folder`` with its sha256 in its marker: what a later export may replace."""
    files = {path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*"))
             if path.is_file()}
    marker = {"written_by": "pgolf export", "files": files}
    (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
