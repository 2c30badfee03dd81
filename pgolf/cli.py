"""The ``pgolf`` command: run one stage outside DVC with the stages' own code.

``pgolf STAGE [--params FILE] [--set section.key=value ...]`` calls the same
``stages.STAGE.run`` that the DVC stage command calls, so a stage behaves the
same under ``dvc repro`` and by hand. Outputs go under the working directory.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from pgolf.config import ConfigError, load_params, render_params

STAGES = ("tokenize", "train", "calibrate", "quantize", "compress", "evaluate", "import")
# "import" is a keyword, so its module has another name.
STAGE_MODULES = {name: name for name in STAGES} | {"import": "import_model"}

Params = dict[str, dict[str, Any]]


def stage_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"pgolf {stage}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one parameter (YAML value); repeatable",
    )
    return parser


def run_stage(
    stage: str,
    run: Callable[..., None],
    argv: list[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Parse a stage's arguments, load its params and call ``run``; 2 on bad input."""
    parser = parser or stage_parser(stage)
    args = parser.parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in ("params", "overrides")}
    try:
        params = load_params(args.params, args.overrides)
        run(params, **extra)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"pgolf {stage}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def print_params(params: Params) -> None:
    print(render_params(params), end="")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "params":
        return run_stage("params", print_params, argv[1:])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(f"usage: pgolf {{{','.join(STAGES)},params}} [--params FILE] [--set section.key=value ...]")
        print("  pgolf params ...  prints the complete params (every key, defaults filled in)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"stages.{STAGE_MODULES[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
