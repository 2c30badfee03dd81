"""The recurrent GPT of the record (docs/DESIGN.md §3), top to bottom.

A tied-embedding transformer with grouped-query attention, partial rotary
embeddings, per-head query gain, XSA (each head's output minus its projection
on its value vector), a squared leaky-ReLU MLP, U-Net skips with sigmoid gates
and depth recurrence: a range of layers is run several times once
``looping_active`` is set. Parameter names are the reference's, so a state
dict written by the record's ``train_gpt.py`` loads as is. The seeds' options
(PR #576 and #1218, ``ModelConfig``; off by default) add BigramHash, SmearGate,
value embeddings, relu² and #576's scaled projection init, under the PRs' own
parameter names, and ``set_fake_quant`` turns #576's QAT on in every linear. Attention runs
through FlashAttention-3 or flash-attn when importable on a GPU, else PyTorch's
scaled-dot-product attention; all paths compute the same function (a test checks them against attention written out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config import ModelConfig

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
    """PR #576's QAT grid (SEEDS_SPEC §5.1): per row, scale = max(quantile(|w|, q) / r, 1 / r), codes -r-1..r."""

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


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention via PyTorch; inputs and output are [B, T, H, D]."""
    group = q.size(2) // k.size(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # [B, H, T, D]
        v = v.repeat_interleave(group, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
    return y.transpose(1, 2)  # [B, T, H, D]


def _import_flash_attention() -> AttentionFn | None:
    """FlashAttention-3, else flash-attn 2, else None."""
    try:
        from flash_attn_interface import flash_attn_func as fa3
    except ImportError:
        fa3 = None
    if fa3 is not None:
        return lambda q, k, v: fa3(q, k, v, causal=True)
    try:
        from flash_attn import flash_attn_func as fa2
    except ImportError:
        return None
    return lambda q, k, v: fa2(q, k, v, causal=True)


# Looked up at import, not on first use: torch.compile cannot trace an import that fails
# (fullgraph would stop at it), while a module global is a constant to it.
FLASH_ATTENTION: AttentionFn | None = _import_flash_attention()


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Dispatch: flash kernels need a GPU and 16-bit inputs; otherwise SDPA."""
    if FLASH_ATTENTION is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return FLASH_ATTENTION(q, k, v)
    return sdpa_attention(q, k, v)


# ---------------------------------------------------------------- rotary


class Rotary(nn.Module):
    """Rotary embedding on the first ``rope_dims`` dims of each head."""

    def __init__(self, rope_dims: int, base: float, train_seq_len: int):
        super().__init__()
        self.rope_dims = rope_dims
        self.base = base
        self.train_seq_len = train_seq_len

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        base = self.base
        if seq_len > self.train_seq_len:
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
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base, cfg.rope_train_seq_len)
        self.use_xsa = use_xsa

    def forward(self, x: Tensor, attention: AttentionFn, v_embed: Tensor | None = None,
                deltas: BlockDeltas | None = None) -> Tensor:
        b, t, dim = x.shape
        d = deltas or BlockDeltas()
        q = _plus(self.c_q(x), d.q, x).view(b, t, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = _plus(self.c_k(x), d.k, x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = _plus(self.c_v(x), d.v, x)  # [B, T, Hkv * D]
        if v_embed is not None:
            v = v + v_embed  # value embeddings join the values before the heads split (SEEDS_SPEC §4.3)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        cos, sin = self.rotary.cos_sin(t, x.device, q.dtype)
        q = self.rotary(rms_norm(q), cos, sin)
        k = self.rotary(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = attention(q, k, v)  # [B, T, H, D]
        if self.use_xsa:
            y = self.exclude_self_value(y, v)
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
        mix = self.resid_mix.to(x.dtype)  # [2, C]
        x_in = mix[0] * x + mix[1] * x0
        x = x_in + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x_in) * self.norm_scale, attention, v_embed, deltas)
        mlp_in = rms_norm(x) * self.norm_scale
        mlp_out = _plus(self.mlp(mlp_in), None if deltas is None else deltas.mlp, mlp_in)
        return x + self.mlp_scale.to(x.dtype) * mlp_out


# ---------------------------------------------------------------- the seeds' embeddings (PR #576, #1218)


class BigramHash(nn.Module):
    """PR #576's hashed bigram embedding (SEEDS_SPEC §4.2): scale * proj(table[hash(prev, cur)]).

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
    """PR #576's SmearGate (SEEDS_SPEC §4.4): x_t <- (1 - s) x_t + s x_{t-1}, s = sigmoid(gate), x_{-1} = 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))  # [C]
        previous = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)  # [B, T, C]
        return (1 - g) * x + g * previous


class ValueEmbedding(nn.Module):
    """The shared value embedding of PR #576 and #1218 (SEEDS_SPEC §4.3): scale * proj(table[ids]), kv wide."""

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
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate else None
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

    def forward_logits(self, input_ids: Tensor, keep_from: int = 0, adapter: Adapter | None = None) -> Tensor:
        """Logits [B, T - keep_from, V]: positions before ``keep_from`` are context only.

        ``adapter`` adds its deltas to every block application (slots numbered in running
        order, so a looped layer gets one slot per pass) and to the head before the softcap.
        """
        x = self.tok_emb(input_ids)  # [B, T, E]
        if self.bigram is not None:
            x = x + self.bigram(input_ids)  # before the norm, as PR #576
        x = rms_norm(x)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # [B, T, C]
        if self.smear is not None:
            x = self.smear(x)
        x0 = x
        value_embeds = self.value_embeddings(input_ids)
        encoder, decoder = layer_order(self.config, self.looping_active)
        skips: list[Tensor] = []
        for slot, i in enumerate(encoder):
            deltas = None if adapter is None else adapter.block(slot)
            x = self.blocks[i](x, x0, self.attention, value_embeds.get(i), deltas)
            skips.append(x)
        for step, i in enumerate(decoder):
            if step < len(self.skip_weights) and skips:
                x = self.merge_skip(x, skips.pop(), step)
            deltas = None if adapter is None else adapter.block(len(encoder) + step)
            x = self.blocks[i](x, x0, self.attention, value_embeds.get(i), deltas)
        x = self.final_norm(x[:, keep_from:])  # [B, T - keep_from, C]
        if self.head_proj is not None:
            x = self.head_proj(x)  # [B, T, E]
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head.to(x.dtype))  # [B, T, V]
        if adapter is not None:
            logits = logits + adapter.head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)

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

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        logits = self.forward_logits(input_ids)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), target_ids.flatten())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
