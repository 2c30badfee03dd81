"""dvc.yaml cannot drift from the code, and a module is a cache unit.

``pgolf.pipeline.deps`` derives each stage's code deps (its import closure minus the
infrastructure that cannot change an output; the bundle stage adds the shipped code) and
params keys from the code; these tests hold dvc.yaml to that derivation and hold the
derivation to the rule of docs/DESIGN.md ("A module is a cache unit").
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from pgolf import config
from pgolf.pipeline import deps, layout

REPO_ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
STAGES = DVC_YAML["stages"]
COMPUTE_STAGES = sorted(set(STAGES) - {"plots", "export"})


def code_of(name: str) -> set[str]:
    return {dep for dep in STAGES[name]["deps"] if dep.endswith(".py")}


def test_dvc_yaml_lists_exactly_what_the_code_derives():
    """The --check of `python -m pgolf.pipeline.deps`: regenerate with --write when this fails."""
    assert deps.differences(REPO_ROOT) == []


@pytest.mark.parametrize("name", COMPUTE_STAGES)
def test_no_compute_stage_depends_on_the_dvc_side(name):
    """The stage frame, layout, provenance and plots never re-run a computation."""
    assert not {dep for dep in code_of(name) if dep.startswith("pgolf/pipeline/")}


@pytest.mark.parametrize("name", sorted(set(COMPUTE_STAGES) - {"bundle"}))
def test_only_the_bundle_depends_on_the_config_schema_and_the_shipped_code(name):
    """Every output key is a DVC param already; and stages that count code bytes read them from the bundle."""
    code = code_of(name)
    assert not code & {"pgolf/config.py", "pgolf/atomic.py", "pgolf/__init__.py"}
    assert not {dep for dep in code if dep.startswith("pgolf/submit/")}


def test_training_depends_on_training_code_only():
    rooms = {dep.split("/")[1] for dep in code_of("train") if dep.startswith("pgolf/") and dep.count("/") == 2}
    assert rooms <= {"data", "model", "train", "eval"}, rooms
    assert {dep for dep in code_of("train") if dep.startswith("pgolf/eval/")} == {
        "pgolf/eval/__init__.py", "pgolf/eval/bpb.py"}  # its validation curves


@pytest.mark.parametrize("name", ["train", "calibrate", "prequant"])
def test_nothing_of_quantization_or_the_artifact_reaches_the_stages_before_it(name):
    assert not {dep for dep in code_of(name) if dep.startswith(("pgolf/quant/gptq", "pgolf/quant/fit",
                                                                  "pgolf/artifact/", "pgolf/submit/"))}


def test_the_bundle_depends_on_exactly_the_shipped_closure():
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    shipped = set(deps.import_closure(params["compress"]["code_files"], REPO_ROOT))
    own = set(deps.import_closure(["stages/bundle.py"], REPO_ROOT, exclude=deps.INFRASTRUCTURE))
    assert code_of("bundle") == shipped | own
    assert "pgolf/config.py" in shipped and "pgolf/submit/bundle.py" not in shipped  # the bundler never ships


def test_write_rewrites_the_lists_and_keeps_everything_else(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    for tree in ("pgolf", "stages"):
        shutil.copytree(REPO_ROOT / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    text = (tmp_path / "dvc.yaml").read_text(encoding="utf-8")
    stale = text.replace("      - stages/train.py\n", "      - pgolf/quant/gptq.py\n", 1)
    assert stale != text
    (tmp_path / "dvc.yaml").write_text(stale, encoding="utf-8")
    assert deps.differences(tmp_path)
    assert deps.write(tmp_path) == 1
    assert deps.differences(tmp_path) == []
    assert (tmp_path / "dvc.yaml").read_text(encoding="utf-8") == text  # comments and layout kept


def test_paths_come_from_the_layout_module():
    """Every ${NAME} that is not a params key is a path declared in pgolf/pipeline/layout.py."""
    assert DVC_YAML["vars"] == ["pgolf/pipeline/layout.py"]
    declared = {name for name in vars(layout) if name.isupper()}
    for name, stage in {**STAGES, "plots": {"plots": DVC_YAML["plots"]}}.items():
        for variable in deps.TEMPLATE.findall(yaml.safe_dump(stage)):
            if "." not in variable:
                assert variable in declared, f"dvc.yaml {name}: ${{{variable}}} is not in pgolf/pipeline/layout.py"


def test_run_settings_are_not_listed():
    """Keys that change how a run goes, not what it makes, re-run nothing."""
    listed = set().union(*(set(stage.get("params", [])) for stage in STAGES.values()))
    for section_name, cls in config.SECTIONS.items():
        for key in {f.name for f in dataclasses.fields(cls)} - set(config.output_keys(cls)):
            assert f"{section_name}.{key}" not in listed


def test_a_stage_command_that_runs_no_stage_module_is_named():
    with pytest.raises(ValueError, match="does not run a stages module"):
        deps.stage_module("python tools/other.py")
