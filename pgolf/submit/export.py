"""A records folder from a finished run: the script, submission.json, README, requirements, logs, compliance.

The challenge accepts an entry as a folder under ``records/track_10min_16mb/`` holding the
``train_gpt.py`` that the organisers run, a ``submission.json``, a ``README.md`` and the
run's logs. :func:`write_records_folder` fills one from the bundle stage's script (copied,
byte for byte what compress counted) and the stages' metrics and provenance, adds the
``requirements.txt`` found from the bundled modules' imports and ``compliance.json``: each
rule of the challenge with its figure, its limit, whether it holds and how that is
guaranteed. Times measured by running the exported script (its ``final_metrics.json``) are
used where given; otherwise the timing rules say they were not measured on the declared
hardware. Given the report of the script's seed runs (``pgolf.submit.seeds``), the folder
scores the mean of every seed, lists each seed in ``submission.json`` and the README's
results table, carries every run's log and metrics, writes ``seeds.json``/``seeds.md``,
judges the time rules by the slowest run and adds the record's tests to the compliance report.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pgolf.atomic import atomic_path
from pgolf.config import ExportConfig
from pgolf.pipeline import layout
from pgolf.submit.bundle import read_bundle
from pgolf.submit.rundir import METRICS_FILE
from pgolf.submit.seeds import (
    REPORT_JSON,
    REPORT_MD,
    SCRIPT,
    RunSet,
    gather,
    load_baseline,
    quantized_score,
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
          "evaluate": (layout.EVALUATE_PROVENANCE, layout.EVALUATE_METRICS)}


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

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        return read_bundle(self.script)["params"]

    @property
    def final(self) -> dict[str, float]:
        """val_loss and val_bpb of the submission: the sliding score when there is one."""
        return quantized_score(self.evaluate["quantized"])


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the pipeline to the evaluate stage first)")
    return json.loads(path.read_text(encoding="utf-8"))


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
    """Every rule of the track: figure, limit, status (pass | fail | not measured) and how it is guaranteed."""
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
            run, "training_phase_s", cfg,
            f"the training loop stops at train.max_wallclock_seconds={cap:g} s minus "
            f"train.gptq_reserve_seconds={train['gptq_reserve_seconds']:g} s kept for calibration and GPTQ"
            + ("" if cap > 0 else " (no cap set: this run is scheduled by steps, not guaranteed)")),
        "eval_under_600s": _timing(
            run, "evaluation_phase_s", cfg,
            "the artifact's load, plain and sliding evaluation, timed by the exported script"),
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
        "score_before_update": _rule(
            None, None, "pass", "condition 3: no test-time training; the weights are the artifact's throughout"),
        "single_pass": _rule(
            None, None, "pass",
            f"condition 4: one left-to-right pass, every target scored exactly once (plain windows partition the "
            f"tokens; sliding windows of {evaluate['eval_seq_len']} at stride {evaluate['eval_stride']} score "
            "disjoint ranges: tests/eval/test_score.py::test_sliding_windows_score_every_target_exactly_once)"),
    }
    rules |= seed_rules(run.seeds)
    return {"track": TRACK, "declared_hardware": cfg.hardware, "rules": rules,
            "all_pass": all(rule["status"] == "pass" for rule in rules.values())}


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


def _timing(run: RunRecord, key: str, cfg: ExportConfig, how: str) -> dict[str, Any]:
    """A time rule from the exported script's own run on GPUs; anything else is not measured on the declared hardware."""
    measured = run.measured
    if measured is None or measured["device"] != "cuda":
        seen = "" if measured is None else f" (measured {measured[key]:.1f} s on {measured['hardware']})"
        return _rule(None, TIME_LIMIT_S, "not measured", f"{how}; not measured on {cfg.hardware}{seen}: "
                     "run train_gpt.py there and export with --measured")
    seconds = measured[key]
    return _rule(seconds, TIME_LIMIT_S, "pass" if seconds <= TIME_LIMIT_S else "fail",
                 f"{how}; measured by train_gpt.py on {measured['hardware']} (declared: {cfg.hardware})")


def submission_json(run: RunRecord, cfg: ExportConfig, date: str, report: dict[str, Any]) -> dict[str, Any]:
    """The fields merged records' submission.json carry, filled from the run."""
    seed = run.params["train"]["seed"]
    code = len(run.script.encode("utf-8"))
    final = run.final
    return {
        "author": cfg.author, "github_id": cfg.github_id, "name": cfg.name, "blurb": cfg.blurb, "date": date,
        "track": TRACK, "val_loss": round(final["val_loss"], 8), "val_bpb": round(final["val_bpb"], 8),
        "seeds": [seed],
        "seed_results": {str(seed): {**{k: round(v, 8) for k, v in final.items()},
                                     "artifact_bytes": run.compress["artifact_bytes"], "steps": run.train["steps"]}},
        "hardware": cfg.hardware, "pytorch_version": torch.__version__,
        "bytes_total": run.compress["artifact_bytes"] + code, "bytes_code": code,
        "compliance": {name: rule["status"] == "pass" for name, rule in report["rules"].items()},
    } | (submission_fields(run.seeds) if run.seeds else {})


def readme(run: RunRecord, cfg: ExportConfig, info: dict[str, Any], report: dict[str, Any]) -> str:
    """The folder's README: the score, how to run it, the settings and the compliance table."""
    quantized, unquantized = run.evaluate["quantized"], run.prequant.get("unquantized", {})
    seed = run.params["train"]["seed"]
    vocab = run.params["model"]["vocab_size"]
    rows = "\n".join(f"| `{name}` | {rule['status']} | {_figure(rule)} | {rule['how']} |"
                     for name, rule in report["rules"].items())
    settings = "\n".join(f"| `{section}` | " + ", ".join(f"{k}={v}" for k, v in values.items()) + " |"
                         for section, values in run.params.items())
    system_needs = ("\nIts compressor is PR #1855's per-group lrzip (`compress.compressor: pergroup`): the `lrzip` "
                    "program must be installed where it runs (`apt-get install lrzip`).\n"
                    if run.params["compress"]["compressor"] == "pergroup" else "")
    results = f"""| Seed | Steps | Pre-quant BPB | Post-quant BPB | **Sliding BPB** | Artifact | Code | Total |
|-|-|-|-|-|-|-|-|
| {seed} | {run.train['steps']} | {_bpb(unquantized.get('val_bpb'))} | {_bpb(quantized.get('val_bpb'))} | \
**{_bpb(quantized.get('sliding_val_bpb'))}** | {run.compress['artifact_bytes']:,} | {info['bytes_code']:,} | \
{info['bytes_total']:,} |
""" if run.seeds is None else f"""{seeds_table(run.seeds)}
{tests_section(run.seeds, "###")}
Every run's log and `final_metrics.json` are in `logs/`; `{REPORT_JSON}` holds these figures and tests."""
    return f"""# {cfg.name}: val_bpb {info['val_bpb']:.5f}

{cfg.blurb or 'Exported by pgolf from a DVC pipeline run.'}

{results}

## Run

The data in the challenge's layout beside the script (`./data/datasets/fineweb10B_sp{vocab}/`,
`./data/tokenizers/fineweb_{vocab}_bpe.model`), then

```bash
pip install -r requirements.txt
SEED=42 torchrun --standalone --nproc_per_node=8 train_gpt.py   # or: python train_gpt.py (one process)
```
{system_needs}
`SEED` sets the training seed (`train.seed`; without it, the baked {seed}). It trains,
calibrates, GPTQ-quantizes and compresses, writes `final_model.ptz` and
`final_metrics.json`, and prints the quantized and sliding-window `val_bpb` and the
submission size. `train_gpt.py` is a bootstrap and a brotli-compressed bundle of pgolf's
modules (the import closure of `pgolf/submit/runner.py`) with the run's params baked in; its
{info['bytes_code']:,} bytes are the code bytes counted.

## Settings

| section | keys |
|-|-|
{settings}

## Compliance (`compliance.json`)

Declared hardware: {cfg.hardware}.

| rule | status | figure | how it is guaranteed |
|-|-|-|-|
{rows}

`logs/` holds each pipeline stage's provenance (commit, versions, hardware, config) and metrics.
"""


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
    """The measured times the rules are judged by: each phase's longest over the seeds, with where they ran."""
    metrics = [run.metrics for run in runset.runs]
    devices = {m["device"] for m in metrics}
    return {key: max(m[key] for m in metrics) for key in ("training_phase_s", "evaluation_phase_s")} | {
        "device": devices.pop() if len(devices) == 1 else "mixed",
        "hardware": " / ".join(sorted({m["hardware"] for m in metrics}))}


def write_records_folder(dest: Path, run: RunRecord, cfg: ExportConfig, logs: dict[str, Path]) -> dict[str, Any]:
    """Write the folder at ``dest`` whole or not at all; its submission.json."""
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
    return info
