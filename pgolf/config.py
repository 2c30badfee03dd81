"""Typed configuration of every stage, read from ``params.yaml``.

Each DVC stage reads one or more sections of ``params.yaml`` (``tokenize:``,
``model:``, ``train:``, ``calibrate:``, ``quantize:``, ``compress:``,
``evaluate:``, ``ttt:``, ``export:``); each section maps onto one frozen dataclass below. Key names
are the reference script's hyperparameter names in lower case, and the
defaults are the record's values (PR #1394), so an empty section means "the
record". Every field declares what it allows beside it (``Literal`` choices,
``Range`` bounds, cross-field rules in the section's ``check``), and
``load_params`` builds every section it reads once, so an unknown key, a wrong
type, a value out of range, a missing required section or an unreadable file is
one ``ConfigError`` naming the file, the section, the key, the value and what is
allowed, before any work. A new section or choice is one more dataclass in
``SECTIONS`` or one more ``Literal`` value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A params file, section, key or value that cannot be used."""


def run_setting(default: Any) -> Any:
    """A field that changes how a run goes (logging, checkpoints, workers), not what it produces.

    ``dvc.yaml`` does not list such keys, so changing one re-runs nothing (tests/pipeline/test_deps.py).
    """
    return field(default=default, metadata={"affects_outputs": False})


def output_keys(cls: type) -> list[str]:
    """The fields of a config section that the outputs of the stages reading it depend on."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("affects_outputs", True)]


# ---------------------------------------------------------------- declared ranges and choices
#
# A field's type says everything that is allowed: ``Literal[...]`` lists the
# choices, ``Annotated[int | float, Range(...)]`` the range. Rules that tie
# fields together live in each section's ``check``. Both run whenever a section
# is built (``load_params`` builds every section it reads, once), so a bad value
# is one line naming the file, the section, the key, the value and what is allowed.


@dataclass(frozen=True)
class Range:
    """Inclusive (``ge``/``le``) or exclusive (``gt``/``lt``) bounds of a number."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        return f"<= {self.le}" if self.le is not None else f"< {self.lt}"


Positive = Annotated[int, Range(ge=1)]
Count = Annotated[int, Range(ge=0)]  # 0 usually means "off" or "all"
PositiveFloat = Annotated[float, Range(gt=0.0)]
NonNegative = Annotated[float, Range(ge=0.0)]
Fraction = Annotated[float, Range(ge=0.0, le=1.0)]
Decay = Annotated[float, Range(ge=0.0, lt=1.0)]  # momenta and Adam betas
Bits = Annotated[int, Range(ge=2, le=8)]  # codes are stored as int8 (pgolf.quant.gptq.SUPPORTED_BITS)
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]  # numpy's seed range
VocabSize = Annotated[int, Range(ge=1, le=2**16)]  # ids are stored as uint16
Device = Literal["auto", "cpu", "cuda"]
Compile = bool | Literal["auto"]  # auto: compile on the GPU only


class Section:
    """Base of every section: checks each field against its declared type, then ``check``."""

    def __post_init__(self) -> None:
        for name, hint in type_hints(type(self)).items():
            object.__setattr__(self, name, _check_type(getattr(self, name), hint, name))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ``ConfigError("key: ...")``."""


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed: {rule}")


@dataclass(frozen=True)
class TokenizeConfig(Section):
    """Documents -> SentencePiece tokenizer -> challenge-format shards."""

    docs_path: str = ""  # JSON Lines of {"text": ...}; empty: the embedded corpus
    tokenizer_path: str = ""  # an existing .model to reuse; empty: train one
    shards_path: str = ""  # already-tokenized shards to validate instead of tokenizing
    data_dir: str = "data"  # where the shards and the tokenizer are written (under the run directory)
    vocab_size: VocabSize = 8192  # SentencePiece vocabulary of a trained tokenizer (a reused one must have this size)
    tokenizer_train_docs: Positive = 5_000_000  # documents (from the training split) the tokenizer is trained on
    num_val_docs: Positive = 50_000  # the first this many documents are the validation split (the challenge: 50,000)
    shard_size: Annotated[int, Range(ge=1, le=2**31 - 1)] = 100_000_000  # the header's int32 count
    num_workers: Count = run_setting(0)  # encoding processes; 0: every core
    embedded_max_docs: Count = 0  # embedded corpus: keep this many documents (0: all)
    # stdlib: the standard library's docs (1.8 MB); stdlib_torch: plus torch's and its requirements' (~14 MB)
    embedded_corpus: Literal["stdlib", "stdlib_torch"] = "stdlib"
    # none: the text as it is; caseops: the frontier's lossless case transform before the tokenizer
    # (docs/BYTES.md), its markers reserved as ids 4..7, the shards with a byte sidecar (docs/BYTES.md)
    text_transform: Literal["none", "caseops"] = "none"

    def check(self) -> None:
        _require(not self.shards_path or bool(self.tokenizer_path), "shards_path", self.shards_path,
                 "needs tokenizer_path, the .model the shards were made with")
        embedded = not (self.docs_path or self.shards_path)
        _require(not embedded or self.embedded_max_docs == 0 or self.embedded_max_docs > self.num_val_docs,
                 "embedded_max_docs", self.embedded_max_docs,
                 f"must exceed num_val_docs ({self.num_val_docs}) to leave documents for training")


@dataclass(frozen=True)
class ModelConfig(Section):
    """The recurrent GPT of docs/DESIGN.md §3 (35,943,512 parameters as is)."""

    vocab_size: VocabSize = 8192  # embedding rows; must equal the tokenizer's vocabulary
    num_layers: Positive = 11  # transformer blocks (before looping)
    model_dim: Positive = 512  # width of the residual stream
    embedding_dim: Positive = 512  # width of the token embedding; != model_dim: projected in and out
    num_heads: Positive = 8  # query heads; head dimension = model_dim / num_heads
    num_kv_heads: Positive = 4  # key/value heads (grouped-query attention); divides num_heads
    mlp_mult: PositiveFloat = 4.0  # MLP hidden width = mlp_mult × model_dim
    rope_base: PositiveFloat = 10000.0  # rotary base frequency
    rope_dims: Annotated[int, Range(ge=2)] = 16  # even, at most the head dimension
    # the length the rotary base is tuned for; longer rows rescale it (rope_ntk_scaling)
    rope_train_seq_len: Positive = 2048
    qk_gain_init: float = 4.0  # initial per-head gain on the normalised queries (#1855: 5.0)
    logit_softcap: PositiveFloat = 30.0  # logits = c·tanh(z / c)
    xsa_last_n: Count = 11  # more than num_layers: every layer
    num_loops: Count = 2  # extra passes over layers loop_start..loop_end once looping is on (0: no loop)
    loop_start: Count = 4  # first layer of the looped range
    loop_end: Count = 5  # last layer of the looped range (inclusive)
    skip_gates_enabled: bool = True  # learned sigmoid gates on the U-Net skip connections (false: plain weighted skips)
    tie_embeddings: bool = True  # the output head is the transposed token embedding
    tied_embed_init_std: NonNegative = 0.005  # normal init std of the tied embedding
    ln_scale: bool = True  # scale each block's normalised input by 1/sqrt(layer + 1)
    # The variants' options (PR #576, PR #1218: docs/VARIANTS.md §4, §6); off, the record's model.
    mlp_activation: Literal["leaky_relu2", "relu2"] = "leaky_relu2"  # the record, #1218 | #576
    mlp_leaky_slope: NonNegative = 0.5  # negative slope of leaky_relu2 before squaring
    bigram_vocab_size: Count = 0  # BigramHash buckets (#576: 8192); 0: no BigramHash
    bigram_dim: Positive = 128  # width of a BigramHash bucket's vector (projected to model_dim)
    # true: #576's SmearGate after the embedding norm; modded: #1855's, on the raw embedding, BOS-masked
    smear_gate: bool | Literal["modded"] = False
    ve_layers: list[Count] = field(default_factory=list)  # layers given value embeddings (#576, #1218: [9, 10])
    ve_dim: Positive = 128  # width of a value embedding (projected to the kv width)
    scaled_proj_init: bool = False  # #576: orthogonal ".proj" weights (not zero-initialised) times 1/sqrt(2 L)
    # The frontier's options (PR #1855: docs/FRONTIER.md); off, the record's model.
    rope_ntk_scaling: bool = True  # rescale the rotary base beyond rope_train_seq_len (#1855, ROPE_YARN=0: false)
    parallel_start_layer: Count = 0  # > 0: decoder layers from this index on run two residual lanes (#1855: 8)
    parallel_final_lane: Literal["mean", "attn", "mlp"] = "mean"  # what leaves the lanes: their mean, or one lane
    attn_gate: Literal["none", "sparse"] = "none"  # sparse: σ(scale · W · n[:gate_window]) per head (#1855)
    attn_gate_scale: PositiveFloat = 1.0  # the sparse gate's pre-activation scale (#1855: 0.5)
    gate_window: Positive = 12  # input channels of the sparse attention gate and the modded SmearGate

    def check(self) -> None:
        _require(self.model_dim % self.num_heads == 0, "model_dim", self.model_dim,
                 f"must be a multiple of num_heads ({self.num_heads})")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads ({self.num_heads})")
        head_dim = self.model_dim // self.num_heads
        _require(self.rope_dims % 2 == 0 and self.rope_dims <= head_dim, "rope_dims", self.rope_dims,
                 f"must be even and at most the head dimension model_dim / num_heads = {head_dim}")
        _require(int(self.mlp_mult * self.model_dim) >= 1, "mlp_mult", self.mlp_mult,
                 "leaves the MLP without hidden units")
        _require(self.num_loops == 0 or self.loop_start <= self.loop_end < self.num_layers, "loop_end",
                 self.loop_end, f"the loop range needs loop_start ({self.loop_start}) <= loop_end < num_layers "
                 f"({self.num_layers}), or num_loops 0")
        _require(self.bigram_vocab_size != 1, "bigram_vocab_size", self.bigram_vocab_size,
                 "must be 0 (off) or at least 2")
        _require(all(layer < self.num_layers for layer in self.ve_layers)
                 and len(set(self.ve_layers)) == len(self.ve_layers), "ve_layers", self.ve_layers,
                 f"must be distinct layer indices in 0..{self.num_layers - 1}")
        # The lanes replace the residual stream from their first layer on: every later decoder step
        # must be a lane layer, so the looped range lies wholly before them.
        _require(self.parallel_start_layer < self.num_layers and (
                 self.parallel_start_layer == 0 or self.num_loops == 0 or self.parallel_start_layer > self.loop_end),
                 "parallel_start_layer", self.parallel_start_layer,
                 f"must be 0 (off) or a layer after the loop range (loop_end {self.loop_end}) and below "
                 f"num_layers ({self.num_layers})")
        read_widths = ([self.model_dim] if self.attn_gate == "sparse" else []) + \
            ([self.embedding_dim] if self.smear_gate == "modded" else [])
        _require(all(self.gate_window <= width for width in read_widths), "gate_window", self.gate_window,
                 f"must be at most the width the gates read ({min(read_widths, default=0)})")


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisers, schedule, batches and run-time of the train stage."""

    seed: Seed = 1337  # seeds the initialisation and the data order (the exported script: SEED overrides it)
    iterations: Positive = 20000  # the step count the schedule is laid out for (the wall clock usually stops first)
    max_wallclock_seconds: NonNegative = 600.0  # 0: schedule by step / iterations
    gptq_reserve_seconds: NonNegative = 12.0  # seconds of the wall-clock budget kept for calibration after the loop
    warmdown_frac: Fraction = 0.667  # final fraction of training over which the lr scale falls linearly to min_lr
    warmup_steps: Count = 20  # compile warm-up steps, undone afterwards
    enable_looping_at: Fraction = 0.5  # fraction of training after which the looped layers run (num_loops)
    train_batch_tokens: Positive = 786_432  # tokens per optimiser step over all processes
    train_seq_len: Positive = 2048  # tokens per training row
    grad_accum_steps: Positive = 8  # micro-batches per step over all processes
    min_lr: Fraction = 0.0  # the floor of the learning-rate scale
    embed_lr: NonNegative = 0.6  # Adam lr of an untied token embedding
    head_lr: NonNegative = 0.008  # Adam lr of an untied output head
    tied_embed_lr: NonNegative = 0.03  # Adam lr of the tied embedding
    matrix_lr: NonNegative = 0.02  # Muon lr of the 2-D block matrices
    scalar_lr: NonNegative = 0.02  # Adam lr of vectors, scalars and gates
    muon_momentum: Decay = 0.99  # Muon's Nesterov momentum after the warm-up
    muon_momentum_warmup_start: Decay = 0.92  # Muon's momentum at step 0, rising linearly to muon_momentum
    muon_momentum_warmup_steps: Count = 1500  # steps of that rise
    muon_backend_steps: Positive = 5  # Newton–Schulz iterations per orthogonalisation
    muon_row_normalize: bool = True  # normalise each row of the update before orthogonalising (MuonEq-R)
    beta1: Decay = 0.9  # Adam beta1
    beta2: Decay = 0.95  # Adam beta2 (#1855: 0.99)
    adam_eps: PositiveFloat = 1e-8  # Adam epsilon
    adam_wd: NonNegative = 0.02  # decoupled weight decay of the Adam groups
    muon_wd: NonNegative = 0.085  # decoupled weight decay of the Muon matrices
    embed_wd: NonNegative = 0.085  # decoupled weight decay of the embedding
    grad_clip_norm: NonNegative = 0.3  # 0: no clipping
    ema_decay: Fraction = 0.997  # the exported weights are this EMA of the trained ones (final_weights: ema)
    # The variants' training (docs/VARIANTS.md §4.5, §5.1, §6); the defaults are the record's.
    warmdown_iters: Count = 0  # > 0: PR #576's warm-down over this many steps' worth of time (replaces warmdown_frac)
    late_qat_threshold: Fraction = 0.0  # > 0: QAT on once the lr multiplier drops below this (PR #576: 0.5)
    qat_clip_range: Positive = 15  # the fake-quant grid: codes -r-1..r (PR #576: int5)
    qat_quantile: Annotated[float, Range(gt=0.0, le=1.0)] = 0.9995  # the fake-quant row clip: this quantile of |w|
    swa_every: Count = 0  # > 0: average the weights every this many steps once the lr multiplier is below swa_threshold
    swa_threshold: Fraction = 0.2  # swa_every: average only while the lr multiplier is below this
    final_weights: Literal["ema", "swa"] = "ema"  # the declared choice (PR #576 picked by a validation eval: not allowed)
    # the record | PR #1218 | PR #576 | PR #1855's BOS-aligned document packing (one row per micro-batch,
    # attention inside each document in segments of at most train_seq_len)
    loader: Literal["shuffled", "coprime", "sequential", "packed"] = "shuffled"
    # packed: spans of this many ranks start together in a shard or move on to the next one (PR #1855's
    # 8 GPUs); a setting, not the process count, so the data is the same on any number of processes
    packed_ranks: Positive = 8
    # The frontier's optimiser (PR #1855: docs/FRONTIER.md); the defaults are the record's.
    muon_ns_coeffs: Literal["fixed", "polar_express"] = "fixed"  # one tuple every step | five tuples in turn
    muon_bf16: bool = False  # #1855: gradient and momentum in bf16, the shape factor applied with the lr in fp32
    grad_clip_scope: Literal["global", "local"] = "global"  # clip the averaged gradient | each rank's own first
    nproc_per_node: Positive = 1  # processes under torchrun (the stage launches them)
    device: Device = "auto"  # auto: cuda when there is one, else cpu
    compile: Compile = "auto"  # torch.compile the model (auto: on cuda only)
    train_log_every: Count = run_setting(50)  # print the loss every this many steps
    checkpoint_every: Count = run_setting(0)  # 0: no intermediate checkpoints
    val_loss_every: Count = run_setting(0)  # 0: no validation during training
    val_max_tokens: Count = run_setting(0)  # validation during training on this many tokens (0: the whole split)

    def check(self) -> None:
        step = self.grad_accum_steps * self.train_seq_len
        _require(self.train_batch_tokens % step == 0, "train_batch_tokens", self.train_batch_tokens,
                 f"must be a multiple of grad_accum_steps * train_seq_len = {self.grad_accum_steps} * "
                 f"{self.train_seq_len}")
        _require(self.grad_accum_steps % self.nproc_per_node == 0, "grad_accum_steps", self.grad_accum_steps,
                 f"must be a multiple of nproc_per_node ({self.nproc_per_node})")
        _require(self.max_wallclock_seconds == 0 or self.max_wallclock_seconds > self.gptq_reserve_seconds,
                 "max_wallclock_seconds", self.max_wallclock_seconds,
                 f"must be 0 (no limit) or more than gptq_reserve_seconds ({self.gptq_reserve_seconds})")
        _require(self.val_max_tokens == 0 or self.val_max_tokens > self.train_seq_len, "val_max_tokens",
                 self.val_max_tokens, f"must be 0 (all) or more than train_seq_len ({self.train_seq_len})")
        _require(self.final_weights != "swa" or self.swa_every > 0, "final_weights", self.final_weights,
                 "swa needs swa_every > 0 (no SWA is taken otherwise)")



@dataclass(frozen=True)
class CalibrateConfig(Section):
    """Hessians of the layer inputs for GPTQ (docs/DESIGN.md §4)."""

    calibration_batches: Positive = 64  # batches of training data whose activations make the Hessians
    calibration_batch_tokens: Positive = 98_304  # tokens per batch (48 sequences of 2048)
    seq_len: Positive = 2048  # tokens per calibration row
    seed: Seed = 1337  # which training rows are drawn
    device: Device = "auto"  # auto: cuda when there is one, else cpu
    # also each weight's output sensitivity E[(∂ℓ/∂y)²] (a backward pass per batch), for
    # quantize.allocate_distortion: loss
    output_sensitivity: bool = False

    def check(self) -> None:
        _require(self.calibration_batch_tokens % self.seq_len == 0, "calibration_batch_tokens",
                 self.calibration_batch_tokens, f"must be a multiple of seq_len ({self.seq_len})")


@dataclass(frozen=True)
class QuantizeConfig(Section):
    """GPTQ with SDClip (docs/DESIGN.md §5) and per-group overrides."""

    matrix_bits: Bits = 6  # bits per code of the block matrices (int6)
    matrix_clip_sigmas: PositiveFloat = 12.85  # SDClip: each row's clip = this × its standard deviation
    embed_bits: Bits = 8  # bits per code of the token embedding
    embed_clip_sigmas: PositiveFloat = 20.0  # SDClip multiple of the embedding
    embed_gptq: bool = True  # False: round the embedding to nearest (PR #1218)
    mlp_bits: Bits | None = None  # None: matrix_bits
    mlp_clip_sigmas: PositiveFloat | None = None  # None: matrix_clip_sigmas
    attn_bits: Bits | None = None  # None: matrix_bits
    attn_clip_sigmas: PositiveFloat | None = None  # None: matrix_clip_sigmas
    block_size: Positive = 128  # GPTQ's lazy-update block of columns
    damping: NonNegative = 0.01  # GPTQ's diagonal damping, a fraction of the mean of diag H
    passthrough_max_numel: Count = 65_536  # float tensors of at most this many elements are kept as fp16
    fit_to_size: bool = False  # bisect matrix_clip_sigmas to fit the size limit
    fit_margin_bytes: Count = 10_000  # the fit stops within this many bytes under the limit
    fit_min_clip_sigmas: PositiveFloat = 1.0  # the clip bracket the fit searches
    fit_max_clip_sigmas: PositiveFloat = 64.0  # its upper end
    fit_tolerance: PositiveFloat = 0.01  # the fit stops when the bracket is narrower than this
    # what fit_to_size bisects: matrix_clip_sigmas (log scale, fit_min/max_clip_sigmas), or rate-aware
    # GPTQ's rate_lambda from 0 to fit_max_rate_lambda at the configured clip
    fit_knob: Literal["clip_sigmas", "rate_lambda"] = "clip_sigmas"
    fit_max_rate_lambda: PositiveFloat = 1.0  # fit_knob rate_lambda: the top of the λ bracket
    device: Device = "auto"  # where GPTQ runs
    # The variants' export (docs/VARIANTS.md §4.6, §5.2, §6); the defaults are the record's SDClip GPTQ.
    # record | PR #1412's per-row clip (hessian_clip_lambda) | each row's step by its output sensitivity
    # (needs calibrate.output_sensitivity) | PR #576 | PR #1218
    scale_search: Literal["sdclip", "hessian_sdclip", "loss_sdclip", "row_percentiles", "matrix_percentiles"] = "sdclip"
    gptq_column_order: Literal["descending", "ascending"] = "descending"  # ascending: PR #576
    gptq_dense_inverse: bool = False  # PR #576: spread errors through H⁻¹ itself, not its Cholesky factor
    table_clip_quantile: Fraction = 0.0  # > 0: int8 per-row rounding of the embedding tables at this |w| quantile
    prune_fraction: Annotated[float, Range(ge=0.0, lt=1.0)] = 0.0  # PR #576: 0.02 of each large matrix's smallest |w|
    # Beyond SDClip (README "Quantization methods"); the defaults keep the record's export.
    hessian_clip_lambda: Annotated[float, Range(ge=0.0, le=1.0)] = 0.175  # clip k·σ·[1 + λ(r − 1)]
    gate_int8: bool = False  # QuantGate (04-22): int8 per-row codes for small gate matrices, not fp16
    # which gates: small_gates (pgolf: every small 2-D matrix named *gate*, skip_gates included) |
    # attn_gate_w (PR #1855: *.attn_gate_w of 32..8192 elements only)
    gate_rule: Literal["small_gates", "attn_gate_w"] = "small_gates"
    lqer_rank: Count = 0  # > 0: LQER, a rank-r correction of the residual (PR #1797)
    lqer_bits: Bits = 4  # bits of the correction's factors (asym: of its symmetric fallback)
    # method fixed: correct the tensors with the largest error (0: all): H-weighted (hessian), Frobenius (asym)
    lqer_max_tensors: Count = 0
    # hessian: pgolf's, fitted in the H-weighted norm, per-row factors, kept where it helps | asym: PR #1855's,
    # plain SVD, A int2 {-2..1} with one scale, B int4 {-8..7} per lqer_group values
    lqer_mode: Literal["hessian", "asym"] = "hessian"
    lqer_group: Positive = 64  # asym: values of B per scale
    # > 0: rate-aware GPTQ, each code the one of its two neighbours of least H-weighted error + λ·bits
    # under the ans coder's model of its column (pgolf.quant.rate.rate_terms); 0: the nearest, as ever
    rate_lambda: NonNegative = 0.0
    # fixed: the bits and clips above; allocate: bits and clip per tensor by rate–distortion, within
    # compress.size_limit_bytes (pgolf.quant.allocate)
    method: Literal["fixed", "allocate"] = "fixed"
    # method allocate: the bit widths each tensor may get
    allocate_bits: list[Bits] = field(default_factory=lambda: [5, 6, 7, 8])
    # method allocate: the clip multiples each tensor may get
    allocate_clip_sigmas: list[PositiveFloat] = field(default_factory=lambda: [8.0, 10.0, 12.85, 16.0, 20.0])
    allocate_rate_lambdas: list[NonNegative] = field(default_factory=lambda: [0.0])  # rate_lambda per candidate
    # hessian: each tensor's tr(ΔHΔᵀ); loss: its rows weighted by the output sensitivities that
    # calibrate.output_sensitivity collects, so layers compare in loss (pgolf.quant.allocate)
    allocate_distortion: Literal["hessian", "loss"] = "hessian"

    @property
    def uses_output_sensitivity(self) -> bool:
        """Whether quantizing needs the output sensitivities that calibrate collects."""
        return self.scale_search == "loss_sdclip" or (self.method == "allocate" and self.allocate_distortion == "loss")

    @property
    def rate_aware(self) -> bool:
        """Whether some GPTQ pass may price codes by their bits (rate_lambda > 0 anywhere: set, searched or tried)."""
        return (self.rate_lambda > 0 or (self.method == "allocate" and max(self.allocate_rate_lambdas, default=0) > 0)
                or (self.fit_to_size and self.fit_knob == "rate_lambda"))

    def check(self) -> None:
        _require(self.fit_min_clip_sigmas < self.fit_max_clip_sigmas, "fit_max_clip_sigmas",
                 self.fit_max_clip_sigmas, f"must exceed fit_min_clip_sigmas ({self.fit_min_clip_sigmas})")
        clip_sigmas_used = self.scale_search in ("sdclip", "hessian_sdclip", "loss_sdclip")
        _require(not self.fit_to_size or clip_sigmas_used, "fit_to_size", self.fit_to_size,
                 f"bisects matrix_clip_sigmas, which scale_search {self.scale_search!r} does not use")
        _require(self.method == "fixed" or not self.fit_to_size, "method", self.method,
                 "sizes the artifact itself: set fit_to_size false")
        _require(self.method == "fixed" or (clip_sigmas_used and self.table_clip_quantile == 0),
                 "method", self.method,
                 "chooses bits and clip sigmas: needs an SDClip scale_search and no table rounding")
        _require(self.method == "fixed" or self.lqer_mode == "hessian" or not self.lqer_rank, "lqer_mode",
                 self.lqer_mode, "picks its tensors over the whole model: use it with method fixed")
        _require(bool(self.allocate_bits), "allocate_bits", self.allocate_bits, "must list at least one width")
        _require(bool(self.allocate_clip_sigmas), "allocate_clip_sigmas", self.allocate_clip_sigmas,
                 "must list at least one clip")
        _require(bool(self.allocate_rate_lambdas), "allocate_rate_lambdas", self.allocate_rate_lambdas,
                 "must list at least one λ (0: nearest codes)")
        _require(not self.rate_aware or clip_sigmas_used, "rate_lambda", self.rate_lambda,
                 f"rate-aware GPTQ needs an SDClip scale_search, not {self.scale_search!r}")


@dataclass(frozen=True)
class CompressConfig(Section):
    """Pickle-free serialisation, byte shuffle and entropy coding (section 6)."""

    # ans: pgolf.artifact.ans's model-based coder; pergroup: PR #1855's per-group lrzip (needs the lrzip program)
    compressor: Literal["brotli", "lzma", "zstd", "ans", "pergroup"] = "brotli"
    brotli_quality: Annotated[int, Range(ge=0, le=11)] = 11  # brotli's quality (the records: 11)
    lzma_preset: Annotated[int, Range(ge=0, le=9)] = 6  # lzma's preset
    zstd_level: Annotated[int, Range(ge=1, le=22)] = 22  # zstd's level
    # byte shuffle before the general coders: bytes at offsets ≡ 0 (mod stride), then ≡ 1, …
    shuffle_stride: Annotated[int, Range(ge=1, le=255)] = 2
    size_limit_bytes: Positive = 16_000_000  # the challenge's limit on code + artifact
    compress_code: bool = True  # ship the code as one compressed stream, as the records' self-extracting scripts
    # its coder: brotli-11 (the records'), or lrzip -z -L 9 (about 15 % fewer code bytes; the script then needs the
    # lrzip program, as compressor pergroup's artifact does)
    code_compressor: Literal["brotli", "lrzip"] = "brotli"
    # the params the script carries: all (every output key), or changed (only the values that differ from the code's
    # defaults, which the shipped config fills in: about 2,900 bytes fewer on the record preset; a retune of a key at
    # its default then changes the script's length, so quantize and compress re-run)
    bake_params: Literal["all", "changed"] = "all"
    # the exported script's entry module (first: what its main reaches ships) and any others (shipped whole)
    code_files: list[str] = field(default_factory=lambda: ["pgolf/submit/runner.py"])

    @property
    def script_compressor(self) -> str | None:
        """The compressor of the exported script's modules: ``code_compressor``, or None (plain text)."""
        return self.code_compressor if self.compress_code else None


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """Plain and sliding-window bpb of the artifact (stage evaluate) and the trained weights (prequant)."""

    eval_seq_len: Positive = 2048  # tokens per scored window
    eval_stride: Positive = 64  # at most eval_seq_len
    eval_batch_seqs: Positive = 32  # windows per forward pass
    eval_plain: bool = True  # score non-overlapping windows
    eval_sliding: bool = True  # score sliding windows (each token with up to eval_seq_len - eval_stride of context)
    max_val_tokens: Count = 0  # 0: the whole validation split
    nproc_per_node: Positive = 1  # processes under torchrun, each scoring a share of the windows
    device: Device = "auto"  # auto: cuda when there is one, else cpu
    compile: Compile = "auto"  # torch.compile the forward pass
    temperature: PositiveFloat = 1.0  # fixed T dividing the soft-capped logits when scoring (PR #576: 0.98)

    def check(self) -> None:
        _require(self.eval_stride <= self.eval_seq_len, "eval_stride", self.eval_stride,
                 f"must be in [1, eval_seq_len] = [1, {self.eval_seq_len}]")
        _require(self.eval_plain or self.eval_sliding, "eval_sliding", self.eval_sliding,
                 "eval_plain and eval_sliding are both false: nothing to evaluate")
        _require(self.max_val_tokens == 0 or self.max_val_tokens > self.eval_seq_len, "max_val_tokens",
                 self.max_val_tokens, f"must be 0 (all) or more than eval_seq_len ({self.eval_seq_len})")


@dataclass(frozen=True)
class TTTConfig(Section):
    """Score-first test-time training of the artifact (docs/VARIANTS.md §2), off by default.

    Each method reads its own keys, whose defaults are that method's record settings, so
    ``ttt.method`` alone switches between the variants: ``sgd_all`` (04-06, PR #1413)
    and ``adamw_tail`` (PR #576) adapt one model along the sliding windows; ``lora_doc``
    (PR #1586) adapts per-document LoRA; ``phased`` (04-22) adds global SGD phases to it, and
    with ``presets/frontier.yaml``'s keys is #1855's TTT (docs/TTT.md).
    """

    enabled: bool = False  # false: the stage scores nothing and says so in its metrics
    method: Literal["sgd_all", "adamw_tail", "lora_doc", "phased"] = "sgd_all"  # what adapts (docs/TTT.md)
    seq_len: Positive = 2048  # window (sgd_all, adamw_tail) or the longest context (lora_doc, phased)
    stride: Positive = 64  # sliding-window stride (sgd_all, adamw_tail)
    temperature: PositiveFloat = 1.0  # fixed T dividing the soft-capped logits in the scoring pass only
    max_val_tokens: Count = 0  # 0: the whole validation split
    seed: Seed = 1337  # draws the LoRA A matrices (per document, or the process's stream: lora_draws)
    # sgd_all / adamw_tail (style A): one model adapted chunk by chunk, never reset.
    lr: NonNegative = 0.005  # peak of the cosine over chunks (PR #576: 1e-4)
    epochs: Count = 3  # passes over each chunk's tokens after scoring it
    chunk_tokens: Positive = 32_768  # PR #576: 131,072
    momentum: Decay = 0.9  # SGD (sgd_all)
    adam_beta1: Decay = 0.9  # AdamW (adamw_tail)
    adam_beta2: Decay = 0.999  # AdamW (adamw_tail)
    grad_clip: NonNegative = 1.0  # global gradient-norm clip (0: none)
    batch_seqs: Positive = 256  # training sequences per step over all processes (the records' 32 per GPU x 8)
    score_batch_seqs: Positive = 32  # windows per scoring batch (per process)
    last_n_blocks: Count = 2  # adamw_tail: blocks trained, besides every *norm*/*scale*/lm_head parameter
    # lora_doc / phased (style B): per-document LoRA, reset per document.
    lora_rank: Positive = 96  # r of every adapter
    lora_lr: NonNegative = 1e-4  # the adapters' AdamW, constant
    lora_chunk_tokens: Positive = 48  # predictions per chunk of a document
    lora_batch_docs: Positive = 64  # documents adapted side by side
    lora_beta1: Decay = 0.0  # the adapters' AdamW beta1 (0: no momentum)
    lora_beta2: Decay = 0.999  # the adapters' AdamW beta2 (#1855: 0.99)
    lora_eps: PositiveFloat = 1e-10  # the adapters' AdamW eps
    lora_weight_decay: NonNegative = 0.5  # the adapters' decoupled weight decay, A and B alike
    lora_steps: Count = 1  # optimiser steps per chunk
    lora_k: bool = True  # adapters on K, O and the MLP (Q, V and the head always)
    lora_o: bool = True  # adapter on the attention output (reads the block's normalised input)
    lora_mlp: bool = True  # adapter on the MLP output
    lora_alpha: PositiveFloat | None = None  # output x alpha / rank (#1855: 144); None: no scale
    lora_warm_start_a: bool = False  # keep A across the full-size groups of a phase (#1855); B, AdamW reset
    # how a fresh A is drawn: "document" from a generator seeded by (seed, document index), independent of
    # the batch; "record" from one CPU generator seeded by seed per process, a draw each time an adapter set
    # is built or reset, in the record's module order (#1855's draws, for parity)
    lora_draws: Literal["document", "record"] = "document"
    # phased: global SGD on all base weights over already-scored documents.
    phase_prefix_docs: Count = 2000  # documents the phases train on in all (#1855: 2500)
    phase_count: Count = 3  # phases; phase k ends at floor(prefix * k / count) documents
    phase_lr: NonNegative = 0.001  # SGD's peak, on a cosine over the phase's chunks
    phase_momentum: Decay = 0.9  # SGD momentum, a fresh optimiser per phase
    phase_chunk_tokens: Positive = 32_768  # the cosine's chunks; the last chunk is skipped
    phase_epochs: Count = 1  # passes over each chunk
    phase_grad_clip: NonNegative = 1.0  # global gradient-norm clip (0: none)
    # which documents a phase trains on: "queue" the first boundary documents of the queue (longest first),
    # pausing after the fewest groups holding them; "shortest" the record's (#1855): at most one pause per
    # group, once the documents scored reach the boundary, on the shortest boundary documents scored so far
    phase_rule: Literal["queue", "shortest"] = "queue"
    # how a phase batches its sequences: "windows" seq_len windows, attention and targets kept inside each
    # document; "packed" each process's sequences as one packed row, segments from every BOS capped at
    # phase_seq_len, every target counted (#1855)
    phase_rows: Literal["windows", "packed"] = "windows"
    phase_seq_len: Positive | None = None  # a phase's sequence length and segment cap; None: seq_len
    nproc_per_node: Positive = 1  # processes under torchrun
    device: Device = "auto"  # auto: the GPU when there is one
    compile: Compile = "auto"  # torch.compile the scoring forward (sgd_all, adamw_tail)

    def check(self) -> None:
        _require(self.stride <= self.seq_len, "stride", self.stride, f"must be at most seq_len ({self.seq_len})")


@dataclass(frozen=True)
class ExportConfig(Section):
    """The records folder of ``pgolf export``: submission.json's fields and the declared hardware."""

    name: str = "pgolf"  # submission.json's name; the folder is DATE_NAME
    author: str = ""  # submission.json's author
    github_id: str = ""  # submission.json's github_id
    blurb: str = ""  # the README's and submission.json's one-paragraph description
    date: str = ""  # YYYY-MM-DD; empty: the day of the export (UTC)
    hardware: str = "8xH100 80GB SXM"  # what the submission declares (the track's hardware)


SECTIONS: dict[str, type] = {
    "tokenize": TokenizeConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "calibrate": CalibrateConfig,
    "quantize": QuantizeConfig,
    "compress": CompressConfig,
    "evaluate": EvaluateConfig,
    "ttt": TTTConfig,
    "export": ExportConfig,
}

C = TypeVar("C")


class ParamsFile(dict):
    """The sections of a params file, remembering which file they came from (for error messages)."""

    def __init__(self, sections: dict[str, dict[str, Any]], source: str):
        super().__init__(sections)
        self.source = source


def load_params(
    path: str | Path, overrides: list[str] | None = None, required: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """Read a params file, apply ``section.key=value`` overrides (values in YAML) and validate it.

    Every section present is built once here, so any bad key or value is
    reported now, naming this file; ``required`` sections must be present
    (``require_sections``).
    """
    path = Path(path)
    params = ParamsFile(_parse_sections(path, _read_text(path)), source=str(path))
    for item in overrides or []:
        _apply_override(params, item)
    for name, values in params.items():
        from_dict(SECTIONS[name], values, f"{path}: {name}")
    require_sections(params, required, str(path))
    return params


class ParamsLoader(yaml.SafeLoader):
    """YAML with numbers read as people write them: ``1e-4`` and ``2E5`` are numbers.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent (``1.0e-4``),
    so ``1e-4`` would be the string ``'1e-4'``; YAML 1.2, and DVC reading ``params.yaml``,
    take it for a number. This loader adds the exponent forms YAML 1.1 lacks.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """A YAML document or ``--set`` value, numbers as :class:`ParamsLoader` reads them."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a SafeLoader)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the params file: {exc.strerror or exc}") from None


def _parse_sections(path: Path, text: str) -> dict[str, dict[str, Any]]:
    try:
        params = read_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    for name, values in params.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {name!r} (known: {', '.join(SECTIONS)})")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping")
    return {name: dict(values or {}) for name, values in params.items()}


def require_sections(params: dict[str, dict[str, Any]], names: Iterable[str], source: str = "params.yaml") -> None:
    """Refuse params that lack any of ``names``, listing every missing one.

    A missing section is never taken for the record's defaults (which would
    start a record-sized run); an empty one (``train: {}``) is.
    """
    missing = [name for name in names if name not in params]
    if missing:
        raise ConfigError(
            f"{source}: missing section(s) {', '.join(missing)}; write e.g. `{missing[0]}: {{}}` for the "
            "record's defaults, or start from a file in presets/"
        )


def _apply_override(params: dict[str, dict[str, Any]], item: str) -> None:
    key, sep, raw = item.partition("=")
    section_name, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    if section_name not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section_name!r} (known: {', '.join(SECTIONS)})")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: not a YAML value: {' '.join(str(exc).split())}") from None
    params.setdefault(section_name, {})[name] = value


def section(params: dict[str, dict[str, Any]], name: str, cls: type[C], source: str = "params.yaml") -> C:
    """Build the dataclass ``cls`` from ``params[name]``, strictly (absent: the defaults); errors name the file read."""
    return from_dict(cls, params.get(name, {}), f"{getattr(params, 'source', source)}: {name}")


def from_dict(cls: type[C], values: dict[str, Any], where: str) -> C:
    """Build ``cls`` from a mapping, refusing unknown keys, wrong types and values out of range."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return {name: hint for name, hint in typing.get_type_hints(cls, include_extras=True).items()
            if name in {f.name for f in dataclasses.fields(cls)}}


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *marks = typing.get_args(hint)
        ranges = [m.describe() for m in marks if isinstance(m, Range)]
        return f"{describe(base)} {' and '.join(ranges)}".strip()
    if origin is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if origin is list:
        return f"a list of {describe(typing.get_args(hint)[0])}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, repr(hint))


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it is of type ``hint`` (ints widened to float); else a ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *marks = typing.get_args(hint)
        try:
            value = _check_type(value, base, where)
        except ConfigError as exc:
            if " is not a finite" in str(exc):
                raise
            raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}") from None
        for mark in marks:
            if isinstance(mark, Range) and not mark.contains(value):
                raise ConfigError(f"{where}: {value!r} is out of range: must be {mark.describe()}")
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{where}: {value!r} is not a choice: must be {describe(hint)}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, typing.get_args(hint), where, hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is int and isinstance(value, float) and value.is_integer():  # 2e4, as a count is often written
        return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint not in (bool, int, float, str):
        raise ConfigError(f"{where}: unsupported type {hint!r}")
    raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")


def _check_union(value: Any, options: tuple[Any, ...], where: str, hint: Any) -> Any:
    """The first option that accepts ``value``; a range error of the matching type wins over a type error."""
    errors = []
    for option in options:
        try:
            return _check_type(value, option, where)
        except ConfigError as exc:
            errors.append(str(exc))
    in_type = [e for e in errors if " is out of range" in e or " is not a finite" in e]
    raise ConfigError(in_type[0] if in_type else f"{where}: expected {describe(hint)}, got {value!r}")


def complete_params(params: dict[str, dict[str, Any]], source: str = "params.yaml") -> dict[str, dict[str, Any]]:
    """Every section and key, with pgolf's defaults filled in (validated)."""
    return {name: to_dict(section(params, name, cls, source)) for name, cls in SECTIONS.items()}


def render_params(params: dict[str, dict[str, Any]], source: str = "params.yaml") -> str:
    """The YAML text of ``complete_params``: a params.yaml in which ``dvc exp run -S`` finds every key."""
    return yaml.safe_dump(complete_params(params, source), sort_keys=False, default_flow_style=False)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain mapping of a config dataclass (for logs, metrics and checkpoints)."""
    return dataclasses.asdict(config)
