"""``pgolf exp``: ``dvc exp run`` that says when an experiment would not start from the baseline.

DVC starts every experiment from the workspace, not from the commit: a plain ``dvc exp run``
leaves its params in ``params.yaml``, and ``--temp`` and ``--queue`` copy the workspace's
uncommitted changes into their copies, so a run meant to start from the baseline inherits
whatever the last one set (docs/EXPERIMENTS.md). ``pgolf exp run ARGS`` compares the workspace
with HEAD first and names what differs — each params key with both values, each changed file —
then runs ``dvc exp run ARGS``; with ``--from-head`` it refuses to start from a workspace that
differs instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pgolf.pipeline import layout

PARAMS_FILE = "params.yaml"
# DVC's record of the last run and the outputs it tracks in git: they differ after every run, by design
IGNORED = ("dvc.lock", f"{layout.OUT_DIR}/")


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def flat(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        return {}
    return {f"{section}.{key}": value for section, values in params.items() if isinstance(values, dict)
            for key, value in values.items()}


def workspace_changes(repo: Path) -> list[str]:
    """What the workspace has that HEAD has not: changed params keys, then changed tracked files."""
    done = git(repo, "diff", "--name-only", "HEAD")
    if done.returncode != 0:
        raise ValueError(f"{repo}: not a git repository with a commit (git: {done.stderr.strip()})")
    files = [name for name in done.stdout.split() if not name.startswith(IGNORED)]
    changes = []
    if PARAMS_FILE in files:
        head = yaml.safe_load(git(repo, "show", f"HEAD:{PARAMS_FILE}").stdout or "{}")
        now = yaml.safe_load((repo / PARAMS_FILE).read_text(encoding="utf-8"))
        before, after = flat(head), flat(now)
        changes += [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
                    if before.get(key) != after.get(key)]
    changes += [name for name in files if name != PARAMS_FILE]
    return changes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run":
        print("usage: pgolf exp run [--from-head] [dvc exp run arguments ...]")
        return 2
    args = argv[1:]
    from_head = "--from-head" in args
    args = [arg for arg in args if arg != "--from-head"]
    try:
        changes = workspace_changes(Path("."))
    except ValueError as exc:
        print(f"pgolf exp: error: {exc}", file=sys.stderr)
        return 2
    if changes:
        listed = "; ".join(changes[:12]) + (f"; and {len(changes) - 12} more" if len(changes) > 12 else "")
        where = "--temp and queued runs copy" if {"--temp", "--queue"} & set(args) else "the run starts from"
        message = (f"the workspace differs from HEAD ({listed}); {where} the workspace, so this experiment "
                   "does not start from the baseline: commit these, or `git checkout params.yaml` to drop them")
        if from_head:
            print(f"pgolf exp: error: {message}", file=sys.stderr)
            return 2
        print(f"pgolf exp: warning: {message}", file=sys.stderr, flush=True)
    return subprocess.run(["dvc", "exp", "run", *args]).returncode
