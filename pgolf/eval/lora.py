"""Per-document low-rank adapters for test-time training (PR #1586, docs/VARIANTS.md §2.4).

``DocumentLoRA`` holds, for each of a batch of documents, its own rank-r correction
``y = (x A_bᵀ) B_bᵀ`` on the Q, K, V, O projections and the MLP of every block application
("slot": a looped layer gets one per pass) and on the head, and hands them to
``GPT.forward_logits`` as its ``adapter``. A_b is drawn from U(−1/√in, 1/√in) by a generator
seeded with the document's own index and B_b starts at zero, so a document's adapters, and
hence its losses, do not depend on which documents share its batch, and its first chunk is
scored by the base model. All A factors of all documents live in one flat parameter (and all
B factors in another): one draw per document, and one optimiser over two tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgolf.model.gpt import GPT, BlockDeltas, layer_order

KINDS = ("q", "k", "v", "o", "mlp")


@dataclass(frozen=True)
class Factor:
    """Where one adapted map's A (``rank x in_features``) and B (``out_features x rank``) sit in the flat buffers."""

    in_features: int
    out_features: int
    a_offset: int
    b_offset: int


class DocumentLoRA(nn.Module):
    """Rank-``rank`` adapters for ``num_docs`` documents on every slot of ``model`` (with its current looping)."""

    def __init__(self, model: GPT, num_docs: int, rank: int, k: bool = True, o: bool = True, mlp: bool = True):
        super().__init__()
        cfg = model.config
        kv_dim = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        widths = {"q": cfg.model_dim, "k": kv_dim, "v": kv_dim, "o": cfg.model_dim, "mlp": cfg.model_dim}
        enabled = {"q": True, "k": k, "v": True, "o": o, "mlp": mlp}
        encoder, decoder = layer_order(cfg, model.looping_active)
        self.rank = rank
        self.num_slots = len(encoder) + len(decoder)
        self.factors: dict[tuple[int, str], Factor] = {}
        a_size = b_size = 0
        for slot in range(self.num_slots):
            for kind in KINDS:
                if enabled[kind]:
                    self.factors[(slot, kind)] = Factor(cfg.model_dim, widths[kind], a_size, b_size)
                    a_size += rank * cfg.model_dim
                    b_size += widths[kind] * rank
        self.head_factor = Factor(cfg.embedding_dim, cfg.vocab_size, a_size, b_size)
        a_size += rank * cfg.embedding_dim
        b_size += cfg.vocab_size * rank
        device = model.tok_emb.weight.device
        self.A = nn.Parameter(torch.empty(num_docs, a_size, device=device))  # [docs, all A entries]
        self.B = nn.Parameter(torch.zeros(num_docs, b_size, device=device))  # [docs, all B entries]
        bounds = torch.empty(a_size, device=device)  # [all A entries]: 1/sqrt(in) of each entry's factor
        for factor in [*self.factors.values(), self.head_factor]:
            bounds[factor.a_offset : factor.a_offset + rank * factor.in_features] = 1.0 / math.sqrt(factor.in_features)
        self.register_buffer("bounds", bounds, persistent=False)

    def reset(self, doc_seeds: list[int]) -> None:
        """Fresh adapters: A_b ~ U(−bound, bound) from generator ``doc_seeds[b]``, B_b = 0."""
        if len(doc_seeds) != self.A.size(0):
            raise ValueError(f"{len(doc_seeds)} seeds for {self.A.size(0)} documents")
        with torch.no_grad():
            for row, seed in zip(self.A, doc_seeds):
                generator = torch.Generator(device=row.device).manual_seed(seed)
                row.uniform_(-1.0, 1.0, generator=generator).mul_(self.bounds)
            self.B.zero_()

    def _apply(self, factor: Factor, x: Tensor) -> Tensor:
        docs = self.A.size(0)
        a = self.A[:, factor.a_offset : factor.a_offset + self.rank * factor.in_features]
        b = self.B[:, factor.b_offset : factor.b_offset + factor.out_features * self.rank]
        a = a.view(docs, self.rank, factor.in_features).to(x.dtype)  # [docs, r, in]
        b = b.view(docs, factor.out_features, self.rank).to(x.dtype)  # [docs, out, r]
        return (x @ a.transpose(1, 2)) @ b.transpose(1, 2)  # [docs, T, out]

    def _delta(self, slot: int, kind: str):
        factor = self.factors.get((slot, kind))
        return None if factor is None else (lambda x: self._apply(factor, x))

    def block(self, slot: int) -> BlockDeltas:
        return BlockDeltas(**{kind: self._delta(slot, kind) for kind in KINDS})

    def head(self, x: Tensor) -> Tensor:
        return self._apply(self.head_factor, x)  # [docs, T, V]
