"""Strict loading of params.yaml, overrides, and every shipped preset."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pgolf.config import (
    SECTIONS,
    CompressConfig,
    ConfigError,
    EvaluateConfig,
    ModelConfig,
    QuantizeConfig,
    TrainConfig,
    complete_params,
    load_params,
    require_sections,
    section,
)
from pgolf.model.gpt import GPT, count_parameters

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


def test_unknown_key_is_named_when_the_file_is_loaded(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: quantize: unknown key\(s\) matrix_clip_sigma\b"):
        load_params(write(tmp_path, "quantize:\n  matrix_clip_sigma: 14\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: model\.num_layers: expected an integer >= 1, got 'eleven'"):
        load_params(write(tmp_path, "model:\n  num_layers: eleven\n"))


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="num_layers: expected an integer >= 1, got True"):
        load_params(write(tmp_path, "model:\n  num_layers: true\n"))


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'qantize'"):
        load_params(write(tmp_path, "qantize: {}\n"))
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_are_yaml_values(tmp_path):
    path = write(tmp_path, "quantize:\n  matrix_clip_sigmas: 12.85\n")
    params = load_params(path, ["quantize.matrix_clip_sigmas=14", "quantize.mlp_bits=null", "train.compile=off",
                                "train.iterations=5"])
    cfg = section(params, "quantize", QuantizeConfig)
    assert cfg.matrix_clip_sigmas == 14.0 and cfg.mlp_bits is None
    assert section(params, "train", TrainConfig).compile is False
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(path, ["matrix_clip_sigmas=14"])


@pytest.mark.parametrize("written, value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("2e+3", 2000.0), ("5e3", 5000.0),
                                             ("1.5e-3", 1.5e-3), (".5e1", 5.0), ("1.0e-4", 1e-4),
                                             ("0.0001", 1e-4), ("+1e-4", 1e-4), ("1_0e2", 1000.0)])
def test_a_number_reads_as_a_number_however_it_is_written(tmp_path, written, value):
    """``1e-4`` (PR #576's TTT learning rate as config.py writes it) is a number in a file and through --set."""
    from pgolf.config import TTTConfig

    from_file = load_params(write(tmp_path, f"ttt:\n  lr: {written}\n"))
    from_set = load_params(write(tmp_path, "ttt: {}\n"), [f"ttt.lr={written}"])
    for params in (from_file, from_set):
        assert section(params, "ttt", TTTConfig).lr == pytest.approx(value, rel=1e-15)


def test_an_integer_may_be_written_with_an_exponent_but_not_with_a_fraction(tmp_path):
    params = load_params(write(tmp_path, "train: {}\n"), ["train.iterations=2e4", "train.seed=1.0e3"])
    assert section(params, "train", TrainConfig).iterations == 20_000
    assert section(params, "train", TrainConfig).seed == 1000
    with pytest.raises(ConfigError, match=r"train\.iterations: expected an integer >= 1, got 2\.5"):
        load_params(write(tmp_path, "train: {}\n"), ["train.iterations=2.5"])
    assert load_params(write(tmp_path, "export: {name: 1e4x}\n"))["export"]["name"] == "1e4x"  # not a number


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


# ---------------------------------------------------------------- every range and choice, checked at load

# (section, key, value, what the one line must say): every class of bad value, each refused before any work.
BAD_VALUES = [
    ("train", "train_seq_len", 0, r"train\.train_seq_len: 0 is out of range: must be >= 1"),
    ("train", "grad_accum_steps", 0, r"train\.grad_accum_steps: 0 is out of range: must be >= 1"),
    ("train", "iterations", 0, r"train\.iterations: 0 is out of range: must be >= 1"),
    ("train", "train_batch_tokens", 1000, r"train\.train_batch_tokens: 1000 is not allowed: must be a multiple of "
     r"grad_accum_steps \* train_seq_len = 8 \* 2048"),
    ("train", "warmdown_frac", 1.5, r"train\.warmdown_frac: 1\.5 is out of range: must be in \[0\.0, 1\.0\]"),
    ("train", "beta2", 1.0, r"train\.beta2: 1\.0 is out of range: must be in \[0\.0, 1\.0\)"),
    ("train", "matrix_lr", -0.1, r"train\.matrix_lr: -0\.1 is out of range: must be >= 0\.0"),
    ("train", "adam_eps", 0, r"train\.adam_eps: 0\.0 is out of range: must be > 0\.0"),
    ("train", "seed", -1, r"train\.seed: -1 is out of range: must be in \[0, 4294967295\]"),
    ("train", "device", "gpu", r"train\.device: 'gpu' is not a choice: must be one of auto, cpu, cuda"),
    ("train", "compile", "fast", r"train\.compile: expected true or false or one of auto, got 'fast'"),
    ("train", "grad_clip_norm", ".nan", r"train\.grad_clip_norm: nan is not a finite number"),
    ("train", "max_wallclock_seconds", 10, r"train\.max_wallclock_seconds: 10\.0 is not allowed: must be 0 \(no "
     r"limit\) or more than gptq_reserve_seconds \(12\.0\)"),
    ("train", "nproc_per_node", 3, r"train\.grad_accum_steps: 8 is not allowed: must be a multiple of nproc_per_node"),
    ("train", "val_max_tokens", 100, r"train\.val_max_tokens: 100 is not allowed: must be 0 \(all\) or more than "
     r"train_seq_len \(2048\)"),
    ("model", "model_dim", -32, r"model\.model_dim: -32 is out of range: must be >= 1"),
    ("model", "model_dim", 500, r"model\.model_dim: 500 is not allowed: must be a multiple of num_heads \(8\)"),
    ("model", "num_kv_heads", 3, r"model\.num_kv_heads: 3 is not allowed: must divide num_heads \(8\)"),
    ("model", "rope_dims", 15, r"model\.rope_dims: 15 is not allowed: must be even and at most the head dimension"),
    ("model", "vocab_size", 70000, r"model\.vocab_size: 70000 is out of range: must be in \[1, 65536\]"),
    ("model", "loop_end", 11, r"model\.loop_end: 11 is not allowed: the loop range needs loop_start \(4\) <= loop_end "
     r"< num_layers \(11\)"),
    ("model", "xsa_last_n", -1, r"model\.xsa_last_n: -1 is out of range: must be >= 0"),
    ("model", "logit_softcap", 0, r"model\.logit_softcap: 0\.0 is out of range: must be > 0\.0"),
    ("evaluate", "eval_seq_len", 0, r"evaluate\.eval_seq_len: 0 is out of range: must be >= 1"),
    ("evaluate", "eval_batch_seqs", 0, r"evaluate\.eval_batch_seqs: 0 is out of range: must be >= 1"),
    ("evaluate", "eval_stride", 0, r"evaluate\.eval_stride: 0 is out of range: must be >= 1"),
    ("evaluate", "eval_stride", 4096, r"evaluate\.eval_stride: 4096 is not allowed: must be in \[1, eval_seq_len\]"),
    ("evaluate", "max_val_tokens", 2048, r"evaluate\.max_val_tokens: 2048 is not allowed: must be 0 \(all\) or more"),
    ("compress", "brotli_quality", 99, r"compress\.brotli_quality: 99 is out of range: must be in \[0, 11\]"),
    ("compress", "lzma_preset", 42, r"compress\.lzma_preset: 42 is out of range: must be in \[0, 9\]"),
    ("compress", "compressor", "zip", r"compress\.compressor: 'zip' is not a choice: must be one of brotli, lzma"),
    ("compress", "shuffle_stride", 0, r"compress\.shuffle_stride: 0 is out of range: must be in \[1, 255\]"),
    ("compress", "code_files", [1], r"compress\.code_files\[0\]: expected a string, got 1"),
    ("quantize", "matrix_bits", 9, r"quantize\.matrix_bits: 9 is out of range: must be in \[2, 8\]"),
    ("quantize", "mlp_bits", 1, r"quantize\.mlp_bits: 1 is out of range: must be in \[2, 8\]"),
    ("quantize", "attn_clip_sigmas", -1, r"quantize\.attn_clip_sigmas: -1\.0 is out of range: must be > 0\.0"),
    ("quantize", "fit_max_clip_sigmas", 0.5, r"quantize\.fit_max_clip_sigmas: 0\.5 is not allowed: must exceed"),
    ("quantize", "block_size", 0, r"quantize\.block_size: 0 is out of range: must be >= 1"),
    ("calibrate", "calibration_batch_tokens", 100, r"calibrate\.calibration_batch_tokens: 100 is not allowed: must be "
     r"a multiple of seq_len \(2048\)"),
    ("calibrate", "calibration_batches", 0, r"calibrate\.calibration_batches: 0 is out of range: must be >= 1"),
    ("tokenize", "vocab_size", 0, r"tokenize\.vocab_size: 0 is out of range: must be in \[1, 65536\]"),
    ("tokenize", "shard_size", 2**31, r"tokenize\.shard_size: 2147483648 is out of range: must be in \[1, 2147483647\]"),
    ("tokenize", "num_val_docs", 0, r"tokenize\.num_val_docs: 0 is out of range: must be >= 1"),
    ("tokenize", "num_workers", -1, r"tokenize\.num_workers: -1 is out of range: must be >= 0"),
    ("tokenize", "shards_path", "x", r"tokenize\.shards_path: 'x' is not allowed: needs tokenizer_path"),
    ("tokenize", "embedded_max_docs", 10, r"tokenize\.embedded_max_docs: 10 is not allowed: must exceed num_val_docs"),
]


@pytest.mark.parametrize("name, key, value, message", BAD_VALUES, ids=lambda v: str(v)[:24])
def test_every_bad_value_is_one_line_naming_file_section_key_value_and_range(tmp_path, name, key, value, message):
    path = write(tmp_path, f"{name}:\n  {key}: {value}\n" if not isinstance(value, list) else f"{name}: {{{key}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}") as caught:
        load_params(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):  # the same through --set
        load_params(write(tmp_path, f"{name}: {{}}\n"), [f"{name}.{key}={value}"])


def test_values_are_checked_however_a_section_is_built():
    with pytest.raises(ConfigError, match=r"^eval_stride: 0 is out of range"):
        EvaluateConfig(eval_stride=0)
    with pytest.raises(ConfigError, match=r"^brotli_quality: 12 is out of range"):
        dataclasses.replace(CompressConfig(), brotli_quality=12)
    assert TrainConfig(max_wallclock_seconds=0, gptq_reserve_seconds=12).max_wallclock_seconds == 0.0
    assert QuantizeConfig(mlp_bits=5).mlp_bits == 5 and TrainConfig(compile=False).compile is False


def test_every_field_declares_what_it_allows():
    """No int or float field is left unbounded by accident: each has a Range or is listed here."""
    import typing

    free = {("model", "qk_gain_init")}  # any finite gain (negative flips the attention logits' sign)
    for name, cls in SECTIONS.items():
        for key, hint in typing.get_type_hints(cls, include_extras=True).items():
            bare = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) \
                else hint
            if bare in (int, float):
                assert (name, key) in free, f"{name}.{key} is an unbounded number"


def test_a_missing_section_is_named_not_taken_for_the_record(tmp_path):
    path = write(tmp_path, "tokenize: {}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: missing section\(s\) model, train; write e\.g\. "
                                          r"`model: \{\}` for the record's defaults"):
        load_params(path, required=["tokenize", "model", "train"])
    params = load_params(write(tmp_path, "tokenize: {}\nmodel: {}\ntrain:\n"), required=["model", "train"])
    assert section(params, "train", TrainConfig) == TrainConfig()
    with pytest.raises(ConfigError, match=r"^given: missing section\(s\) evaluate"):
        require_sections(params, ["train", "evaluate"], "given")


def test_a_params_file_that_is_not_utf8_or_not_readable_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"train:\n  seed: 1\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 22: invalid "):
        load_params(path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: params file not found"):
        load_params(tmp_path)
    path.write_text("train: [1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid YAML: .*line 2") as caught:
        load_params(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"--set 'train.seed=\[1': not a YAML value"):
        load_params(write(tmp_path, "train: {}\n"), ["train.seed=[1"])
