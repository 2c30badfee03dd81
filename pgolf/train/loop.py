"""The training loop of docs/DESIGN.md §3, from one CPU core to N GPUs.

``train`` runs the reference's loop on a ``GPT``: per step it zeroes the
gradients, back-propagates every micro-batch (``loss / accumulation``), sets
Muon's momentum warm-up and the learning-rate warm-down (by wallclock fraction,
or by step without a time budget), switches layer looping on at
``enable_looping_at``, clips, steps every optimiser and updates the EMA whose
weights are the result. Before the clock starts, compile warm-up steps run and
are undone. On the GPU the model is cast to bf16 except for the linear weights
and control tensors and runs under bf16 autocast; on the CPU it runs in float32
(or, asked to, in the GPU's bf16 precision).
Batches come from any ``BatchSource`` (the shard loader, or recorded batches).
The variants' options (docs/VARIANTS.md §4.5, §5.1): PR #576's warm-down by iterations
converted to wallclock, its late QAT (turned on by setting each CastedLinear's
``fake_quant``, which the compiled graph guards on, so it recompiles) and SWA
every ``swa_every`` steps below a learning-rate threshold, kept by a declared
rule (``final_weights``) rather than by a validation score.
Checkpoints hold everything a resumed run needs to finish with the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pgolf.config import ModelConfig, TrainConfig, to_dict
from pgolf.data.accounting import ValidationStream, load_validation_stream
from pgolf.data.loader import make_loader
from pgolf.data.shards import shard_files
from pgolf.distributed import DistContext, any_rank, barrier
from pgolf.eval.bpb import eval_plain
from pgolf.model.gpt import GPT, CastedLinear, FakeQuant
from pgolf.runtime import autocast, mixed_precision, progress_bar, seed_everything, use_compile
from pgolf.train.checkpoint import (
    CHECKPOINT_NAME,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pgolf.train.optim import Optimizers, build_optimizers, is_control_tensor, muon_momentum_at

# inputs [B, T], targets [B, T]; a packed loader adds cu_seqlens [S] (its row's segments, B = 1)
MicroBatch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]
Validator = Callable[[GPT], tuple[float, float]]  # model -> (val_loss, val_bpb)

class BatchSource(Protocol):
    """Where a run's micro-batches come from: this rank's share of any step."""

    def micro_batches(self, step: int) -> Sequence[MicroBatch]: ...

    def state_dict(self) -> dict: ...

    def check_state(self, state: dict, source: str) -> None: ...



class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (names the first such step)."""


@dataclass
class TrainResult:
    """What a run produced: EMA weights (in the model's dtypes) and its history."""

    ema_state: dict[str, Tensor]
    losses: list[float]  # mean training loss of every step
    history: list[dict]  # one row per logging step
    steps: int
    elapsed_s: float  # training time, without warm-up, checkpoints and validation
    stopped_by_wallclock: bool
    tokens_per_step: int  # over all ranks
    val_history: list[dict]  # step, val_loss, val_bpb every val_loss_every steps
    swa_state: dict[str, Tensor] | None = None  # the SWA average (model dtypes), when any was taken
    final_weights: str = "ema"  # which average the run declared as its result
    qat_step: int | None = None  # the step QAT turned on at
    swa_snapshots: int = 0

    @property
    def final_state(self) -> dict[str, Tensor]:
        """The weights the run declared as its result: the EMA, or the SWA average."""
        if self.final_weights == "swa":
            if self.swa_state is None:
                raise ValueError("train.final_weights is swa but no SWA snapshot was taken "
                                 "(the lr multiplier never fell below train.swa_threshold)")
            return self.swa_state
        return self.ema_state


# ---------------------------------------------------------------- schedule


def budget_seconds(cfg: TrainConfig) -> float | None:
    """The training time budget (wallclock minus the GPTQ reserve); None: by step."""
    if cfg.max_wallclock_seconds <= 0:
        return None
    return cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds


def training_fraction(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    budget = budget_seconds(cfg)
    if budget is None:
        return step / max(cfg.iterations, 1)
    return elapsed_s / max(budget, 1e-9)


def lr_scale(fraction: float, cfg: TrainConfig) -> float:
    """1, then linear to 0 (at least ``min_lr``) over the last ``warmdown_frac``."""
    if cfg.warmdown_frac <= 0 or fraction < 1.0 - cfg.warmdown_frac:
        return 1.0
    return max((1.0 - fraction) / cfg.warmdown_frac, cfg.min_lr)


def warmdown_iters_scale(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """PR #576's warm-down: over the last ``warmdown_iters`` steps, or with a time budget over the
    time that many steps take at the mean step time so far (remaining / (warmdown_iters * mean step))."""
    budget = budget_seconds(cfg)
    if budget is None:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        return max((cfg.iterations - step) / cfg.warmdown_iters, 0.0) if start <= step < cfg.iterations else 1.0
    warmdown_s = cfg.warmdown_iters * elapsed_s / max(step, 1)
    remaining_s = max(budget - elapsed_s, 0.0)
    return remaining_s / max(warmdown_s, 1e-12) if remaining_s <= warmdown_s else 1.0


def schedule_scale(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """The learning-rate multiplier of ``step``: ``warmdown_iters`` when set, else ``warmdown_frac``."""
    if cfg.warmdown_iters > 0:
        return warmdown_iters_scale(step, elapsed_s, cfg)
    return lr_scale(training_fraction(step, elapsed_s, cfg), cfg)


# ---------------------------------------------------------------- model set-up


def apply_dtype_policy(model: GPT, device: torch.device, bf16: bool) -> GPT:
    """Move ``model`` to ``device``: the reference's mixed policy for bf16, else float32."""
    model = model.to(device)
    return cast_mixed_precision(model) if bf16 else model.float()


def cast_mixed_precision(model: GPT) -> GPT:
    """bf16, then linear weights and control tensors back to fp32 (tok_emb stays bf16)."""
    model = model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    for name, param in model.named_parameters():
        if param.ndim < 2 or is_control_tensor(name):
            param.data = param.data.float()
    return model


# ---------------------------------------------------------------- EMA


def ema_init(model: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().float().clone() for name, t in model.state_dict().items()}


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], model: nn.Module, decay: float) -> None:
    for name, t in model.state_dict().items():
        ema[name].mul_(decay).add_(t.detach().float(), alpha=1.0 - decay)


def ema_in_model_dtypes(ema: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    current = model.state_dict()
    return {name: t.to(dtype=current[name].dtype).cpu() for name, t in ema.items()}


@torch.no_grad()
def swa_add(swa: dict[str, Tensor], model: nn.Module) -> None:
    """Add the live weights to the SWA sums (float32, initialised on the first call)."""
    for name, t in model.state_dict().items():
        if name in swa:
            swa[name].add_(t.detach().float())
        else:
            swa[name] = t.detach().float().clone()


# ---------------------------------------------------------------- the loop


class Trainer:
    """One training run of ``model`` on ``batches`` (this process's share of it)."""

    def __init__(self, model: GPT, cfg: TrainConfig, batches: BatchSource, ctx: DistContext,
                 checkpoint_dir: Path | None = None, progress: bool = True, validate: Validator | None = None,
                 bf16: bool | None = None):
        if cfg.val_loss_every > 0 and validate is None:
            raise ValueError("train.val_loss_every is set but no validation data was given")
        self.cfg, self.batches, self.ctx, self.validate = cfg, batches, ctx, validate
        self.checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        self.progress = progress and ctx.is_main
        self.bf16 = mixed_precision(ctx.device) if bf16 is None else bf16
        self.model = apply_dtype_policy(model, ctx.device, self.bf16)
        self.optimizers: Optimizers = build_optimizers(self.model, cfg)
        runner: nn.Module = self.model
        if use_compile(cfg.compile, ctx.device, "train.compile"):
            runner = torch.compile(runner, dynamic=False, fullgraph=True)
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            runner = DistributedDataParallel(runner, device_ids=device_ids, broadcast_buffers=False)
        self.runner = runner
        self.step = 0
        self.elapsed_s = 0.0
        self.losses: list[Tensor | float] = []  # device tensors until read: no sync per step
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.ema: dict[str, Tensor] = {}
        self.swa: dict[str, Tensor] = {}  # sums of swa_count snapshots
        self.swa_count = 0
        self.qat_step: int | None = None
        self.tokens_per_step = 0
        self.losses_checked = 0  # losses before this index are known to be finite

    # one optimisation step -------------------------------------------------

    def train_step(self, step: int, scale: float) -> Tensor:
        """Accumulate this rank's micro-batches of ``step``, then step; the global mean loss (0-dim)."""
        self.optimizers.zero_grad()
        micro_batches = self.batches.micro_batches(step)
        total = torch.zeros((), device=self.ctx.device)
        self.tokens_per_step = sum(batch[0].numel() for batch in micro_batches) * self.ctx.world_size
        clip_local = self.cfg.grad_clip_scope == "local"
        for index, (inputs, targets, *segments) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            packed = {} if not segments else {"cu_seqlens": segments[0].to(self.ctx.device),
                                              "max_seqlen": self.cfg.train_seq_len}
            with self._grad_sync(last and not clip_local):
                with autocast(self.ctx.device, self.bf16):
                    loss = self.runner(inputs.to(self.ctx.device), targets.to(self.ctx.device), **packed)
                (loss / len(micro_batches)).backward()
            total += loss.detach()
        self.optimizers.set_schedule(scale, muon_momentum_at(step, self.cfg))
        if self.cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        if clip_local:
            self._average_gradients()  # #1855: each rank clipped its own gradient before the average
        self.optimizers.step()
        return self._global_mean(total / len(micro_batches))

    def _grad_sync(self, sync: bool):
        # DDP all-reduces the gradients once, on the last micro-batch (never, when clipping locally).
        if isinstance(self.runner, DistributedDataParallel) and not sync:
            return self.runner.no_sync()
        return contextlib.nullcontext()

    def _average_gradients(self) -> None:
        """The mean of every rank's gradient, as DDP's all-reduce would have left it."""
        if not self.ctx.distributed:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])  # one collective per dtype
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.ctx.world_size
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _global_mean(self, value: Tensor) -> Tensor:
        if self.ctx.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.ctx.world_size
        return value

    # compile warm-up -------------------------------------------------------

    def warm_up(self) -> None:
        """Run the warm-up steps (looping off, then on) and restore model and optimisers."""
        if self.cfg.warmup_steps <= 0:
            return
        model_state = {name: t.detach().cpu().clone() for name, t in self.model.state_dict().items()}
        optimizer_state = copy.deepcopy(self.optimizers.state_dict())
        loop_phases = [False, True] if self.model.config.num_loops > 0 else [False]
        qat_phases = [None, self.fake_quant()] if self.cfg.late_qat_threshold > 0 else [None]
        phases = [(looping, qat) for qat in qat_phases for looping in loop_phases]  # every graph the run compiles
        for looping, qat in progress_bar(phases, desc="compile warm-up", show=self.progress, leave=False):
            self.model.looping_active = looping
            self.model.set_fake_quant(qat)
            for step in range(self.cfg.warmup_steps):
                self.train_step(step, 1.0)
        self.model.looping_active = False
        self.model.set_fake_quant(None)
        self.model.load_state_dict(model_state, strict=True)
        self.optimizers.load_state_dict(optimizer_state)
        self.optimizers.zero_grad()

    # checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "looping_active": self.model.looping_active,
            "model": {name: t.detach().cpu() for name, t in self.model.state_dict().items()},
            "optimizers": self.optimizers.state_dict(),
            "ema": {name: t.cpu() for name, t in self.ema.items()},
            "swa": {name: t.cpu() for name, t in self.swa.items()},
            "swa_count": self.swa_count,
            "qat_step": self.qat_step,
            "loader": self.batches.state_dict(),
            "rng": rng_state(),
            "losses": self.loss_values(),
            "history": list(self.history),
            "val_history": list(self.val_history),
            "model_config": to_dict(self.model.config),
            "train_config": to_dict(self.cfg),
        }

    def resume(self) -> bool:
        """Continue from the checkpoint, if there is one; True when resumed."""
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return False
        state = load_checkpoint(self.checkpoint_path)
        check_resumable(state, self.model, self.cfg, self.checkpoint_path)
        self.batches.check_state(state["loader"], str(self.checkpoint_path))
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizers.load_state_dict(state["optimizers"])
        self.ema = {name: t.to(self.ctx.device) for name, t in state["ema"].items()}
        self.swa = {name: t.to(self.ctx.device) for name, t in state.get("swa", {}).items()}
        self.swa_count, self.qat_step = state.get("swa_count", 0), state.get("qat_step")
        if self.qat_step is not None:
            self.model.set_fake_quant(self.fake_quant())
        set_rng_state(state["rng"])
        self.step, self.elapsed_s = state["step"], state["elapsed_s"]
        self.model.looping_active = state["looping_active"]
        self.losses, self.history = list(state["losses"]), list(state["history"])
        self.val_history = list(state["val_history"])
        if self.ctx.is_main:
            print(f"[pgolf train] resumed from {self.checkpoint_path} at step {self.step}", flush=True)
        return True

    def save(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint_path, self.state_dict())
        barrier(self.ctx)

    # the run ---------------------------------------------------------------

    def run(self, on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Warm up, resume if possible, train until the step or time budget is spent."""
        self.warm_up()
        resumed = self.resume()
        if not resumed:
            self.ema = ema_init(self.model)
        budget = budget_seconds(self.cfg)
        stopped_by_wallclock = False
        bar = progress_bar(total=self.cfg.iterations, initial=self.step, desc="train", unit="step", show=self.progress)
        clock = self._sync_clock()
        while self.step < self.cfg.iterations and not stopped_by_wallclock:
            elapsed_s = self.elapsed_s + time.perf_counter() - clock
            fraction = training_fraction(self.step, elapsed_s, self.cfg)
            if self.model.config.num_loops > 0 and not self.model.looping_active \
                    and fraction >= self.cfg.enable_looping_at:
                self.model.looping_active = True
            scale = schedule_scale(self.step, elapsed_s, self.cfg)
            self._maybe_start_qat(scale, bar)
            self.losses.append(self.train_step(self.step, scale))
            ema_update(self.ema, self.model, self.cfg.ema_decay)
            self.step += 1
            if self.cfg.swa_every > 0 and scale < self.cfg.swa_threshold and self.step % self.cfg.swa_every == 0:
                swa_add(self.swa, self.model)
                self.swa_count += 1
            self.elapsed_s += time.perf_counter() - clock
            stopped_by_wallclock = budget is not None and any_rank(self.elapsed_s >= budget, self.ctx)
            finished = stopped_by_wallclock or self.step == self.cfg.iterations
            bar.update(1)
            if finished or self._due(self.cfg.train_log_every) or self._due(self.cfg.checkpoint_every):
                try:
                    self.check_losses_finite()
                except TrainingDiverged:
                    bar.close()  # the error line comes after the bar, not inside it
                    raise
            if finished or self._due(self.cfg.train_log_every):
                self._log(scale, bar)
            if on_step is not None:
                on_step(self.step)
            if self.cfg.val_loss_every > 0 and (finished or self._due(self.cfg.val_loss_every)):
                self._validate(bar)
            if self.checkpoint_path is not None and self._due(self.cfg.checkpoint_every):
                self.save()
            clock = time.perf_counter()  # validation and checkpoint time is not training time
        bar.close()
        return TrainResult(
            ema_state=ema_in_model_dtypes(self.ema, self.model), losses=self.loss_values(),
            history=list(self.history), steps=self.step, elapsed_s=self.elapsed_s,
            stopped_by_wallclock=stopped_by_wallclock, tokens_per_step=self.tokens_per_step,
            val_history=list(self.val_history), swa_state=self.swa_average(),
            final_weights=self.cfg.final_weights, qat_step=self.qat_step, swa_snapshots=self.swa_count,
        )

    def check_losses_finite(self) -> None:
        """Stop a diverged run, naming the first step whose loss is NaN or infinite.

        Losses stay on the device between log and checkpoint steps (no sync per
        step), so they are checked there: before anything is logged or saved.
        """
        recent = self.losses[self.losses_checked:]
        if not recent:
            return
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.ctx.device) for v in recent]).cpu()
        bad = torch.nonzero(~torch.isfinite(values)).flatten()  # [K]
        if bad.numel():
            step = self.losses_checked + int(bad[0]) + 1
            raise TrainingDiverged(
                f"train: the training loss is {float(values[bad[0]])} at step {step} of {self.cfg.iterations}: "
                "the run diverged (try lower learning rates or grad_clip_norm); no model was written")
        self.losses_checked = len(self.losses)

    def fake_quant(self) -> FakeQuant:
        return FakeQuant(self.cfg.qat_clip_range, self.cfg.qat_quantile)

    def _maybe_start_qat(self, scale: float, bar: tqdm) -> None:
        """PR #576's late QAT: on (for good) once the lr multiplier is below ``late_qat_threshold``."""
        if self.cfg.late_qat_threshold > 0 and self.qat_step is None and scale < self.cfg.late_qat_threshold:
            self.model.set_fake_quant(self.fake_quant())
            self.qat_step = self.step
            if self.progress:
                bar.write(f"step {self.step}: QAT on (lr scale {scale:.4f})")

    def swa_average(self) -> dict[str, Tensor] | None:
        if not self.swa_count:
            return None
        return ema_in_model_dtypes({name: t / self.swa_count for name, t in self.swa.items()}, self.model)

    def loss_values(self) -> list[float]:
        return [float(loss) for loss in self.losses]

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _validate(self, bar: tqdm) -> None:
        """Score the live weights on the main rank (the others wait at the barrier)."""
        if self.ctx.is_main:
            val_loss, val_bpb = self.validate(self.model)
            self.model.train()
            self.val_history.append({"step": self.step, "val_loss": val_loss, "val_bpb": val_bpb})
            if self.progress:
                bar.write(f"step {self.step}/{self.cfg.iterations} val_loss {val_loss:.4f} val_bpb {val_bpb:.4f}")
        barrier(self.ctx)

    def _sync_clock(self) -> float:
        """The time once queued GPU work is done (for intervals that must exclude it)."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def _log(self, scale: float, bar: tqdm) -> None:
        loss = float(self.losses[-1])
        bar.set_postfix(loss=f"{loss:.4f}", lr_scale=f"{scale:.3f}")
        row = {
            "step": self.step,
            "train_loss": loss,
            "lr_scale": scale,
            "matrix_lr": self.cfg.matrix_lr * scale,
            "tokens_per_s": self.step * self.tokens_per_step / max(self.elapsed_s, 1e-9),
            "elapsed_s": self.elapsed_s,
            "looping": int(self.model.looping_active),
        }
        self.history.append(row)
        if self.progress:
            bar.write(f"step {self.step}/{self.cfg.iterations} loss {loss:.4f} lr_scale {scale:.3f} "
                      f"tok/s {row['tokens_per_s']:.0f} elapsed {self.elapsed_s:.1f}s")


def train(model: GPT, cfg: TrainConfig, batches: BatchSource, ctx: DistContext,
          checkpoint_dir: Path | None = None, progress: bool = True,
          on_step: Callable[[int], None] | None = None, validate: Validator | None = None,
          bf16: bool | None = None) -> TrainResult:
    """Train ``model`` in place on ``batches``; resumes from ``checkpoint_dir`` when it holds one.

    ``on_step(step)`` is called after every step (before its checkpoint); ``validate``
    scores the live model every ``val_loss_every`` steps. ``bf16`` (None: on the GPU only)
    applies the record's mixed precision: the dtype policy and bf16 autocast.
    """
    return Trainer(model, cfg, batches, ctx, checkpoint_dir, progress, validate, bf16).run(on_step)


def plain_validator(stream: ValidationStream, cfg: TrainConfig, device: torch.device) -> Validator:
    """Plain validation loss and bpb of the live model in training-length windows."""
    batch_seqs = cfg.train_batch_tokens // (cfg.grad_accum_steps * cfg.train_seq_len)  # a training micro-batch

    def validate(model: GPT) -> tuple[float, float]:
        score = eval_plain(model, stream, cfg.train_seq_len, batch_seqs, device)
        return score.loss, score.bpb

    return validate


def run_metrics(result: TrainResult, num_params: int, ctx: DistContext) -> dict:
    """The figures of a finished run, for ``out/train/metrics.json``."""
    metrics = {
        "train_loss": result.losses[-1],
        "steps": result.steps,
        "train_time_s": result.elapsed_s,
        "tokens": result.steps * result.tokens_per_step,
        "tokens_per_s": result.steps * result.tokens_per_step / max(result.elapsed_s, 1e-9),
        "stopped_by_wallclock": result.stopped_by_wallclock,
        "model_params": num_params,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
    }
    if result.qat_step is not None:
        metrics["qat_step"] = result.qat_step
    if result.swa_snapshots:
        metrics["swa_snapshots"] = result.swa_snapshots
    if result.val_history:
        metrics |= {"val_loss": result.val_history[-1]["val_loss"], "val_bpb": result.val_history[-1]["val_bpb"]}
    return metrics


def train_model(model_cfg: ModelConfig, cfg: TrainConfig, dataset_dir: Path, tokenizer_path: Path,
                ctx: DistContext, checkpoints: Path | None) -> tuple[GPT, TrainResult]:
    """A model of ``model_cfg`` trained on the shards of ``dataset_dir`` (this rank's share; checked by the caller)."""
    loader = make_loader(cfg.loader, shard_files(dataset_dir, "train"), cfg.train_seq_len, cfg.seed,
                         cfg.train_batch_tokens, cfg.grad_accum_steps, ctx.rank, ctx.world_size, cfg.packed_ranks)
    validate = None
    if cfg.val_loss_every > 0:
        stream = load_validation_stream(dataset_dir, tokenizer_path, model_cfg.vocab_size, cfg.train_seq_len,
                                        cfg.val_max_tokens)
        validate = plain_validator(stream, cfg, ctx.device)
    seed_everything(cfg.seed)
    model = GPT(model_cfg)
    return model, train(model, cfg, loader, ctx, checkpoints, validate=validate)
