"""Micro-batches recorded elsewhere (the golden trajectory, random test batches) as a batch source."""

from __future__ import annotations

from collections.abc import Sequence

from pgolf.data.loader import MicroBatch


class RecordedBatches:
    """Micro-batches recorded elsewhere (e.g. the golden trajectory), ``per_step`` a step."""

    def __init__(self, batches: Sequence[MicroBatch], per_step: int):
        if per_step <= 0 or len(batches) % per_step:
            raise ValueError(f"{len(batches)} recorded micro-batches do not split into steps of {per_step}")
        self.batches, self.per_step = list(batches), per_step

    def micro_batches(self, step: int) -> Sequence[MicroBatch]:
        first = step * self.per_step
        if first + self.per_step > len(self.batches):
            raise ValueError(f"step {step} needs micro-batches beyond the {len(self.batches)} recorded")
        return self.batches[first:first + self.per_step]

    def state_dict(self) -> dict:
        return {"recorded": len(self.batches), "per_step": self.per_step}

    def check_state(self, state: dict, source: str) -> None:
        if state != self.state_dict():
            raise ValueError(f"{source}: recorded batches differ from the checkpoint's ({state})")
