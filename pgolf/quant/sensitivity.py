"""Output sensitivity: what an error in each row of a weight's output costs in loss, collected in calibration.

With ``calibrate.output_sensitivity`` calibration also collects each quantizable weight's ``E[(∂ℓ/∂y_i)²]`` per
output row (:func:`collect_output_sensitivity`, a backward pass per calibration batch after the Hessians); with
it the loss-weighted allocator (:mod:`pgolf.quant.allocate`) compares the errors of different layers in loss,
and ``quantize.scale_search: loss_sdclip`` sets each row's step by it
(:func:`pgolf.quant.gptq.sensitivity_row_factors`). An option module: calibration imports it only when the
option is on, so a script ships it only then; quantize, which reads the collected values, never imports it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from pgolf.model.gpt import GPT, CastedLinear
from pgolf.runtime import autocast, progress_bar


def collect_output_sensitivity(
    model: GPT, batches: Iterable[Tensor], device: torch.device | str, show_progress: bool = True
) -> dict[str, Tensor]:
    """Each quantizable weight's output sensitivity: the mean squared per-token loss gradient of
    each output row, ``E[(∂ℓ/∂y_i)²]`` [rows] (float32, CPU), by weight name.

    With it a weight error Δ costs about ``½ Σ_i G_i (Δ H Δᵀ)_ii`` of loss per token (the
    Gauss–Newton quadratic with the output factor's diagonal), which makes the H-weighted
    errors of different layers comparable (:mod:`pgolf.quant.allocate`). Each batch is run forward
    and backward on the next-token loss; a looped layer averages over its passes. The tied
    embedding's rows are the head's logits, whose gradient is taken before the softcap.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(key: str, grads: Tensor) -> None:  # grads: per-token gradients [..., rows]
        grads = grads.detach().float().reshape(-1, grads.shape[-1])  # [tokens, rows]
        sums[key] = sums.get(key, 0) + grads.pow(2).sum(dim=0)
        counts[key] = counts.get(key, 0) + grads.shape[0]

    scale = [1.0]  # tokens in the batch: the loss is their mean, so the hooks see gradients / tokens
    handles = [module.register_full_backward_hook(
        lambda m, grad_in, grad_out, key=f"{name}.weight": record(key, grad_out[0] * scale[0]))
        for name, module in model.named_modules() if isinstance(module, CastedLinear)]
    was_training, was_looping = model.training, model.looping_active
    model.eval()
    model.looping_active = model.config.num_loops > 0
    device = torch.device(device)
    cap = model.config.logit_softcap
    try:
        for ids in progress_bar(batches, desc="output sensitivity", unit="batch", show=show_progress):
            ids = ids.to(device)
            inputs, targets = ids[:, :-1], ids[:, 1:]  # [B, T - 1]
            scale[0] = float(targets.numel())
            with autocast(device):
                logits = model.forward_logits(inputs).float()  # [B, T - 1, V], after the softcap
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            model.zero_grad(set_to_none=True)
            loss.backward()
            if model.config.tie_embeddings:
                probs = torch.softmax(logits.detach(), dim=-1)  # [B, T - 1, V]
                probs.scatter_add_(-1, targets[..., None], -torch.ones_like(probs[..., :1]))
                record("tok_emb.weight", probs * (1 - (logits.detach() / cap).pow(2)))  # d loss / d pre-cap
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        model.looping_active = was_looping
    if not counts:
        raise ValueError("calibrate: no calibration batches")
    return {key: (sums[key] / counts[key]).cpu() for key in sorted(sums)}
