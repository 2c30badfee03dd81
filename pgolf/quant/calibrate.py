"""Calibration Hessians for GPTQ (docs/DESIGN.md §4).

For every linear layer of the model, ``H = Σ XᵀX`` over the rows X of its
inputs (every token of every batch, and every pass through a looped layer),
divided by the number of batches; for the tied embedding, X is the input of the
output head (the final norm's output, or the head projection's when there is
one). Forward hooks collect them while the model runs its ordinary forward pass,
accumulating in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from pgolf.config import CalibrateConfig
from pgolf.data.loader import TrainLoader
from pgolf.data.shards import shard_files
from pgolf.model.files import build_model
from pgolf.model.gpt import GPT, CastedLinear
from pgolf.runtime import autocast, progress_bar, resolve_device, seed_everything


def head_input_module(model: GPT) -> nn.Module:
    """The module whose output feeds the tied head (and so plays X for ``tok_emb``)."""
    return model.head_proj if model.head_proj is not None else model.final_norm


def _accumulate(hessians: dict[str, Tensor], name: str, x: Tensor) -> None:
    x = x.detach().float().reshape(-1, x.shape[-1])  # [tokens, cols]
    if name not in hessians:
        hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    hessians[name].addmm_(x.T, x)


def register_hooks(model: GPT, hessians: dict[str, Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Input hooks on every CastedLinear, and an output hook for the tied embedding."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            key = f"{name}.weight"
            handles.append(module.register_forward_hook(lambda m, inp, out, key=key: _accumulate(hessians, key, inp[0])))
    if model.config.tie_embeddings:
        handles.append(
            head_input_module(model).register_forward_hook(
                lambda m, inp, out: _accumulate(hessians, "tok_emb.weight", out)
            )
        )
    return handles


@torch.no_grad()
def collect_hessians(
    model: GPT, batches: Iterable[Tensor], device: torch.device | str, show_progress: bool = True
) -> dict[str, Tensor]:
    """``Σ XᵀX / batches`` per weight name, float32 on the CPU; looping is switched on.

    ``batches`` yields input ids [B, T]; the model must already be on ``device``
    (on a GPU it runs under bf16 autocast, on the CPU in float32).
    """
    hessians: dict[str, Tensor] = {}
    handles = register_hooks(model, hessians)
    was_training, was_looping = model.training, model.looping_active
    model.eval()
    model.looping_active = model.config.num_loops > 0
    device = torch.device(device)
    count = 0
    try:
        for ids in progress_bar(batches, desc="calibrate", unit="batch", show=show_progress):
            # bf16 on the GPU as in training and evaluation; the hooks accumulate in float32
            with autocast(device):
                model.forward_logits(ids.to(device, non_blocking=True))  # [B, T, V], discarded
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        model.looping_active = was_looping
    if count == 0:
        raise ValueError("calibrate: no calibration batches")
    return {name: (h / count).cpu() for name, h in sorted(hessians.items())}


def calibration_batches(files: list[Path], cfg: CalibrateConfig) -> list[Tensor]:
    """The input ids [B, T] of each calibration batch, drawn by the training sampler with its own seed."""
    loader = TrainLoader(files, cfg.seq_len, cfg.seed, cfg.calibration_batch_tokens, grad_accum_steps=1)
    return [loader.micro_batch(index)[0] for index in range(cfg.calibration_batches)]


def calibration_model(model_path: Path, cfg: CalibrateConfig) -> GPT:
    """The trained model of ``model_path`` on the calibration device, the calibration seed set."""
    seed_everything(cfg.seed)
    return build_model(model_path, resolve_device(cfg.device))


def calibration_hessians(model: GPT, dataset_dir: Path, cfg: CalibrateConfig
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """GPTQ Hessians of ``model`` (collected on its device) from the training shards of ``dataset_dir``
    (checked by the caller), and with ``cfg.output_sensitivity`` the weights' output sensitivities (else {}).

    Returned on the CPU, as the calibrate stage's file gives them to the quantize stage: the exported
    runner, which quantizes straight from these, then runs what the stage runs.
    """
    batches = calibration_batches(shard_files(dataset_dir, "train"), cfg)
    device = next(model.parameters()).device
    hessians = collect_hessians(model, batches, device)
    sensitivity = {}
    if cfg.output_sensitivity:
        from pgolf.quant.sensitivity import collect_output_sensitivity  # an option module: shipped when it is on

        sensitivity = collect_output_sensitivity(model, batches, device)
    return ({name: h.cpu() for name, h in hessians.items()}, {name: g.cpu() for name, g in sensitivity.items()})
