"""The ``pgolf`` command: run one stage by hand, with the stages' own code.

``pgolf STAGE [--params FILE] [--set section.key=value ...] [--out DIR]`` calls the
``main`` of ``stages/STAGE.py``, the same code that the DVC stage command runs; by hand
its outputs go under ``runs/`` (``--out``), never into what DVC tracks
(``pgolf.pipeline.stage``). ``pgolf params`` prints the complete params, defaults filled in.
Stage modules are imported only when named, so this module imports no stage at load.
"""

from __future__ import annotations

import importlib
import sys

from pgolf.config import ConfigError, load_params, render_params
from pgolf.pipeline.stage import one_line, stage_parser

# command -> module under stages/ ("import" is a keyword, so its module has another name)
STAGE_MODULES = {"download": "download", "tokenize": "tokenize", "import": "import_model", "train": "train",
                 "prequant": "prequant", "calibrate": "calibrate", "bundle": "bundle", "quantize": "quantize",
                 "compress": "compress", "evaluate": "evaluate", "ttt": "ttt", "plots": "plots", "export": "export"}


def print_params(argv: list[str]) -> int:
    args = stage_parser("params").parse_args(argv)
    try:
        print(render_params(load_params(args.params, args.overrides), args.params), end="")
    except (ConfigError, OSError) as exc:
        print(f"pgolf params: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "params":
        return print_params(argv[1:])
    if not argv or argv[0] not in STAGE_MODULES:
        print(f"usage: pgolf {{{','.join(STAGE_MODULES)},params}} [--params FILE] [--set section.key=value ...] "
              "[--out DIR]")
        print("  pgolf params ...  prints the complete params (every key, defaults filled in)")
        print("  pgolf download --variant sp8192 --train-shards 128  fetches the challenge's published data")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"stages.{STAGE_MODULES[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
