"""Wall-clock time of a run's phases, each logged as one line and kept for the run's JSON.

The challenge gives a submission two budgets of 600 s on its declared hardware: training
(everything that reads training data, up to the written artifact) and evaluation (from the
artifact's bytes to the submission's score). Records were disputed for clocks that left
work out: Hessians collected after the training clock had stopped, decompression or
compile warm-up outside the evaluation clock. So the exported script and the stages time
every phase separately on the wall clock (after the GPU has finished its queued work),
print ``clock:NAME S.SSSs budget:B`` as each one ends and keep ``{NAME: seconds}`` for
their JSON. ``PHASES`` names every phase, the budget it counts toward and what it covers;
the compliance report (``pgolf.submit.export``) reads it to say which clock each rule uses.
``process_seconds`` is the age of the process, so the whole run includes the interpreter's
start, imports and the bundle's decompression.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf.distributed import DistContext

TRAINING, EVALUATION = "training", "evaluation"  # the two 600 s budgets of the track
# phase -> (the budget it counts toward, None: neither; what it covers)
PHASES: dict[str, tuple[str | None, str]] = {
    "startup": (None, "the interpreter's start, the bundle's decompression and the imports, before the run starts"),
    "data_checks": (None, "shard headers, the validation-leak check and the validation tokens and bytes, read "
                          "before the training clock starts"),
    "training_setup": (TRAINING, "model construction, the data loader and the compile warm-up steps"),
    "training_loop": (TRAINING, "the training steps: the clock train.max_wallclock_seconds minus "
                                "train.gptq_reserve_seconds budgets"),
    "calibration": (TRAINING, "from the loop's end to the last read of training data: the trained weights "
                              "saved and loaded, the GPTQ Hessians collected from training batches"),
    "quantization": (TRAINING, "GPTQ (and any size search) on the Hessians; no data is read"),
    "serialization": (TRAINING, "the quantized model written as bytes"),
    "compression": (TRAINING, "the bytes entropy-coded into the artifact and written"),
    "training_phase": (TRAINING, "the total: from the training clock's start until the artifact is on disk and "
                                 "every process has finished"),
    "prequant_eval": (None, "the trained weights' plain score, the quantization tax's reference: a diagnostic, "
                            "not the submission's score"),
    "decompression": (EVALUATION, "the artifact decompressed, deserialized and dequantized into the model"),
    "eval_plain": (EVALUATION, "the plain (non-overlapping windows) evaluation, compile warm-up included"),
    "eval_sliding": (EVALUATION, "the sliding-window evaluation, compile warm-up included"),
    "ttt": (EVALUATION, "score-first test-time training and its scoring, compile warm-up included"),
    "evaluation_phase": (EVALUATION, "the total: from the artifact's bytes to the submission's score"),
    "whole_process": (None, "the process's age when the run's metrics are written"),
}


def printed(line: str) -> None:
    print(line, flush=True)


@dataclass
class Clocks:
    """The phases a run has timed, in the order they ended; ``log`` prints each one's line."""

    log: Callable[[str], None] = printed
    device: torch.device | None = None  # a GPU: its queued work is waited for before the clock is read
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def on_rank(cls, ctx: DistContext) -> Clocks:
        """Clocks of one process of a group: every process times, the first one prints."""
        return cls(printed if ctx.is_main else _silent, ctx.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (not recorded when the block raises)."""
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.record(name, time.perf_counter() - start)

    def record(self, name: str, seconds: float) -> None:
        """Phase ``name`` took ``seconds`` (timed elsewhere); a phase run twice counts both times."""
        if name not in PHASES:
            raise KeyError(f"clock {name!r} is not a phase of pgolf.clocks.PHASES")
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.log(clock_line(name, seconds))

    def record_training(self, wall_s: float, loop_s: float) -> None:
        """A training call of ``wall_s`` seconds whose loop's own clock read ``loop_s``: the loop and the rest.

        A resumed loop's clock counts the earlier processes too; its setup is then not known.
        """
        self.record("training_loop", loop_s)
        if wall_s >= loop_s:
            self.record("training_setup", wall_s - loop_s)

    def record_process(self, name: str) -> None:
        """Phase ``name`` is the process's age now (nothing when the system does not say it)."""
        age = process_seconds()
        if age is not None:
            self.record(name, age)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _silent(line: str) -> None:
    del line  # the other processes' clocks are kept, not printed


def clock_line(name: str, seconds: float) -> str:
    budget = PHASES[name][0] or "none"
    return f"clock:{name} {seconds:.3f}s budget:{budget}"


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc against the boot clock), else None."""
    try:
        stat = Path("/proc/self/stat").read_text(encoding="ascii")
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime; [0] is field 3, the state
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, no CLOCK_BOOTTIME
        return None
    return age if 0.0 <= age < 1e7 else None
