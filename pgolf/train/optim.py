"""The optimisers of the train stage: MuonEq-R for block matrices, AdamW for the rest.

docs/DESIGN.md §3: the 2-D weights inside the blocks are updated by
MuonEq-R (Nesterov momentum, rows normalised, orthogonalised by a bf16
Newton-Schulz iteration, decoupled weight decay); the tied embedding and the
small control tensors (gains, scales, mixes, skip weights and gates) by AdamW
with their own learning rates and weight decays; an untied output head by
Adam. ``build_optimizers`` splits a ``GPT``'s parameters into these groups and
``Optimizers`` steps, schedules and checkpoints them together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.config import TrainConfig

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates")
# PR #576 and #1218 (SEEDS_SPEC §4.2, §4.3): the BigramHash and value-embedding tables join the token
# embedding's AdamW, their projections Muon; their scales and the SmearGate are control tensors.
TOKEN_TABLES = ("tok_emb.", "bigram.embed.", "ve_shared.embed.")
SEED_PROJECTIONS = ("bigram.proj.", "ve_shared.proj.")


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_TENSOR_PATTERNS)


def newton_schulz(update: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a matrix in bf16 (quintic Newton-Schulz)."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = update.bfloat16()  # [rows, cols]
    x = x / (x.norm() + eps)
    transposed = update.size(0) > update.size(1)
    if transposed:
        x = x.T  # [cols, rows]: iterate on the wide side
    for _ in range(steps):
        gram = x @ x.T
        # (c * gram) @ gram, not c * (gram @ gram): the bf16 rounding follows the reference.
        poly = b * gram + (c * gram) @ gram
        x = a * x + poly @ x
    return x.T if transposed else x


def muon_direction(grad: Tensor, buffer: Tensor, momentum: float, steps: int, row_normalize: bool) -> Tensor:
    """The bf16 MuonEq-R update of one matrix from its gradient and (advanced) momentum ``buffer``."""
    update = grad.add(buffer, alpha=momentum)  # Nesterov
    if row_normalize:
        row_norms = update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)  # [rows, 1]
        update = update / row_norms.to(update.dtype)
    update = newton_schulz(update, steps)
    return update * max(1.0, update.size(0) / update.size(1)) ** 0.5


class MuonEqR(torch.optim.Optimizer):
    """MuonEq-R; with several ranks each matrix is orthogonalised on one rank.

    Every rank keeps the momentum of every matrix (the gradients are already
    identical after DDP's all-reduce), so any rank's state is the whole state
    and a checkpoint written by rank 0 resumes on any number of ranks.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int,
                 weight_decay: float, row_normalize: bool):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                        weight_decay=weight_decay, row_normalize=row_normalize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = self._group_updates(group, params, rank, world_size)  # [sum numel] bf16
            if world_size > 1:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            self._apply(group, params, updates)
        return None

    def _group_updates(self, group: dict, params: list[Tensor], rank: int, world_size: int) -> Tensor:
        total = sum(p.numel() for p in params)
        updates = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)  # [sum numel]
        offset = 0
        for index, p in enumerate(params):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(p.grad)  # on every rank: any rank's state is the whole state
            if index % world_size == rank:
                direction = muon_direction(p.grad, buffer, group["momentum"],
                                           group["backend_steps"], group["row_normalize"])
                updates[offset:offset + p.numel()] = direction.reshape(-1)
            offset += p.numel()
        return updates

    @staticmethod
    def _apply(group: dict, params: list[Tensor], updates: Tensor) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        offset = 0
        for p in params:
            if weight_decay > 0.0:
                p.mul_(1.0 - lr * weight_decay)
            p.add_(updates[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-lr)
            offset += p.numel()


class Optimizers:
    """All optimisers of one model, stepped, scheduled and checkpointed together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], muon: MuonEqR):
        self.all = optimizers
        self.muon = muon

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def set_schedule(self, lr_scale: float, muon_momentum: float) -> None:
        """Scale every group's base learning rate and set Muon's momentum."""
        for opt in self.all:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.all):
            raise ValueError(f"checkpoint holds {len(states)} optimiser states, this model needs {len(self.all)}")
        for opt, state in zip(self.all, states, strict=True):
            opt.load_state_dict(state)


def split_parameters(model: nn.Module) -> dict[str, list[Tensor]]:
    """The model's parameters by optimiser group: matrices, control, token (embedding tables), head."""
    groups: dict[str, list[Tensor]] = {"matrix": [], "control": [], "token": [], "head": []}
    for name, p in model.named_parameters():
        if name.startswith(TOKEN_TABLES):
            groups["token"].append(p)
        elif name.startswith("lm_head."):
            groups["head"].append(p)
        elif (name.startswith("blocks.") and p.ndim == 2 and not is_control_tensor(name)) \
                or name.startswith(SEED_PROJECTIONS):
            groups["matrix"].append(p)
        elif p.ndim < 2 or is_control_tensor(name):
            groups["control"].append(p)
        else:
            raise ValueError(f"parameter {name!r} belongs to no optimiser group")
    return groups


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum, warmed up linearly over ``muon_momentum_warmup_steps``."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1.0 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def _adam(cls: type, params: list[Tensor], lr: float, weight_decay: float | None, cfg: TrainConfig):
    group = {"params": params, "lr": lr, "base_lr": lr}
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    # Fused kernels (CPU and GPU), as the reference: the same arithmetic on every device.
    return cls([group], betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True, **extra)


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> Optimizers:
    """MuonEq-R, AdamW (token embedding), AdamW (control tensors) and Adam (untied head)."""
    groups = split_parameters(model)
    muon = MuonEqR(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                   backend_steps=cfg.muon_backend_steps, weight_decay=cfg.muon_wd,
                   row_normalize=cfg.muon_row_normalize)
    for group in muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    token_lr = cfg.embed_lr if groups["head"] else cfg.tied_embed_lr
    optimizers = [
        _adam(torch.optim.AdamW, groups["token"], token_lr, cfg.embed_wd, cfg),
        muon,
        _adam(torch.optim.AdamW, groups["control"], cfg.scalar_lr, cfg.adam_wd, cfg),
    ]
    if groups["head"]:
        optimizers.insert(1, _adam(torch.optim.Adam, groups["head"], cfg.head_lr, None, cfg))
    return Optimizers(optimizers, muon)
