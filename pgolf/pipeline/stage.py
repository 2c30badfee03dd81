"""The frame every stage runs in: arguments, params, workspace, torchrun and errors.

A stage module defines ``run(params, ws)`` and ``main(argv)``, which calls
:func:`run_stage`. It parses ``--params FILE``, ``--set section.key=value`` and ``--out
DIR``, loads the params (an error names the file that was read), picks the workspace and
turns bad input into one line on stderr and exit code 2. The workspace is the pipeline's
own tree when DVC runs the command (DVC sets ``DVC_STAGE`` for every stage command) and the
hand-run directory (``runs/`` unless ``--out`` says otherwise) when a user runs ``pgolf
STAGE``, so a stage run by hand never overwrites an output that DVC tracks. A run holds
the workspace's lock of its stage (``.pgolf/locks/STAGE.lock``), so a second run of the
stage there refuses at once, naming the lock and its holder, instead of interleaving its
outputs with the first's; a reader of an earlier stage's output recovers an interrupted
commit of it first (``Workspace.input``). A params file that leaves keys the stage reads to
the record's defaults is run with a warning naming them; a stage run (``Workspace.begin``)
keeps its lineage (``pgolf.pipeline.lineage``): its inputs are checked, as they are read, to
come from one run and from the params it was given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.atomic import exclusive_lock, recover
from pgolf.config import ConfigError, EvaluateConfig, load_params, section
from pgolf.distributed import launch_torchrun, under_torchrun
from pgolf.pipeline import layout
from pgolf.pipeline.lineage import Lineage, declared_keys, defaulted, main_process

Params = dict[str, dict[str, Any]]
# The params sections each stage reads: a params file without one is an error naming it, never the record's
# defaults (quantize reads compress: too, when fit_to_size is on, and checks that itself).
STAGE_SECTIONS = {"tokenize": ("tokenize",), "download": ("tokenize",), "train": ("tokenize", "model", "train"),
                  "calibrate": ("tokenize", "calibrate"), "quantize": ("quantize",), "compress": ("compress",),
                  "evaluate": ("tokenize", "evaluate"), "prequant": ("tokenize", "evaluate"), "ttt": ("tokenize", "ttt"),
                  "import": ("model",)}


@dataclass(frozen=True)
class Workspace:
    """Where a run reads and writes the pipeline's paths (``pgolf.pipeline.layout``), and what it read."""

    root: Path  # Path(".") for the pipeline itself
    lineage: Lineage | None = field(default=None, compare=False, repr=False)  # a stage run's (begin)

    @classmethod
    def pipeline(cls) -> Workspace:
        return cls(Path("."))

    def begin(self, stage: str, params: Params) -> Workspace:
        """This workspace for one run of ``stage`` with ``params``: every input it reads joins its lineage."""
        return Workspace(self.root, Lineage.start(stage, self.root, params))

    def output(self, path: str | Path) -> Path:
        return self.root / path

    def input(self, path: str | Path) -> Path:
        """What an earlier run in this workspace wrote, else the pipeline's output.

        An interrupted commit of that output is first recovered (``pgolf.atomic.recover``), so a
        stage never reads one output of a set whose other outputs are being rolled back. In a
        stage run the input joins its lineage, refused when it comes from another run than the
        others (``pgolf.pipeline.lineage``).
        """
        found = self.find(path)
        if self.lineage is not None:
            self.lineage.read(Path(path).as_posix(), found)
        return found

    def reference(self, path: str | Path) -> Path | None:
        """Figures to compare with (prequant's, for the tax): ``input``'s, or None when they come from other inputs."""
        found = self.find(path)
        return found if self.lineage is None or self.lineage.compare(Path(path).as_posix(), found) else None

    def find(self, path: str | Path) -> Path:
        """Where ``path`` is read from: this workspace's own output when there is one, else the pipeline's."""
        own = self.root / path
        recover(own)
        if own.exists():
            return own
        recover(path)
        return Path(path)

    def lock(self, stage: str) -> Path:
        """The file whose lock a run of ``stage`` in this workspace holds."""
        return self.root / layout.LOCKS_DIR / f"{stage}.lock"


def stage_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"pgolf {stage}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one parameter (YAML value); repeatable",
    )
    parser.add_argument(
        "--out", default=layout.HAND_RUNS_DIR,
        help=f"outside DVC, write outputs under this directory (default: {layout.HAND_RUNS_DIR}/); "
             "inputs are read from it first, then from the pipeline",
    )
    return parser


def workspace(out: str, environ: dict[str, str] | os._Environ) -> Workspace:
    """The pipeline's tree under DVC, the hand-run directory otherwise."""
    return Workspace.pipeline() if "DVC_STAGE" in environ else Workspace(Path(out))


def run_stage(
    stage: str,
    run: Callable[..., None],
    argv: list[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    processes: Callable[[Params], int] | None = None,
) -> int:
    """Parse a stage's arguments, load its params and call ``run(params, ws, ...)``; 2 on bad input.

    ``processes`` gives the number of processes the stage wants; more than one, outside
    torchrun, relaunches the stage under torchrun with the same resolved params.
    """
    parser = parser or stage_parser(stage)
    args = parser.parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in ("params", "overrides", "out")}
    ws = workspace(args.out, os.environ)
    try:
        params = load_params(args.params, args.overrides, required=STAGE_SECTIONS.get(stage, ()))
        if under_torchrun(os.environ) and PARAMS_SOURCE in os.environ:  # relaunched: name the user's file
            params.source = os.environ[PARAMS_SOURCE]
        nproc = processes(params) if processes else 1
        with stage_lock(stage, ws, os.environ):
            if main_process() and LOCK_HELD not in os.environ:  # once: not each process, nor after a relaunch
                warn_defaults(stage, params)
            if nproc > 1 and not under_torchrun(os.environ):
                return relaunch(stage, params, nproc, ws, extra)
            run(params, ws, **extra)
    except (ConfigError, ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        print(f"pgolf {stage}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def warn_defaults(stage: str, params: Params) -> None:
    """Name the keys this stage reads that the params file leaves to the record's defaults (a partial file)."""
    missing = defaulted(declared_keys(stage), params)
    if missing:
        sections: dict[str, list[str]] = {}
        for key in missing:
            sections.setdefault(key.split(".")[0], []).append(key.split(".", 1)[1])
        named = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in sections.items())
        print(f"pgolf {stage}: warning: {getattr(params, 'source', 'the params')} leaves {len(missing)} of the keys "
              f"this stage reads to the record's defaults ({named}); `pgolf params --params FILE` prints them all",
              file=sys.stderr, flush=True)


def stage_lock(stage: str, ws: Workspace, environ: dict[str, str] | os._Environ) -> contextlib.AbstractContextManager:
    """The workspace's lock of ``stage`` for this run: a second run of the stage there refuses, naming it.

    Under torchrun one process takes it (rank 0), none when the launching ``pgolf`` holds it already.
    """
    if under_torchrun(environ) and (environ.get(LOCK_HELD) == str(ws.lock(stage)) or environ.get("RANK") != "0"):
        return contextlib.nullcontext()
    return exclusive_lock(ws.lock(stage), f"`pgolf {stage}`",
                          f": another run of {stage} is writing this workspace; wait for it, or give this one "
                          "another --out")


LOCK_HELD = "PGOLF_STAGE_LOCK"  # set for processes relaunched under torchrun: the launcher holds this lock
# Also set for them: the params file the user gave, which their warnings and records name rather than
# the resolved copy the launcher wrote for them
PARAMS_SOURCE = "PGOLF_PARAMS_SOURCE"


def relaunch(stage: str, params: Params, nproc: int, ws: Workspace, options: dict[str, Any]) -> int:
    """Run the stage in ``nproc`` processes under torchrun with these resolved params and options."""
    import yaml

    from pgolf.atomic import write_bytes

    params_file = Path(layout.TORCHRUN_PARAMS_DIR) / f"{stage}_params.yaml"
    write_bytes(params_file, yaml.safe_dump(dict(params), sort_keys=True).encode("utf-8"))
    args = ["--params", str(params_file), "--out", str(ws.root)]
    args += [item for key, value in options.items() for item in (f"--{key}", str(value))]
    source = getattr(params, "source", "params")
    return launch_torchrun(f"stages.{stage}", args, nproc,
                           {**os.environ, LOCK_HELD: str(ws.lock(stage)), PARAMS_SOURCE: source})


def evaluate_processes(params: dict) -> int:
    """The processes a scoring stage (prequant, evaluate) runs on: ``evaluate.nproc_per_node``."""
    return section(params, "evaluate", EvaluateConfig).nproc_per_node


def one_line(exc: BaseException) -> str:
    """An error as one line: its message, with the path and operation for an OS error."""
    message = str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno N] ..." says nothing a user needs
        named = exc.filename is None or str(exc.filename) in exc.strerror
        message = exc.strerror if named else f"{exc.filename}: {exc.strerror}"
    return " ".join(message.split("\n"))
