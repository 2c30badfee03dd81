"""Replay the repository's history against DVC's code deps: how many commits would have re-run each stage.

For every commit (merges aside) of ``--base``'s history (default: the tree before
the rooms, ``main``) that changed ``pgolf/`` or ``stages/``, two answers:

- **before**: the code deps of ``--base``'s dvc.yaml (every stage depended on its whole import
  closure), against the paths the commit changed;
- **now**: today's rule (``pgolf.pipeline.deps``, read from this working tree), against today's
  modules that hold the code the commit changed. A changed file is read at the commit and its
  parent; each top-level definition (function, class, assignment) whose text changed is mapped
  to the file of today's tree that defines that name, among the files that inherited the old
  file's definitions. A file whose change touched no definition (imports, docstring) maps to
  its main heir (the file of today's tree that holds most of its definitions); a stage
  module maps to the stage module of today with its name (``evaluate`` also to ``prequant``,
  which was split from it).

Usage: ``python tools/replay_deps.py [--base main] [--rev HEAD]``; prints one row per stage and
the commits that would re-run training under today's rule.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pgolf.pipeline.deps import derived  # noqa: E402  (the rule, as dvc.yaml is generated)

STAGE_SPLITS = {"stages/evaluate.py": ("stages/evaluate.py", "stages/prequant.py")}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


def show(rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def definitions(source: str | None) -> dict[str, str] | None:
    """Top-level name -> its source text (None: not Python that parses)."""
    if source is None:
        return {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    found = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) else \
            [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        for name in names:
            found[name] = ast.get_source_segment(source, node) or ""
    return found


def today_index() -> dict[str, set[str]]:
    """Name -> the files of today's pgolf/ that define it at the top level."""
    index: dict[str, set[str]] = defaultdict(set)
    for path in sorted((REPO_ROOT / "pgolf").rglob("*.py")):
        for name in definitions(path.read_text(encoding="utf-8")) or {}:
            index[name].add(str(path.relative_to(REPO_ROOT)))
    return index


def heirs(names: set[str], index: dict[str, set[str]]) -> list[str]:
    """Today's files that hold the old file's definitions, most first."""
    counts = Counter(file for name in names for file in index.get(name, ()))
    return [file for file, _ in counts.most_common()]


def modules_now(commit: str, path: str, index: dict[str, set[str]]) -> set[str]:
    """Today's files that hold the code ``commit`` changed in ``path``."""
    if path.startswith("stages/"):
        return {p for p in STAGE_SPLITS.get(path, (path,)) if (REPO_ROOT / p).is_file()}
    before, after = definitions(show(f"{commit}^", path)), definitions(show(commit, path))
    if before is None or after is None:
        names, changed = set(), set()
    else:
        names = set(before) | set(after)
        changed = {name for name in names if before.get(name) != after.get(name)}
    family = heirs(names, index)
    if not changed:
        return set(family[:1])
    found: set[str] = set()
    for name in changed:
        homes = index.get(name, set())
        inherited = homes & set(family) or homes
        found |= inherited if inherited else set(family[:1])
    return found


def stage_code(dvc_yaml: dict, params: dict | None = None) -> dict[str, set[str]]:
    """Each stage's code deps: listed in ``dvc_yaml`` (params None) or derived by today's rule."""
    code = {}
    for name, stage in dvc_yaml["stages"].items():
        if params is None:
            code[name] = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        else:
            code[name] = set(derived(stage, params)[0])
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="the tree whose dvc.yaml gives the 'before' deps")
    parser.add_argument("--rev", default="HEAD", help="replay the history of this revision up to --base")
    args = parser.parse_args(argv)
    before = stage_code(yaml.safe_load(show(args.base, "dvc.yaml")))
    now = stage_code(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8")),
                     yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8")))
    index = today_index()
    commits = git("rev-list", "--no-merges", args.base, "--", "pgolf", "stages").split()
    counts_before, counts_now = Counter(), Counter()
    retrain: list[tuple[str, set[str]]] = []
    for commit in commits:
        paths = [p for p in git("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", commit).split()
                 if p.endswith(".py") and p.startswith(("pgolf/", "stages/"))]
        if not paths:
            continue
        mapped = set().union(*(modules_now(commit, path, index) for path in paths))
        for stage, code in before.items():
            counts_before[stage] += bool(code & set(paths))
        for stage, code in now.items():
            counts_now[stage] += bool(code & mapped)
        if mapped & now.get("train", set()):
            retrain.append((commit, mapped & now["train"]))
    total = len([c for c in commits if c])
    print(f"{total} commits of {args.base} changed pgolf/ or stages/ (merges aside)\n")
    print(f"{'stage':<10} {'before':>7} {'now':>5}")
    for stage in now:
        print(f"{stage:<10} {counts_before.get(stage, 0):>7} {counts_now[stage]:>5}")
    print("\nCommits that re-run train under today's rule, and the training code each touched:")
    for commit, files in retrain:
        subject = git("log", "-1", "--format=%s", commit).strip()
        print(f"  {commit[:7]} {subject[:90]}\n          {', '.join(sorted(files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
