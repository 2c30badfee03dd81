"""DVC stage ``export`` (``pgolf export``): a finished run -> a records folder the challenge accepts.

Reads the bundle stage's ``train_gpt.py`` (byte for byte what compress counted) and the
stages' metrics and provenance, all from one run: the pipeline's outputs (``out/``), also
when run by hand, or with ``--from DIR`` a hand-run directory's (its own outputs, the
pipeline's for the stages it did not run). The set is refused unless it is one run's: each
stage's record chains to the files the next one read, and every stage ran with the params the
script bakes (``pgolf.pipeline.lineage``); the folder says which run it is, each figure's
params digest and the validation targets it covers. It writes ``out/export/`` of the
workspace (``--dest DIR`` elsewhere):
``train_gpt.py``, ``submission.json``, ``README.md``, ``requirements.txt``,
``compliance.json`` and ``logs/`` (``pgolf.submit.export``). When the script bakes
``ttt.enabled``, the submission's score is the ttt stage's (``out/ttt/metrics.json``, made
with the baked ``ttt:``), else evaluate's sliding score; the folder says which.
``--measured DIR`` takes the clocks and fingerprint of a run of the exported script in DIR
(its ``final_metrics.json`` and ``*.log``) into the compliance report, submission.json and
the logs, refused unless that run ran this script and made this artifact (their sha256 in its
``final_metrics.json``); without it the fingerprint is the pipeline's (its stages'
provenance). ``--dest DIR`` refuses a folder that pgolf export did not write, or one that
holds files added or changed since (``.pgolf-export.json`` lists what it wrote). ``--seeds
RUNS`` takes every run of the script in RUNS (``pgolf seeds run``): the mean score, each
seed's, their logs, the slowest run's times and, with ``--baseline SPEC`` (repeatable; the
first is the SOTA the record claims to beat), the record's tests (docs/RECORDS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.config import ExportConfig, section
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace, run_stage, stage_parser
from pgolf.submit.export import (
    LOGGED,
    RunRecord,
    baked_params,
    check_replaceable,
    export_date,
    lineage_of,
    measured_run,
    pipeline_fingerprint,
    read_json,
    records_name,
    seed_evidence,
    ttt_record,
    write_records_folder,
)


def run(params: dict, ws: Workspace, dest: str | None = None, measured: str | None = None, seeds: str | None = None,
        baseline: list[str] | None = None, source: str | None = None) -> None:
    cfg = section(params, "export", ExportConfig)
    if source and not Path(source).is_dir():
        raise FileNotFoundError(f"{source}: no such hand-run directory (--from)")
    origin = Workspace(Path(source)) if source else Workspace.pipeline()
    script_path = origin.find(layout.BUNDLE_SCRIPT)
    if not script_path.is_file():
        raise FileNotFoundError(f"{script_path}: not found (run the bundle stage first)")
    if measured and seeds:
        raise ValueError("--measured and --seeds: give one (--seeds takes the times of every run in it)")
    if baseline and not seeds:
        raise ValueError("--baseline needs --seeds: the tests compare the seeds' runs with the baseline")
    if dest:
        check_replaceable(Path(dest))
    script = script_path.read_text(encoding="utf-8")
    logs = {f"{stage}_{kind}.json": origin.find(path) for stage, files in LOGGED.items()
            for kind, path in zip(("provenance", "metrics"), files) if path and origin.find(path).is_file()}
    measured_dir, evidence, times = Path(measured) if measured else None, None, None
    compress = read_json(origin.find(layout.COMPRESS_METRICS))
    if measured_dir:
        times = measured_run(measured_dir, script, origin.find(layout.COMPRESS_ARTIFACT), compress["artifact_bytes"])
        logs |= {"final_metrics.json": measured_dir / "final_metrics.json"}
        logs |= {log.name: log for log in sorted(measured_dir.glob("*.log"))}
    if seeds:
        evidence, times, run_logs = seed_evidence(Path(seeds), script, baseline or [], cfg.name)
        logs |= run_logs
    baked_ttt = baked_params(script)["ttt"]
    provenance = lineage_of(origin.find, origin.root, script_path, baked_ttt["enabled"])
    record = RunRecord(
        script=script, compress=compress, evaluate=read_json(origin.find(layout.EVALUATE_METRICS)),
        prequant=read_json(origin.find(layout.PREQUANT_METRICS)), train=read_json(origin.find(layout.TRAIN_METRICS)),
        measured=times, seeds=evidence, ttt=ttt_record(baked_ttt, origin.find(layout.TTT_METRICS)),
        fingerprint=pipeline_fingerprint(origin.find(layout.TRAIN_PROVENANCE), origin.find(layout.EVALUATE_PROVENANCE)),
        provenance=provenance,
    )
    destination = Path(dest) if dest else ws.output(layout.EXPORT_DIR)
    info = write_records_folder(destination, record, cfg, logs)
    print(f"[pgolf export] {destination}: from {provenance['source']}: val_bpb {info['val_bpb']:.5f} (the "
          f"{info['score']['kind']} score), "
          f"{info['bytes_total']:,} bytes ({info['bytes_code']:,} code); submit it as "
          f"records/track_10min_16mb/{records_name(cfg, export_date(cfg))}/", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("export")
    parser.add_argument("--dest", default=None, help=f"write the folder here (default: {layout.EXPORT_DIR} of the run)")
    parser.add_argument("--measured", default=None,
                        help="a folder where the exported train_gpt.py ran: its final_metrics.json and *.log")
    parser.add_argument("--seeds", default=None,
                        help="a runs directory of the exported train_gpt.py, one folder per seed (pgolf seeds run)")
    parser.add_argument("--baseline", action="append", default=None, metavar="SPEC",
                        help="with --seeds: #PR, a records folder or a runs directory to test against; repeatable")
    parser.add_argument("--from", dest="source", default=None, metavar="DIR",
                        help="export a hand-run directory's run (its own outputs, the pipeline's for the stages it "
                             "did not run; default: the pipeline's outputs)")
    return run_stage("export", run, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
