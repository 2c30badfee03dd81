"""Quantizing to a byte budget: what the quantize stage and the exported runner call.

``quantize_for_size`` quantizes by GPTQ at the configured clip, by the size search
(``fit_to_size``: :mod:`pgolf.quant.search`, which bisects ``matrix_clip_sigmas`` or rate-aware
GPTQ's λ until the submission fits ``compress.size_limit_bytes``) or by the rate–distortion
allocation (``method: allocate``), each measuring sizes exactly as the compress stage counts
them. The search and the allocator are option modules, imported in their branch only, so a
script ships them only when its params use them; the search's outcome (``FitResult``) is here,
for the stage and the runner that report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pgolf.artifact.size import submission_bytes
from pgolf.artifact.tensors import QuantizedModel
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.quant.gptq import quantize_model

if TYPE_CHECKING:
    from pgolf.quant.allocate import AllocationResult


@dataclass(frozen=True)
class FitPoint:
    """One evaluation of the size search."""

    clip_sigmas: float
    total_bytes: int
    fits: bool
    rate_lambda: float = 0.0


@dataclass(frozen=True)
class FitResult:
    clip_sigmas: float  # the chosen matrix_clip_sigmas (fits the limit)
    total_bytes: int
    margin_met: bool  # limit - total_bytes <= margin
    points: list[FitPoint]
    rate_lambda: float = 0.0  # the chosen rate_lambda
    knob: str = "clip_sigmas"  # what the search moved: quantize.fit_knob

    def summary(self, limit: int) -> dict:
        """The search's outcome, for the quantize report."""
        return {
            "knob": self.knob,
            "matrix_clip_sigmas": self.clip_sigmas,
            "rate_lambda": self.rate_lambda,
            "total_bytes": self.total_bytes,
            "size_limit_bytes": limit,
            "headroom_bytes": limit - self.total_bytes,
            "margin_met": self.margin_met,
            "evaluations": len(self.points),
        }


def needs_size(cfg: QuantizeConfig) -> bool:
    """Whether quantizing by ``cfg`` measures the submission's size (and so reads ``compress:``)."""
    return cfg.fit_to_size or cfg.method == "allocate"


def quantize_for_size(model_config: ModelConfig, state_dict: dict[str, Tensor], hessians: dict[str, Tensor],
                      cfg: QuantizeConfig, compress_cfg: CompressConfig | None, code: int, device: torch.device | str,
                      sensitivity: dict[str, Tensor] | None = None,
                      ) -> tuple[QuantizedModel, list[dict], FitResult | AllocationResult | None]:
    """GPTQ at ``cfg``'s clip; or, given ``compress_cfg``, at the clip that fits the submission's real size
    (``fit_to_size``) or with the bits and clips that the rate–distortion allocation chooses within it
    (its errors weighted by the output ``sensitivity`` when ``allocate_distortion`` is loss)."""
    if compress_cfg is None:
        return (*quantize_model(model_config, state_dict, hessians, cfg, device, sensitivity=sensitivity), None)

    def size_of(trial: QuantizedModel) -> int:
        return submission_bytes(trial, compress_cfg, code)

    if cfg.method == "allocate":
        from pgolf.quant.allocate import allocate_model  # here, not above: a script ships the allocator only when used

        return allocate_model(model_config, state_dict, hessians, cfg, compress_cfg, size_of, device,
                              sensitivity=sensitivity)
    from pgolf.quant.search import fit_quantize  # here, not above: a script ships the search only when it fits to size

    return fit_quantize(model_config, state_dict, hessians, cfg, size_of, compress_cfg.size_limit_bytes, device,
                        sensitivity)
