"""Typed configuration of every stage, read from ``params.yaml``.

Each DVC stage reads one or more sections of ``params.yaml`` (``tokenize:``,
``model:``, ``train:``, ``calibrate:``, ``quantize:``, ``compress:``,
``evaluate:``); each section maps onto one frozen dataclass below. Key names
are the reference script's hyperparameter names in lower case, and the
defaults are the record's values (PR #1394), so an empty section means "the
record". Loading is strict: an unknown key, a wrong type or a missing section
file is a ``ConfigError`` that names the file, the section and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A params file, section, key or value that cannot be used."""


@dataclass(frozen=True)
class TokenizeConfig:
    """Documents -> SentencePiece tokenizer -> challenge-format shards."""

    docs_path: str = ""  # JSON Lines of {"text": ...}; empty: the embedded corpus
    tokenizer_path: str = ""  # an existing .model to reuse; empty: train one
    shards_path: str = ""  # already-tokenized shards to validate instead of tokenizing
    data_dir: str = "data"
    vocab_size: int = 8192
    tokenizer_train_docs: int = 5_000_000
    num_val_docs: int = 50_000
    shard_size: int = 100_000_000
    num_workers: int = 0  # encoding processes; 0: every core
    embedded_max_docs: int = 0  # embedded corpus: keep this many documents (0: all)


@dataclass(frozen=True)
class ModelConfig:
    """The recurrent GPT of REFERENCE.md section 3 (35,943,512 parameters as is)."""

    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    embedding_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    rope_train_seq_len: int = 2048
    qk_gain_init: float = 4.0
    logit_softcap: float = 30.0
    xsa_last_n: int = 11
    num_loops: int = 2
    loop_start: int = 4
    loop_end: int = 5
    skip_gates_enabled: bool = True
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    ln_scale: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Optimisers, schedule, batches and run-time of the train stage."""

    seed: int = 1337
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0  # 0: schedule by step / iterations
    gptq_reserve_seconds: float = 12.0
    warmdown_frac: float = 0.667
    warmup_steps: int = 20  # compile warm-up steps, undone afterwards
    enable_looping_at: float = 0.5
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 8  # micro-batches per step over all processes
    min_lr: float = 0.0
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.03
    matrix_lr: float = 0.02
    scalar_lr: float = 0.02
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_row_normalize: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.02
    muon_wd: float = 0.085
    embed_wd: float = 0.085
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.997
    nproc_per_node: int = 1
    device: str = "auto"  # auto | cpu | cuda
    compile: bool | str = "auto"  # auto (on GPU) | true | false
    train_log_every: int = 50
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    val_loss_every: int = 0  # 0: no validation during training
    val_max_tokens: int = 0  # validation during training on this many tokens (0: the whole split)


@dataclass(frozen=True)
class CalibrateConfig:
    """Hessians of the layer inputs for GPTQ (REFERENCE.md section 4)."""

    calibration_batches: int = 64
    calibration_batch_tokens: int = 98_304  # tokens per batch (48 sequences of 2048)
    seq_len: int = 2048
    seed: int = 1337
    device: str = "auto"


@dataclass(frozen=True)
class QuantizeConfig:
    """GPTQ with SDClip (REFERENCE.md section 5) and per-group overrides."""

    matrix_bits: int = 6
    matrix_clip_sigmas: float = 12.85
    embed_bits: int = 8
    embed_clip_sigmas: float = 20.0
    embed_gptq: bool = True  # False: round the embedding to nearest (PR #1218)
    mlp_bits: int | None = None  # None: matrix_bits
    mlp_clip_sigmas: float | None = None  # None: matrix_clip_sigmas
    attn_bits: int | None = None
    attn_clip_sigmas: float | None = None
    block_size: int = 128
    damping: float = 0.01
    passthrough_max_numel: int = 65_536
    fit_to_size: bool = False  # bisect matrix_clip_sigmas to fit the size limit
    fit_margin_bytes: int = 10_000
    fit_min_clip_sigmas: float = 1.0
    fit_max_clip_sigmas: float = 64.0
    fit_tolerance: float = 0.01
    device: str = "auto"  # where GPTQ runs: auto | cpu | cuda


@dataclass(frozen=True)
class CompressConfig:
    """Pickle-free serialisation, byte shuffle and entropy coding (section 6)."""

    compressor: str = "brotli"  # brotli | lzma | zstd | ans (pgolf.entropy's model-based coder)
    brotli_quality: int = 11
    lzma_preset: int = 6
    zstd_level: int = 22
    shuffle_stride: int = 2
    size_limit_bytes: int = 16_000_000
    compress_code: bool = True  # count code as one brotli stream, as the records' self-extracting scripts
    code_files: list[str] = field(
        default_factory=lambda: [
            "pgolf/model.py",
            "pgolf/codec.py",
            "pgolf/entropy.py",  # the ans decoder: codec imports it
            "pgolf/evaluate.py",
            "pgolf/tokenizer.py",
        ]
    )


@dataclass(frozen=True)
class EvaluateConfig:
    """Plain and sliding-window bpb of the artifact and the unquantized weights."""

    eval_seq_len: int = 2048
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    eval_plain: bool = True
    eval_sliding: bool = True
    eval_unquantized: bool = True
    max_val_tokens: int = 0  # 0: the whole validation split
    nproc_per_node: int = 1  # processes under torchrun, each scoring a share of the windows
    device: str = "auto"
    compile: bool | str = "auto"  # torch.compile the forward pass: auto (on GPU) | true | false


SECTIONS: dict[str, type] = {
    "tokenize": TokenizeConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "calibrate": CalibrateConfig,
    "quantize": QuantizeConfig,
    "compress": CompressConfig,
    "evaluate": EvaluateConfig,
}

C = TypeVar("C")


def load_params(path: str | Path, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Read a params file and apply ``section.key=value`` overrides (values in YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    for name, section in params.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {name!r} (known: {', '.join(SECTIONS)})")
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping")
    params = {name: dict(section or {}) for name, section in params.items()}
    for item in overrides or []:
        _apply_override(params, item, path)
    return params


def _apply_override(params: dict[str, dict[str, Any]], item: str, path: Path) -> None:
    key, sep, raw = item.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section!r}")
    params.setdefault(section, {})[name] = yaml.safe_load(raw)


def section(params: dict[str, dict[str, Any]], name: str, cls: type[C], source: str = "params.yaml") -> C:
    """Build the dataclass ``cls`` from ``params[name]``, strictly."""
    return from_dict(cls, params.get(name, {}), f"{source}: {name}")


def from_dict(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Build ``cls`` from a mapping, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    checked = {key: _check_type(value, hints[key], f"{where}.{key}") for key, value in values.items()}
    return cls(**checked)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")


def complete_params(params: dict[str, dict[str, Any]], source: str = "params.yaml") -> dict[str, dict[str, Any]]:
    """Every section and key, with pgolf's defaults filled in (validated)."""
    return {name: to_dict(section(params, name, cls, source)) for name, cls in SECTIONS.items()}


def render_params(params: dict[str, dict[str, Any]], source: str = "params.yaml") -> str:
    """The YAML text of ``complete_params``: a params.yaml in which ``dvc exp run -S`` finds every key."""
    return yaml.safe_dump(complete_params(params, source), sort_keys=False, default_flow_style=False)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain mapping of a config dataclass (for logs, metrics and checkpoints)."""
    return dataclasses.asdict(config)
