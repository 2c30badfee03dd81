"""The recurrent GPT of the record (docs/DESIGN.md §3), top to bottom.

A tied-embedding transformer with grouped-query attention, partial rotary
embeddings, per-head query gain, XSA (each head's output minus its projection
on its value vector), a squared leaky-ReLU MLP, U-Net skips with sigmoid gates
and depth recurrence: a range of layers is run several times once
``looping_active`` is set. Parameter names are the reference's, so a state
dict written by the record's ``train_gpt.py`` loads as is. The variants' options
(PR #576 and #1218, ``ModelConfig``; off by default) add BigramHash, SmearGate,
value embeddings, relu² and #576's scaled projection init, under the PRs' own
parameter names, and ``set_fake_quant`` turns #576's QAT on in every linear.
The frontier's options (PR #1855, docs/FRONTIER.md; off by default) add
document-packed rows, whose attention stays inside each segment that
``cu_seqlens`` delimits, a rotary base that does not rescale on long rows,
two residual lanes in the last layers, a sparse per-head gate on the attention
output and the modded-nanogpt SmearGate on the raw embedding, masked at each
BOS. Attention runs through FlashAttention-3 or flash-attn when importable on a
GPU, else PyTorch's scaled-dot-product attention (packed rows: FlashAttention-3's
varlen kernel, else flex attention on a GPU and masked SDPA on the CPU); all
paths compute the same function (tests check them against attention written out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from pgolf.config import ModelConfig
from pgolf.data.shards import BOS_ID

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Delta = Callable[[Tensor], Tensor]  # an additive correction computed from a sub-layer's input


@dataclass(frozen=True)
class BlockDeltas:
    """Low-rank corrections for one application of a block (test-time training, pgolf/eval/lora.py).

    ``q``, ``k``, ``v`` and ``o`` read the attention's normalised input; ``q``/``k``/``v`` are
    added to their projections and ``o`` to the attention output after its projection. ``mlp``
    reads the MLP's normalised input and is added to its output. None leaves that part alone.
    """

    q: Delta | None = None
    k: Delta | None = None
    v: Delta | None = None
    o: Delta | None = None
    mlp: Delta | None = None


class Adapter(Protocol):
    """What ``GPT.forward_logits`` asks of an adapter: deltas per block slot, and one on the head."""

    def block(self, slot: int) -> BlockDeltas: ...

    def head(self, x: Tensor) -> Tensor: ...


def _plus(y: Tensor, delta: Delta | None, x: Tensor) -> Tensor:
    return y if delta is None else y + delta(x)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """RMS normalisation without a learned weight (a module so hooks can see it)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


@dataclass(frozen=True)
class FakeQuant:
    """PR #576's QAT grid (docs/VARIANTS.md §5.1): per row, scale = max(quantile(|w|, q) / r, 1 / r), codes -r-1..r."""

    clip_range: int = 15
    quantile: float = 0.9995

    def __call__(self, weight: Tensor) -> Tensor:
        """The fake-quantized values of a [rows, cols] weight (no gradient: used through the STE)."""
        with torch.no_grad():
            w32 = weight.float()
            row_clip = torch.quantile(w32.abs(), self.quantile, dim=1)  # [rows]
            scale = (row_clip / self.clip_range).clamp_min(1.0 / self.clip_range)[:, None]  # [rows, 1]
            codes = torch.clamp(torch.round(w32 / scale), -self.clip_range - 1, self.clip_range)
            return codes * scale  # [rows, cols]


class CastedLinear(nn.Linear):
    """A linear layer whose fp32 weight is cast to the activations' dtype.

    With ``fake_quant`` set (QAT), a module in training mode multiplies by the
    fake-quantized weight through a straight-through estimator. ``fake_quant``
    is an instance attribute, so torch.compile guards on it and compiles a new
    graph when QAT turns on (PR #576's class attribute was folded away: §5.1).
    """

    fake_quant: FakeQuant | None = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.fake_quant is not None and self.training:
            w = w + (self.fake_quant(self.weight).to(x.dtype) - w).detach()  # value: fake-quantized; grad: identity
        return F.linear(x, w)


# ---------------------------------------------------------------- attention


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal attention via PyTorch, or attention under ``mask`` ([T, T], True: may attend); [B, T, H, D]."""
    group = q.size(2) // k.size(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # [B, H, T, D]
        v = v.repeat_interleave(group, dim=1)
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(1, 2)  # [B, T, H, D]


def _import_flash_attention() -> tuple[AttentionFn | None, str | None]:
    """FlashAttention-3, else flash-attn 2, else None; with the module it came from (run fingerprints name it)."""
    try:
        from flash_attn_interface import flash_attn_func as fa3
    except ImportError:
        fa3 = None
    if fa3 is not None:
        return (lambda q, k, v: fa3(q, k, v, causal=True)), "flash_attn_interface"
    try:
        from flash_attn import flash_attn_func as fa2
    except ImportError:
        return None, None
    return (lambda q, k, v: fa2(q, k, v, causal=True)), "flash_attn"


def _import_flash_varlen() -> Callable[..., Tensor] | None:
    """FlashAttention-3's varlen kernel (the frontier's packed rows), else None."""
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


# Looked up at import, not on first use: torch.compile cannot trace an import that fails
# (fullgraph would stop at it), while a module global is a constant to it.
FLASH_ATTENTION, FLASH_MODULE = _import_flash_attention()
FLASH_VARLEN = _import_flash_varlen()


def _flash_dtype(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Dispatch: flash kernels need a GPU and 16-bit inputs; otherwise SDPA."""
    if FLASH_ATTENTION is not None and _flash_dtype(q):
        return FLASH_ATTENTION(q, k, v)
    return sdpa_attention(q, k, v)


def segment_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """[T] the segment of each position of a packed row; ``cu_seqlens`` may repeat ``length`` as padding."""
    starts = torch.zeros(length + 1, dtype=torch.int32, device=cu_seqlens.device)  # [T + 1]
    starts.scatter_add_(0, cu_seqlens.long(), torch.ones_like(cu_seqlens, dtype=torch.int32))  # ends land at T
    return starts[:length].cumsum(0)  # [T]


def document_mask(cu_seqlens: Tensor, length: int) -> Tensor:
    """[T, T] causal attention within each segment: what the packed row allows, written out."""
    segments = segment_ids(cu_seqlens, length)  # [T]
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seqlens.device).tril()  # [T, T]
    return causal & (segments[:, None] == segments[None, :])


def flex_document_attention(cu_seqlens: Tensor, length: int) -> AttentionFn:
    """Flex attention under the segments' block mask: memory linear in T (fused kernels under torch.compile)."""
    segments = segment_ids(cu_seqlens, length)  # [T]

    def same_segment_causal(batch, head, q_index, kv_index):
        return (q_index >= kv_index) & (segments[q_index] == segments[kv_index])

    block_mask = create_block_mask(same_segment_causal, None, None, length, length, device=cu_seqlens.device)

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)  # [B, T, H, D]

    return attention


def document_attention(cu_seqlens: Tensor, length: int, max_seqlen: int | None = None) -> AttentionFn:
    """Causal attention that stays inside each segment ``[cu[i], cu[i+1])`` of one packed row [1, T, H, D].

    The mask (or block mask) is built once here and shared by every layer of a forward pass. On a
    GPU: FlashAttention-3's varlen kernel for 16-bit inputs (``max_seqlen``: the longest segment,
    None: the row), else flex attention; on the CPU, SDPA under the written-out mask.
    """
    if not cu_seqlens.is_cuda:
        mask = document_mask(cu_seqlens, length)  # [T, T]
        return lambda q, k, v: sdpa_attention(q, k, v, mask)
    flex = flex_document_attention(cu_seqlens, length)
    if FLASH_VARLEN is None:
        return flex
    longest = length if max_seqlen is None else max_seqlen

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not _flash_dtype(q):
            return flex(q, k, v)
        return FLASH_VARLEN(q[0], k[0], v[0], cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                            max_seqlen_q=longest, max_seqlen_k=longest, causal=True)[None]  # [1, T, H, D]

    return attention


# ---------------------------------------------------------------- rotary


class Rotary(nn.Module):
    """Rotary embedding on the first ``rope_dims`` dims of each head."""

    def __init__(self, rope_dims: int, base: float, train_seq_len: int, ntk_scaling: bool = True):
        super().__init__()
        self.rope_dims = rope_dims
        self.base = base
        self.train_seq_len = train_seq_len
        self.ntk_scaling = ntk_scaling  # off for packed rows, whose attention spans no more than a segment

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        base = self.base
        if self.ntk_scaling and seq_len > self.train_seq_len:
            # NTK-style base scaling keeps the longest wavelength ahead of the context.
            scale = seq_len / self.train_seq_len
            base = base * scale ** (self.rope_dims / (self.rope_dims - 2))
        exponents = torch.arange(0, self.rope_dims, 2, dtype=torch.float32, device=device) / self.rope_dims
        inv_freq = 1.0 / base**exponents  # [rope_dims / 2]
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)[None, :, None, :]  # [1, T, 1, rope_dims / 2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate the first half of the rotary dims against the second half; x is [B, T, H, D]."""
        half = self.rope_dims // 2
        x1, x2 = x[..., :half], x[..., half : self.rope_dims]
        rest = x[..., self.rope_dims :]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


# ---------------------------------------------------------------- blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, use_xsa: bool):
        super().__init__()
        if cfg.model_dim % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(
                f"model: model_dim {cfg.model_dim}, num_heads {cfg.num_heads} and num_kv_heads "
                f"{cfg.num_kv_heads} must divide evenly"
            )
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        if not 0 < cfg.rope_dims <= self.head_dim or cfg.rope_dims % 2:
            raise ValueError(f"model: rope_dims {cfg.rope_dims} must be even and at most head_dim {self.head_dim}")
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim, bias=False)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim, bias=False)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base, cfg.rope_train_seq_len, cfg.rope_ntk_scaling)
        self.use_xsa = use_xsa
        # #1855's sparse gate: head h's output times σ(scale · W_h · x[:window]), zero-initialised (σ = 1/2)
        self.attn_gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.gate_window)) \
            if cfg.attn_gate == "sparse" else None
        self.gate_window, self.gate_scale = cfg.gate_window, cfg.attn_gate_scale

    def forward(self, x: Tensor, attention: AttentionFn, v_embed: Tensor | None = None,
                deltas: BlockDeltas | None = None) -> Tensor:
        b, t, dim = x.shape
        d = deltas or BlockDeltas()
        q = _plus(self.c_q(x), d.q, x).view(b, t, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = _plus(self.c_k(x), d.k, x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = _plus(self.c_v(x), d.v, x)  # [B, T, Hkv * D]
        if v_embed is not None:
            v = v + v_embed  # value embeddings join the values before the heads split (docs/VARIANTS.md §4.3)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        cos, sin = self.rotary.cos_sin(t, x.device, q.dtype)
        q = self.rotary(rms_norm(q), cos, sin)
        k = self.rotary(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = attention(q, k, v)  # [B, T, H, D]
        if self.use_xsa:
            y = self.exclude_self_value(y, v)
        if self.attn_gate_w is not None:
            gate_logits = F.linear(x[..., : self.gate_window], self.attn_gate_w.to(x.dtype))  # [B, T, H]
            y = y * torch.sigmoid(self.gate_scale * gate_logits)[..., None]
        return _plus(self.proj(y.reshape(b, t, dim)), d.o, x)

    def exclude_self_value(self, y: Tensor, v: Tensor) -> Tensor:
        """XSA: remove from each head's output its component along its own value vector."""
        b, t, h, d = y.shape
        y = y.view(b, t, self.num_kv_heads, h // self.num_kv_heads, d)  # [B, T, Hkv, G, D]
        unit_v = F.normalize(v, dim=-1).unsqueeze(-2)  # [B, T, Hkv, 1, D]
        y = y - (y * unit_v).sum(dim=-1, keepdim=True) * unit_v
        return y.view(b, t, h, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.leaky_slope = cfg.mlp_leaky_slope if cfg.mlp_activation == "leaky_relu2" else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # [B, T, hidden]
        h = torch.relu(h) if self.leaky_slope is None else F.leaky_relu(h, negative_slope=self.leaky_slope)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        use_xsa = layer_index >= cfg.num_layers - cfg.xsa_last_n
        self.attn = CausalSelfAttention(cfg, use_xsa)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        self.norm_scale = 1.0 / math.sqrt(layer_index + 1) if cfg.ln_scale else 1.0

    def forward(self, x: Tensor, x0: Tensor, attention: AttentionFn, v_embed: Tensor | None = None,
                deltas: BlockDeltas | None = None) -> Tensor:
        x_in = self.mix_input(x, x0)
        x = x_in + self.attention_branch(x_in, attention, v_embed, deltas)
        return x + self.mlp_branch(x, deltas)

    def parallel(self, lanes: tuple[Tensor, Tensor], x0: Tensor, resid: Tensor, post: Tensor,
                 attention: AttentionFn, v_embed: Tensor | None = None,
                 deltas: BlockDeltas | None = None) -> tuple[Tensor, Tensor]:
        """#1855's two lanes: attention reads lane 0 (mixed with x0), the MLP reads lane 1, side by side.

        ``resid`` [2] scales each lane; ``post`` [2, 2] sends the attention (row 0) and MLP (row 1)
        outputs into lane 0 (column 0) and lane 1 (column 1).
        """
        lane0, lane1 = lanes
        attn_out = self.attention_branch(self.mix_input(lane0, x0), attention, v_embed, deltas)
        mlp_out = self.mlp_branch(lane1, deltas)
        resid, post = resid.to(lane0.dtype), post.to(lane0.dtype)
        return (resid[0] * lane0 + post[0, 0] * attn_out + post[1, 0] * mlp_out,
                resid[1] * lane1 + post[0, 1] * attn_out + post[1, 1] * mlp_out)

    def mix_input(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)  # [2, C]
        return mix[0] * x + mix[1] * x0

    def attention_branch(self, x_in: Tensor, attention: AttentionFn, v_embed: Tensor | None,
                         deltas: BlockDeltas | None) -> Tensor:
        return self.attn_scale.to(x_in.dtype) * self.attn(rms_norm(x_in) * self.norm_scale, attention, v_embed, deltas)

    def mlp_branch(self, x: Tensor, deltas: BlockDeltas | None) -> Tensor:
        mlp_in = rms_norm(x) * self.norm_scale
        mlp_out = _plus(self.mlp(mlp_in), None if deltas is None else deltas.mlp, mlp_in)
        return self.mlp_scale.to(x.dtype) * mlp_out


# ---------------------------------------------------------------- the variants' embeddings (PR #576, #1218)


class BigramHash(nn.Module):
    """PR #576's hashed bigram embedding (docs/VARIANTS.md §4.2): scale * proj(table[hash(prev, cur)]).

    The table starts at zero, so at initialisation the model computes what it computes without it.
    """

    def __init__(self, buckets: int, dim: int, out_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        self.proj = CastedLinear(dim, out_dim, bias=False) if dim != out_dim else None
        self.scale = nn.Parameter(torch.tensor(0.05))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.embed.weight)
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)  # replaced by GPT's orthogonal init when both dims are >= 64
        nn.init.constant_(self.scale, 0.05)

    def bucket_ids(self, tokens: Tensor) -> Tensor:
        """[..., T] ids -> [..., T] buckets: the last bucket at position 0, else (36313 cur ^ 27191 prev) mod (n-1)."""
        t = tokens.to(torch.int32)
        mod = self.buckets - 1
        first = torch.full_like(t[..., :1], mod)
        rest = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % mod
        return torch.cat((first, rest), dim=-1).long()

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(self.bucket_ids(tokens))  # [B, T, dim]
        if self.proj is not None:
            h = self.proj(h)  # [B, T, out_dim]
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """PR #576's SmearGate (docs/VARIANTS.md §4.4): x_t <- (1 - s) x_t + s x_{t-1}, s = sigmoid(gate), x_{-1} = 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))  # [C]
        previous = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)  # [B, T, C]
        return (1 - g) * x + g * previous


class ValueEmbedding(nn.Module):
    """The shared value embedding of PR #576 and #1218 (docs/VARIANTS.md §4.3): scale * proj(table[ids]), kv wide."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = CastedLinear(dim, kv_dim, bias=False) if dim != kv_dim else None
        self.scale = nn.Parameter(torch.tensor(0.1))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.01)
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)  # replaced by GPT's orthogonal init when both dims are >= 64
        nn.init.constant_(self.scale, 0.1)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # [B, T, dim]
        if self.proj is not None:
            h = self.proj(h)  # [B, T, kv_dim]
        return h * self.scale.to(h.dtype)


# ---------------------------------------------------------------- the model


def layer_order(cfg: ModelConfig, looping: bool) -> tuple[list[int], list[int]]:
    """Encoder and decoder layer indices; with looping the loop range repeats."""
    if not looping or cfg.num_loops == 0:
        half = cfg.num_layers // 2
        return list(range(half)), list(range(half, cfg.num_layers))
    loop = list(range(cfg.loop_start, cfg.loop_end + 1))
    order = list(range(cfg.loop_start)) + loop * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, cfg.num_layers))
    half = len(order) // 2
    return order[:half], order[half:]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.logit_softcap <= 0:
            raise ValueError(f"model: logit_softcap must be positive, got {cfg.logit_softcap}")
        if cfg.num_loops and not 0 <= cfg.loop_start <= cfg.loop_end < cfg.num_layers:
            raise ValueError(
                f"model: loop range {cfg.loop_start}..{cfg.loop_end} is outside the {cfg.num_layers} layers"
            )
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        projected = cfg.embedding_dim != cfg.model_dim
        self.embed_proj = CastedLinear(cfg.embedding_dim, cfg.model_dim, bias=False) if projected else None
        self.head_proj = CastedLinear(cfg.model_dim, cfg.embedding_dim, bias=False) if projected else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.embedding_dim, cfg.vocab_size, bias=False)
        encoder, decoder = layer_order(cfg, looping=cfg.num_loops > 0)
        num_skips = min(len(encoder), len(decoder))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim)) if cfg.skip_gates_enabled else None
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.embedding_dim) \
            if cfg.bigram_vocab_size else None
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate is True else None
        if cfg.smear_gate == "modded":  # #1855: x_t + λ σ(w · x_t[:window]) x_{t-1} on the raw embedding
            self.smear_gate = CastedLinear(cfg.gate_window, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.parallel_start_layer:  # #1855's lane mixes, sized for every layer as the record's
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1))
        self.ve_shared = self.ve_layer_scales = None
        if cfg.ve_layers:
            kv_dim = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
            self.ve_shared = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, kv_dim)
            self.ve_layer_scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in cfg.ve_layers)
        self.looping_active = False
        self.attention: AttentionFn = causal_attention
        self.reset_parameters()

    @property
    def encoder_indices(self) -> list[int]:
        return layer_order(self.config, self.looping_active)[0]

    @property
    def decoder_indices(self) -> list[int]:
        return layer_order(self.config, self.looping_active)[1]

    def reset_parameters(self) -> None:
        """The reference's initialisation: see docs/DESIGN.md §3."""
        if self.config.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=self.config.tied_embed_init_std)
        for extra in (self.bigram, self.ve_shared):
            if extra is not None:
                extra.reset_parameters()
        zero_init = {block.attn.proj for block in self.blocks} | {block.mlp.proj for block in self.blocks}
        if self.lm_head is not None:
            zero_init.add(self.lm_head)
        if self.config.smear_gate == "modded":
            zero_init.add(self.smear_gate)
        proj_gain = 1.0 / math.sqrt(2 * self.config.num_layers) if self.config.scaled_proj_init else 1.0
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if module in zero_init:
                nn.init.zeros_(module.weight)
            elif min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight, gain=1.0)
                if name.endswith(".proj"):  # PR #576: bigram.proj and ve_shared.proj (the blocks' are zero)
                    with torch.no_grad():
                        module.weight.mul_(proj_gain)

    def forward_logits(self, input_ids: Tensor, keep_from: int = 0, adapter: Adapter | None = None,
                       cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
        """Logits [B, T - keep_from, V]: positions before ``keep_from`` are context only.

        ``adapter`` adds its deltas to every block application (slots numbered in running
        order, so a looped layer gets one slot per pass) and to the head before the softcap.
        ``cu_seqlens`` ([S] int32, padded with T) makes ``input_ids`` one packed row [1, T] whose
        attention stays inside each segment ``[cu[i], cu[i+1])``; ``max_seqlen`` is the longest
        segment (for FlashAttention-3; None: T).
        """
        attention = self.attention
        if cu_seqlens is not None:
            if input_ids.size(0) != 1:
                raise ValueError(f"cu_seqlens needs one packed row [1, T], got a batch of {input_ids.size(0)}")
            attention = document_attention(cu_seqlens, input_ids.size(1), max_seqlen)
        x = self.embed(input_ids)  # [B, T, C]
        x0 = x
        value_embeds = self.value_embeddings(input_ids)
        encoder, decoder = layer_order(self.config, self.looping_active)
        skips: list[Tensor] = []
        for slot, i in enumerate(encoder):
            deltas = None if adapter is None else adapter.block(slot)
            x = self.blocks[i](x, x0, attention, value_embeds.get(i), deltas)
            skips.append(x)
        lanes: tuple[Tensor, Tensor] | None = None  # from the first parallel layer on (#1855)
        for step, i in enumerate(decoder):
            skip = skips.pop() if step < len(self.skip_weights) and skips else None
            deltas = None if adapter is None else adapter.block(len(encoder) + step)
            if self.config.parallel_start_layer and i >= self.config.parallel_start_layer:
                lane0, lane1 = (x, x) if lanes is None else lanes
                if skip is not None:
                    lane0 = self.merge_skip(lane0, skip, step)  # skips join the attention lane only
                lanes = self.blocks[i].parallel((lane0, lane1), x0, self.parallel_resid_lambdas[i],
                                                self.parallel_post_lambdas[i], attention, value_embeds.get(i), deltas)
                continue
            if skip is not None:
                x = self.merge_skip(x, skip, step)
            x = self.blocks[i](x, x0, attention, value_embeds.get(i), deltas)
        if lanes is not None:
            x = self.leave_lanes(lanes)
        x = self.final_norm(x[:, keep_from:])  # [B, T - keep_from, C]
        if self.head_proj is not None:
            x = self.head_proj(x)  # [B, T, E]
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head.to(x.dtype))  # [B, T, V]
        if adapter is not None:
            logits = logits + adapter.head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

    def embed(self, input_ids: Tensor) -> Tensor:
        """The residual stream's start x0 [B, T, C]: embedding, the variants' extras, norm, projection."""
        x = self.tok_emb(input_ids)  # [B, T, E]
        if self.config.smear_gate == "modded":
            x = self.smear_previous(x, input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)  # before the norm, as PR #576
        x = rms_norm(x)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # [B, T, C]
        if self.smear is not None:
            x = self.smear(x)
        return x

    def smear_previous(self, x: Tensor, input_ids: Tensor) -> Tensor:
        """#1855's SmearGate: x_t + λ σ(w · x_t[:window]) x_{t−1}, except where token t is a BOS.

        The mask keeps a packed row's documents apart: a document's first token never sees the
        previous document's last (the leak #1797 → #1855 fixed).
        """
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, : self.config.gate_window]))
        not_bos = (input_ids[:, 1:] != BOS_ID).to(x.dtype).unsqueeze(-1)  # [B, T - 1, 1]
        return torch.cat((x[:, :1], x[:, 1:] + gate * x[:, :-1] * not_bos), dim=1)  # [B, T, E]

    def leave_lanes(self, lanes: tuple[Tensor, Tensor]) -> Tensor:
        """The residual stream after the last parallel layer: the lanes' mean, or one of them."""
        choice = self.config.parallel_final_lane
        return lanes[0] if choice == "attn" else lanes[1] if choice == "mlp" else 0.5 * (lanes[0] + lanes[1])

    def value_embeddings(self, input_ids: Tensor) -> dict[int, Tensor]:
        """Layer index -> that layer's value embedding [B, T, kv_dim]; the shared table is looked up once."""
        if self.ve_shared is None:
            return {}
        shared = self.ve_shared(input_ids)  # [B, T, kv_dim]
        return {layer: shared * scale.to(shared.dtype)
                for layer, scale in zip(self.config.ve_layers, self.ve_layer_scales, strict=True)}

    def set_fake_quant(self, fake_quant: FakeQuant | None) -> None:
        """Turn QAT on (a grid) or off (None) in every CastedLinear."""
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.fake_quant = fake_quant

    def merge_skip(self, x: Tensor, skip: Tensor, step: int) -> Tensor:
        scaled = self.skip_weights[step].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[step].to(x.dtype)))

    def forward(self, input_ids: Tensor, target_ids: Tensor, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """Mean cross-entropy of ``target_ids``; ``cu_seqlens``: a packed row (``forward_logits``)."""
        logits = self.forward_logits(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), target_ids.flatten())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
