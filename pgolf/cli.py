"""The ``pgolf`` command: run one stage by hand, with the stages' own code.

``pgolf STAGE [--params FILE] [--set section.key=value ...] [--out DIR]`` calls the
``main`` of ``stages/STAGE.py``, the same code that the DVC stage command runs; by hand
its outputs go under ``runs/`` (``--out``), never into what DVC tracks
(``pgolf.pipeline.stage``). ``pgolf params`` prints the complete params, defaults filled in.
``pgolf seeds run|report|published`` runs the exported script once per seed, gathers the runs
into the per-seed table and the record's statistics, and lists the published records pgolf
carries (``pgolf.submit.seeds``, docs/RECORDS.md). Stage modules (and the seeds module, which
imports torch) are imported only when named, so this module imports neither at load.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pgolf.config import ConfigError, load_params, render_params
from pgolf.pipeline.stage import one_line, stage_parser

# command -> module under stages/ ("import" is a keyword, so its module has another name)
STAGE_MODULES = {"download": "download", "tokenize": "tokenize", "import": "import_model", "train": "train",
                 "prequant": "prequant", "calibrate": "calibrate", "bundle": "bundle", "quantize": "quantize",
                 "compress": "compress", "evaluate": "evaluate", "ttt": "ttt", "plots": "plots", "export": "export"}


def print_params(argv: list[str]) -> int:
    parser = stage_parser("params")
    parser.add_argument("--reference", action="store_true",
                        help="print the parameter reference (every key: allowed values, default, meaning)")
    args = parser.parse_args(argv)
    if args.reference:
        from pgolf.pipeline.reference import reference

        print(reference(), end="")
        return 0
    try:
        print(render_params(load_params(args.params, args.overrides), args.params), end="")
    except (ConfigError, OSError) as exc:
        print(f"pgolf params: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def seeds_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf seeds", description="N seeds of one configuration and the "
                                     "statistics a record needs (docs/RECORDS.md)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the exported train_gpt.py once per seed, each in RUNS/seed_S/")
    run.add_argument("--script", type=Path, required=True, help="the exported train_gpt.py (out/export/)")
    run.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 42,0,1234")
    run.add_argument("--data", type=Path, required=True, help="the challenge's data folder (datasets/, tokenizers/)")
    run.add_argument("--runs", type=Path, required=True, help="the runs directory (one folder per seed)")
    run.add_argument("--nproc", type=int, default=1, help="processes per run under torchrun (8 on 8xH100)")
    report = commands.add_parser("report", help="gather runs: per-seed table, mean/std, tests against baselines")
    report.add_argument("runs", type=Path, nargs="+", help="runs directories (or single run folders)")
    report.add_argument("--baseline", action="append", default=[], metavar="SPEC",
                        help="#PR (a published record: see `pgolf seeds published`), a records folder or a runs "
                             "directory; repeatable")
    report.add_argument("--label", default="", help="the candidate's name in the report (default: the runs path)")
    report.add_argument("--out", type=Path, default=None, help="where seeds.json and seeds.md go (default: the "
                        "first runs directory)")
    commands.add_parser("published", help="the published records pgolf carries, with their per-seed scores")
    return parser


def seeds(argv: list[str]) -> int:
    args = seeds_parser().parse_args(argv)
    from pgolf.submit import seeds as evidence
    from pgolf.submit.stats import markdown, summary

    try:
        if args.command == "run":
            codes = evidence.run_seeds(args.script, parse_seeds(args.seeds), args.data, args.runs, args.nproc)
            failed = [seed for seed, code in codes.items() if code]
            print(f"[pgolf seeds] {len(codes) - len(failed)} of {len(codes)} runs finished"
                  + (f" (failed: {', '.join(map(str, failed))})" if failed else "")
                  + f"; gather them with: pgolf seeds report {args.runs}", flush=True)
            return 1 if failed else 0
        if args.command == "report":
            runset = evidence.gather(args.runs)
            baselines = [evidence.load_baseline(spec) for spec in args.baseline]
            report = evidence.seeds_report(runset, baselines, args.label or runset.source)
            evidence.write_report(args.out or args.runs[0], report)
            print(markdown(report), end="")
            return 0
        for name in evidence.published_records():
            sample = evidence.published_record(name)
            total = summary(sample)["bpb"]
            print(f"{sample.label:14} {len(sample.scores)} seeds, mean val_bpb {total['mean']:.8f}  {sample.source}")
        return 0
    except (ValueError, OSError) as exc:
        print(f"pgolf seeds: error: {one_line(exc)}", file=sys.stderr)
        return 2


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 42,0,1234") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "params":
        return print_params(argv[1:])
    if argv and argv[0] == "seeds":
        return seeds(argv[1:])
    if not argv or argv[0] not in STAGE_MODULES:
        print(f"usage: pgolf {{{','.join(STAGE_MODULES)},params,seeds}} [--params FILE] [--set section.key=value ...] "
              "[--out DIR]")
        print("  pgolf params ...  prints the complete params (every key, defaults filled in)")
        print("  pgolf seeds {run,report,published} ...  N seeds of the exported script and a record's statistics")
        print("  pgolf download --variant sp8192 --train-shards 128  fetches the challenge's published data")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"stages.{STAGE_MODULES[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
