"""The Hessian file: what the calibrate stage writes and the quantize stage reads.

GPTQ's Hessians (``H = Σ XᵀX`` per weight, :mod:`pgolf.quant.calibrate`) and, when
calibrate measured them, each weight's output sensitivities, in the tagged, checksummed
tensor-file format of :mod:`pgolf.model.files`. Kept apart from the calibration code so
that quantize depends on the file's format, not on how the Hessians were collected.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from pgolf.model.files import load_tagged, save_tagged

FORMAT = "pgolf-hessians"
VERSION = 1


def save_hessians(path: str | Path, hessians: dict[str, Tensor], sensitivity: dict[str, Tensor] | None = None) -> None:
    """Write a dict of float32 Hessians by weight name (atomic), and any output sensitivities."""
    matrices = {name: h.detach().cpu().contiguous() for name, h in hessians.items()}
    payload = {"hessians": matrices}
    if sensitivity:
        payload["output_sensitivity"] = {name: g.detach().cpu().contiguous() for name, g in sensitivity.items()}
    save_tagged(path, FORMAT, VERSION, payload)


def load_hessians(path: str | Path) -> dict[str, Tensor]:
    """Read a Hessians file without unpickling code; a clear error if it is not one."""
    hessians = load_tagged(path, FORMAT, VERSION, "Hessians file", " (run the calibrate stage first)")["hessians"]
    if not isinstance(hessians, dict) or not all(
        isinstance(name, str) and isinstance(h, Tensor) and h.ndim == 2 and h.shape[0] == h.shape[1]
        for name, h in hessians.items()
    ):
        raise ValueError(f"{path}: not a Hessians file (expected a dict of square matrices by weight name)")
    return {name: h.float() for name, h in hessians.items()}


def load_output_sensitivity(path: str | Path) -> dict[str, Tensor]:
    """The output sensitivities a Hessians file carries ({} when calibrate did not collect them)."""
    found = load_tagged(path, FORMAT, VERSION, "Hessians file", " (run the calibrate stage first)").get(
        "output_sensitivity", {})
    if not isinstance(found, dict) or not all(isinstance(n, str) and isinstance(g, Tensor) and g.ndim == 1
                                              for n, g in found.items()):
        raise ValueError(f"{path}: output_sensitivity is not a dict of vectors by weight name")
    return {name: g.float() for name, g in found.items()}
