"""DVC stage ``export`` (``pgolf export``): a finished run -> a records folder the challenge accepts.

Reads the bundle stage's ``train_gpt.py`` (byte for byte what compress counted) and the
stages' metrics and provenance, and writes ``out/export/`` (``--dest DIR`` elsewhere):
``train_gpt.py``, ``submission.json``, ``README.md``, ``requirements.txt``,
``compliance.json`` and ``logs/`` (``pgolf.submit.export``). ``--measured DIR`` takes the times of
a run of the exported script in DIR (its ``final_metrics.json`` and ``*.log``) into the
compliance report and the logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.config import ExportConfig, section
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace, run_stage, stage_parser
from pgolf.submit.export import LOGGED, RunRecord, export_date, read_json, records_name, write_records_folder


def run(params: dict, ws: Workspace, dest: str | None = None, measured: str | None = None) -> None:
    cfg = section(params, "export", ExportConfig)
    script_path = ws.input(layout.BUNDLE_SCRIPT)
    if not script_path.is_file():
        raise FileNotFoundError(f"{script_path}: not found (run the bundle stage first)")
    measured_dir = Path(measured) if measured else None
    record = RunRecord(
        script=script_path.read_text(encoding="utf-8"),
        compress=read_json(ws.input(layout.COMPRESS_METRICS)), evaluate=read_json(ws.input(layout.EVALUATE_METRICS)),
        prequant=read_json(ws.input(layout.PREQUANT_METRICS)), train=read_json(ws.input(layout.TRAIN_METRICS)),
        measured=read_json(measured_dir / "final_metrics.json") if measured_dir else None,
    )
    logs = {f"{stage}_{kind}.json": ws.input(path) for stage, files in LOGGED.items()
            for kind, path in zip(("provenance", "metrics"), files) if path and ws.input(path).is_file()}
    if measured_dir:
        logs |= {"final_metrics.json": measured_dir / "final_metrics.json"}
        logs |= {log.name: log for log in sorted(measured_dir.glob("*.log"))}
    destination = Path(dest) if dest else ws.output(layout.EXPORT_DIR)
    info = write_records_folder(destination, record, cfg, logs)
    print(f"[pgolf export] {destination}: val_bpb {info['val_bpb']:.5f}, {info['bytes_total']:,} bytes "
          f"({info['bytes_code']:,} code); submit it as records/track_10min_16mb/{records_name(cfg, export_date(cfg))}/",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("export")
    parser.add_argument("--dest", default=None, help=f"write the folder here (default: {layout.EXPORT_DIR} of the run)")
    parser.add_argument("--measured", default=None,
                        help="a folder where the exported train_gpt.py ran: its final_metrics.json and *.log")
    return run_stage("export", run, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
