"""What each DVC stage depends on, derived from its code: the code deps and params keys of dvc.yaml.

A module is a cache unit (docs/DESIGN.md, "A module is a cache unit"). A stage's code deps
are the import closure of its module under ``stages/``, minus the infrastructure that cannot
change an output: the config schema (every key that affects an output is listed as a DVC
param, so a new or changed value re-runs the stage anyway), atomic writes, the package's
version, the DVC side in ``pgolf/pipeline/`` (the stage frame, layout, provenance, lineage) and the
run's clocks and fingerprints (``pgolf/clocks.py``, ``pgolf/fingerprint.py``: logged and
recorded in provenance, never in a stage's results). Those
files are neither listed nor followed. The stage that writes the submission's script
(it calls ``script_text``) also depends on all the code that may ship: the whole import closure
of ``compress.code_files`` (which part ships depends on the params: ``pgolf.submit.bundle``). Stages that count code bytes read
the bundle's ``code_bytes.json``, never the code. Its params are every output key of each
section the stage builds with ``section(params, "name", Config)`` and each single key it
reads as ``section(...).key``, less the keys its command already names (``${...}``).

``python -m pgolf.pipeline.deps --write`` rewrites those lists in dvc.yaml (comments and
every other entry kept); ``--check`` prints what differs and exits 1, which is what
tests/pipeline/test_deps.py asserts; registering a stage is writing its module and its
dvc.yaml entry with an empty ``deps`` list, then ``--write``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pgolf import config
from pgolf.submit.bundle import REPO_ROOT, import_closure

INFRASTRUCTURE = frozenset({
    "pgolf/__init__.py", "pgolf/config.py", "pgolf/atomic.py", "pgolf/cli.py",
    "pgolf/pipeline/__init__.py", "pgolf/pipeline/stage.py", "pgolf/pipeline/layout.py",
    "pgolf/pipeline/provenance.py", "pgolf/pipeline/lineage.py", "pgolf/pipeline/deps.py",
    "pgolf/clocks.py", "pgolf/fingerprint.py",  # timings and fingerprints go to logs and provenance, not results
})
TEMPLATE = re.compile(r"\$\{([^}]+)\}")
DVC_YAML = "dvc.yaml"


def stage_module(cmd: str) -> str:
    """The file of the ``stages`` module a stage command runs (``-m stages.NAME``)."""
    match = re.search(r"-m (stages\.\w+)", cmd)
    if not match:
        raise ValueError(f"stage command {cmd!r} does not run a stages module (-m stages.NAME)")
    return match.group(1).replace(".", "/") + ".py"


def _tree(module_file: str, root: Path) -> ast.AST:
    return ast.parse((root / module_file).read_text(encoding="utf-8"), filename=module_file)


def _section_call(node: ast.AST) -> str | None:
    """The section name of a ``section(params, "name", Config)`` call, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "section"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
        return node.args[1].value
    return None


def params_read(module_file: str, root: Path = REPO_ROOT) -> set[str]:
    """``section.key`` of every param the module reads (whole sections: their output keys)."""
    tree = _tree(module_file, root)
    single = {id(node.value) for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and _section_call(node.value)}
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _section_call(node.value):
            keys.add(f"{_section_call(node.value)}.{node.attr}")
        elif _section_call(node) and id(node) not in single:
            name = _section_call(node)
            keys |= {f"{name}.{key}" for key in config.output_keys(config.SECTIONS[name])}
    return keys


def writes_script(module_file: str, root: Path = REPO_ROOT) -> bool:
    """Whether the stage module writes the submission's script (calls ``script_text``)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "script_text"
               for node in ast.walk(_tree(module_file, root)))


def code_deps(module_file: str, params: dict[str, Any], root: Path = REPO_ROOT) -> list[str]:
    """The code a stage's outputs depend on, by the rule in the module docstring."""
    code = set(import_closure([module_file], root, exclude=INFRASTRUCTURE))
    if writes_script(module_file, root):
        code |= set(import_closure(params["compress"]["code_files"], root))
    return sorted(code)


def derived(stage: dict[str, Any], params: dict[str, Any], root: Path = REPO_ROOT) -> tuple[list[str], list[str]]:
    """(code deps, params keys) of one dvc.yaml stage."""
    module = stage_module(stage["cmd"])
    in_command = set(TEMPLATE.findall(stage["cmd"]))
    return code_deps(module, params, root), sorted(params_read(module, root) - in_command)


def differences(root: Path = REPO_ROOT) -> list[str]:
    """One line per stage whose dvc.yaml lists differ from the derived ones (empty: in sync)."""
    stages = yaml.safe_load((root / DVC_YAML).read_text(encoding="utf-8"))["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    lines = []
    for name, stage in stages.items():
        code, keys = derived(stage, params, root)
        listed_code = {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        listed_keys = set(stage.get("params", []))
        for what, want, have in (("code", set(code), listed_code), ("params", set(keys), listed_keys)):
            if want != have:
                lines.append(f"dvc.yaml stage {name}: {what} missing {sorted(want - have)}, "
                             f"extra {sorted(have - want)}")
    return lines


def write(root: Path = REPO_ROOT) -> int:
    """Rewrite every stage's code deps and params in dvc.yaml; the number of stages changed."""
    from ruamel.yaml import YAML  # DVC's own YAML library: keeps comments and layout

    rt = YAML()
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    path = root / DVC_YAML
    document = rt.load(path.read_text(encoding="utf-8"))
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    changed = 0
    for stage in document["stages"].values():
        code, keys = derived(stage, params, root)
        others = [d for d in stage.get("deps", []) if not (isinstance(d, str) and d.endswith(".py"))]
        new_deps = code + others
        if list(stage.get("deps", [])) != new_deps or list(stage.get("params", [])) != keys:
            changed += 1
        stage["deps"] = new_deps
        if keys:
            stage["params"] = keys
        elif "params" in stage:
            del stage["params"]
    with path.open("w", encoding="utf-8") as handle:
        rt.dump(document, handle)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgolf.pipeline.deps", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps and params lists")
    mode.add_argument("--check", action="store_true", help="print what differs from the code; exit 1 if anything")
    args = parser.parse_args(argv)
    if args.write:
        print(f"dvc.yaml: {write()} stage(s) rewritten")
        return 0
    lines = differences()
    print("\n".join(lines) or "dvc.yaml is in sync with the code")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
