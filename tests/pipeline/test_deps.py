"""dvc.yaml cannot drift from the code: each stage lists exactly the code and params it reads.

What a stage reads is derived from its module: the code is the import closure of
``stages/NAME.py`` (``pgolf.submit.bundle.import_closure``), the params are the sections it
builds with ``section(params, "NAME", Config)`` (every key that affects outputs, see
``pgolf.config.run_setting``) and the single keys it reads as ``section(...).key``. Keys
that appear in the stage's command (``${train.nproc_per_node}``) are tracked by DVC there.
A stage that counts code bytes also depends on the shipped code (the closure of
``compress.code_files``).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pgolf import config
from pgolf.pipeline import layout
from pgolf.submit.bundle import import_closure

REPO_ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
STAGES = DVC_YAML["stages"]
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
TEMPLATE = re.compile(r"\$\{([^}]+)\}")


def stage_module(stage: dict) -> str:
    match = re.search(r"-m (stages\.\w+)", stage["cmd"])
    assert match, f"stage command {stage['cmd']!r} does not run a stages module"
    return match.group(1).replace(".", "/") + ".py"


def params_read(module_file: str) -> set[str]:
    """``section.key`` of every param the module reads (whole sections: their output keys)."""
    tree = ast.parse((REPO_ROOT / module_file).read_text(encoding="utf-8"))
    keys: set[str] = set()
    single_reads = {id(node.value) for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and _section_call(node.value)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _section_call(node.value):
            keys.add(f"{_section_call(node.value)}.{node.attr}")
        elif _section_call(node) and id(node) not in single_reads:
            name = _section_call(node)
            keys |= {f"{name}.{key}" for key in config.output_keys(config.SECTIONS[name])}
    return keys


def _section_call(node: ast.AST) -> str | None:
    """The section name of a ``section(params, "name", Config)`` call, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "section"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
        return node.args[1].value
    return None


def listed_params(stage: dict) -> set[str]:
    listed: set[str] = set()
    for entry in stage.get("params", []):
        assert isinstance(entry, str) and "." in entry, f"params entry {entry!r}: list keys one by one"
        listed.add(entry)
    return listed


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage.get("deps", []) if dep.endswith(".py")}


def code_read(module_file: str) -> set[str]:
    """The stage's import closure, plus the shipped code when it counts code bytes."""
    code = set(import_closure([module_file]))
    if "compress.code_files" in params_read(module_file):
        code |= set(import_closure(PARAMS["compress"]["code_files"]))
    return code


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_exactly_the_code_it_imports(name):
    stage = STAGES[name]
    expected = code_read(stage_module(stage))
    assert code_deps(stage) == expected, (
        f"dvc.yaml stage {name}: missing {sorted(expected - code_deps(stage))}, "
        f"extra {sorted(code_deps(stage) - expected)}"
    )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_lists_exactly_the_params_it_reads(name):
    stage = STAGES[name]
    in_command = set(TEMPLATE.findall(stage["cmd"]))
    expected = params_read(stage_module(stage)) - in_command
    assert listed_params(stage) == expected, (
        f"dvc.yaml stage {name}: missing {sorted(expected - listed_params(stage))}, "
        f"extra {sorted(listed_params(stage) - expected)}"
    )


def test_paths_come_from_the_layout_module():
    """Every ${NAME} that is not a params key is a path declared in pgolf/pipeline/layout.py."""
    assert DVC_YAML["vars"] == ["pgolf/pipeline/layout.py"]
    declared = {name for name in vars(layout) if name.isupper()}
    for name, stage in STAGES.items():
        text = yaml.safe_dump(stage)
        for variable in TEMPLATE.findall(text):
            if "." not in variable:
                assert variable in declared, f"dvc.yaml stage {name}: ${{{variable}}} is not in pgolf/pipeline/layout.py"


def test_run_settings_are_not_listed():
    """Keys that change how a run goes, not what it makes, re-run nothing."""
    listed = set().union(*(listed_params(stage) for stage in STAGES.values()))
    for section_name, cls in config.SECTIONS.items():
        for key in {f.name for f in dataclasses.fields(cls)} - set(config.output_keys(cls)):
            assert f"{section_name}.{key}" not in listed
