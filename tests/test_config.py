"""Strict loading of params.yaml, overrides, and every shipped preset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgolf.config import (
    SECTIONS,
    ConfigError,
    ModelConfig,
    QuantizeConfig,
    TrainConfig,
    complete_params,
    load_params,
    section,
)
from pgolf.model import GPT, count_parameters

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [REPO_ROOT / "params.yaml", *sorted((REPO_ROOT / "presets").glob("*.yaml"))]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_empty_sections_are_the_record(tmp_path):
    params = load_params(write(tmp_path, "train: {}\n"))
    assert section(params, "train", TrainConfig) == TrainConfig()
    assert section(params, "quantize", QuantizeConfig).matrix_clip_sigmas == 12.85


def test_unknown_key_is_named(tmp_path):
    params = load_params(write(tmp_path, "quantize:\n  matrix_clip_sigma: 14\n"))
    with pytest.raises(ConfigError, match=r"quantize.*matrix_clip_sigma\b"):
        section(params, "quantize", QuantizeConfig)


def test_wrong_type_is_named(tmp_path):
    params = load_params(write(tmp_path, "model:\n  num_layers: eleven\n"))
    with pytest.raises(ConfigError, match=r"model\.num_layers: expected an integer, got 'eleven'"):
        section(params, "model", ModelConfig)


def test_bool_is_not_an_int(tmp_path):
    params = load_params(write(tmp_path, "model:\n  num_layers: true\n"))
    with pytest.raises(ConfigError, match="num_layers"):
        section(params, "model", ModelConfig)


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'qantize'"):
        load_params(write(tmp_path, "qantize: {}\n"))
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_are_yaml_values(tmp_path):
    path = write(tmp_path, "quantize:\n  matrix_clip_sigmas: 12.85\n")
    params = load_params(path, ["quantize.matrix_clip_sigmas=14", "quantize.mlp_bits=null", "train.compile=off"])
    cfg = section(params, "quantize", QuantizeConfig)
    assert cfg.matrix_clip_sigmas == 14.0 and cfg.mlp_bits is None
    assert section(params, "train", TrainConfig).compile is False
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(path, ["matrix_clip_sigmas=14"])


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_preset_builds_its_configuration(path):
    params = load_params(path)
    configs = {name: section(params, name, cls, str(path)) for name, cls in SECTIONS.items()}
    assert configs["model"].vocab_size == configs["tokenize"].vocab_size
    assert count_parameters(GPT(configs["model"])) > 0


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_preset_names_the_keys_dvc_yaml_interpolates(path):
    # DVC resolves ${...} in dvc.yaml from params.yaml itself, not from pgolf's defaults.
    templated = set(re.findall(r"\$\{(\w+)\.(\w+)\}", (REPO_ROOT / "dvc.yaml").read_text()))
    params = load_params(path)
    missing = sorted(f"{sec}.{key}" for sec, key in templated if key not in params.get(sec, {}))
    assert not missing, f"{path.name} lacks {missing}, which dvc.yaml interpolates"


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_preset_spells_out_every_key(path):
    # `dvc exp run -S` refuses a key that params.yaml lacks, and dvc.yaml's params must exist.
    params = load_params(path)
    complete = complete_params(params, str(path))
    missing = sorted(f"{name}.{key}" for name, keys in complete.items() for key in keys if key not in params.get(name, {}))
    assert not missing, f"{path.name} lacks {missing}: regenerate it with `pgolf params --params {path.name}`"


def test_record_preset_is_the_record():
    params = load_params(REPO_ROOT / "presets" / "record.yaml")
    model = section(params, "model", ModelConfig)
    assert count_parameters(GPT(model)) == 35_943_512
    assert section(params, "train", TrainConfig).nproc_per_node == 8
    assert section(params, "quantize", QuantizeConfig) == QuantizeConfig()
