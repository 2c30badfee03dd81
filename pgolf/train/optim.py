"""The optimisers of the train stage: MuonEq-R for block matrices, AdamW for the rest.

docs/DESIGN.md §3: the 2-D weights inside the blocks are updated by
MuonEq-R (Nesterov momentum, rows normalised, orthogonalised by a bf16
Newton-Schulz iteration, decoupled weight decay); the frontier (PR #1855,
docs/FRONTIER.md) iterates with Polar Express's five coefficient tuples and
keeps gradient and momentum in bf16 (``muon_ns_coeffs``, ``muon_bf16``). The tied embedding and the
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
# PR #1344's per-iteration minimax tuples, used once each in order: fewer steps take a prefix, more
# steps still these five (PR #1855's code; the record's comment about repeating the last is wrong).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# #1855 adds the sparse attention gates, the lane mixes and its SmearGate to the control tensors.
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates",
                           "attn_gate_w", "parallel_post_lambdas", "parallel_resid_lambdas", "smear_gate",
                           "smear_lambda")
# PR #576 and #1218 (docs/VARIANTS.md §4.2, §4.3): the BigramHash and value-embedding tables join the token
# embedding's AdamW, their projections Muon; their scales and the SmearGate are control tensors.
TOKEN_TABLES = ("tok_emb.", "bigram.embed.", "ve_shared.embed.")
SEED_PROJECTIONS = ("bigram.proj.", "ve_shared.proj.")


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_TENSOR_PATTERNS)


def newton_schulz(update: Tensor, steps: int, coeffs: str = "fixed", eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a matrix in bf16 (quintic Newton-Schulz).

    ``fixed``: the record's tuple ``steps`` times; ``polar_express``: the five tuples in turn.
    Each keeps the bf16 order of operations of the code it comes from, so both match their
    records bit for bit: #1394 forms (c·A)·A, #1855 c·(A·A).
    """
    x = update.bfloat16()  # [rows, cols]
    x = x / (x.norm() + eps)
    transposed = update.size(0) > update.size(1)
    if transposed:
        x = x.T  # [cols, rows]: iterate on the wide side
    if coeffs == "polar_express":
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            gram = x @ x.T
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    else:
        a, b, c = NEWTON_SCHULZ_COEFFS
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + (c * gram) @ gram) @ x
    return x.T if transposed else x


def shape_factor(matrix: Tensor) -> float:
    """√max(1, rows/cols): Muon's step for tall matrices."""
    return max(1.0, matrix.size(0) / matrix.size(1)) ** 0.5


def muon_direction(grad: Tensor, buffer: Tensor, momentum: float, steps: int, row_normalize: bool,
                   coeffs: str = "fixed") -> Tensor:
    """The bf16 MuonEq-R update of one matrix from its gradient and (advanced) momentum ``buffer``.

    Row normalisation takes the norm in fp32 and divides in the update's dtype (fp32, or bf16 with
    ``muon_bf16``), as both records do.
    """
    update = grad.add(buffer, alpha=momentum)  # Nesterov
    if row_normalize:
        row_norms = update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)  # [rows, 1]
        update = update / row_norms.to(update.dtype)
    return newton_schulz(update, steps, coeffs)


class MuonEqR(torch.optim.Optimizer):
    """MuonEq-R; with several ranks each matrix is orthogonalised on one rank.

    Every rank keeps the momentum of every matrix (the gradients are already
    identical after DDP's all-reduce), so any rank's state is the whole state
    and a checkpoint written by rank 0 resumes on any number of ranks.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int,
                 weight_decay: float, row_normalize: bool, ns_coeffs: str = "fixed", bf16: bool = False):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                        weight_decay=weight_decay, row_normalize=row_normalize, ns_coeffs=ns_coeffs, bf16=bf16)
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
            grad = p.grad.bfloat16() if group["bf16"] else p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(grad)  # on every rank: any rank's state is the whole state
            if index % world_size == rank:
                direction = muon_direction(grad, buffer, group["momentum"], group["backend_steps"],
                                           group["row_normalize"], group["ns_coeffs"])
                if not group["bf16"]:
                    direction = direction * shape_factor(p)  # #1394 scales in bf16, #1855 with the lr
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
            step = -lr * shape_factor(p) if group["bf16"] else -lr
            p.add_(updates[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=step)
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
                   row_normalize=cfg.muon_row_normalize, ns_coeffs=cfg.muon_ns_coeffs, bf16=cfg.muon_bf16)
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
