"""Score-first test-time training (TTT) of the artifact on the validation stream (docs/VARIANTS.md §2, docs/TTT.md).

Every method follows one protocol, legal under the four conditions of the challenge's issue
#1017 by construction: the stream is cut into chunks; each chunk is first scored with the
current state (its NLL, tokens and bytes go into the sums, with no later change), and only
then, unless it is the last chunk, is the state trained on targets already scored. A target
is scored exactly once, by a full softmax over the vocabulary of logits built from its
prefix alone (optionally divided by a fixed temperature T), and the score is the sums' bpb.

Style A (``sgd_all``: the 04-06 record, PR #1413; ``adamw_tail``: PR #576) adapts one model
along the #1394 sliding windows: a window belongs to the chunk of its first scored target,
and chunk c trains on its own tokens, cut into ``seq_len`` sequences and capped at the last
target scored so far, for ``epochs`` epochs at a cosine learning rate over the chunks.
Style B (``lora_doc``: PR #1586; ``phased``: the 04-22 record and #1855) freezes the model and
gives each document low-rank adapters (pgolf/eval/lora.py), fresh per document unless
``lora_warm_start_a`` carries A from group to group within a phase (#1855); a document is scored
in chunks of ``lora_chunk_tokens`` predictions with context from that document only, one
optimiser step after each chunk. ``phased`` pauses at fixed document counts and runs SGD on all
base weights over documents already scored, chosen by ``phase_rule`` and batched by
``phase_rows``. Work is split over processes with collectives only, and neither style's score
depends on the number of processes (up to float summation order), except under warm start or
the record's draws, where a process's adapters carry its own history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.config import TTTConfig
from pgolf.data.accounting import ValidationStream
from pgolf.data.packing import build_cu_seqlens
from pgolf.data.shards import BOS_ID
from pgolf.distributed import DistContext
from pgolf.eval.bpb import (
    EvalScore,
    NonFiniteScore,
    Window,
    padded,
    rank_share,
    score_batch_tokens,
    score_from_sums,
    sliding_windows,
)
from pgolf.eval.lora import DocumentLoRA
from pgolf.model.gpt import GPT, AttentionFn
from pgolf.runtime import use_compile

SLIDING_METHODS = ("sgd_all", "adamw_tail")
TAIL_NAME_PARTS = ("norm", "scale", "lm_head")  # PR #576 also trains every parameter named so


@dataclass
class TTTResult:
    """The score, the work done, and the per-chunk sums behind the running-bpb plot."""

    score: EvalScore
    tokens: int
    bytes: int
    optimizer_steps: int  # optimiser.step() calls, over all processes (phases included)
    document_steps: int  # style B: steps summed over documents (k - 1 for a document of k chunks)
    seconds: float
    chunks: list[dict] = field(default_factory=list)  # per chunk (A) or document group (B), in scoring order
    phases: list[dict] = field(default_factory=list)  # phased: the global SGD phases
    token_nll: Tensor | None = None  # [N - 1] float64: each target's NLL, when recorded (NaN: unscored)
    token_counts: Tensor | None = None  # [N - 1] int32: how often each target was scored, when recorded


class _Sums:
    """Running NLL, token and byte sums, and optionally each target's NLL and score count."""

    def __init__(self, num_targets: int, device: torch.device, record: bool):
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
        self.nll = torch.zeros(num_targets, dtype=torch.float64, device=device) if record else None  # [N - 1]
        self.counts = torch.zeros(num_targets, dtype=torch.int32, device=device) if record else None  # [N - 1]

    def add(self, targets: Tensor, nll: Tensor, byte_counts: Tensor) -> Tensor:
        """Add scored predictions (``targets`` [S] indexes the stream); their own sums [3]."""
        part = torch.stack([nll.detach().to(torch.float64).sum(),
                            torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device),
                            byte_counts.to(torch.float64).sum()])
        self.totals += part
        if self.nll is not None:
            self.nll.index_add_(0, targets, nll.detach().to(torch.float64))
            self.counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.int32))
        return part

    def finish(self, ctx: DistContext | None) -> tuple[float, float, float, Tensor | None, Tensor | None]:
        if ctx is not None and ctx.distributed:
            for tensor in (self.totals, self.nll, self.counts):
                if tensor is not None:
                    dist.all_reduce(tensor)
        nll = None
        if self.nll is not None:
            nll = torch.where(self.counts > 0, self.nll, torch.nan).cpu()
        counts = None if self.counts is None else self.counts.cpu()
        nll_sum, tokens, byte_count = self.totals.tolist()
        return nll_sum, tokens, byte_count, nll, counts


def run_ttt(
    model: GPT, stream: ValidationStream, cfg: TTTConfig, device: torch.device,
    ctx: DistContext | None = None, record_tokens: bool = False,
) -> TTTResult:
    """Adapt ``model`` (in place) while scoring ``stream`` with ``cfg.method``; every process calls this.

    A scored target's bytes are ``stream.target_bytes`` at its position (lookup tables or byte sidecar).
    """
    start = time.perf_counter()
    stream = stream.to(device)
    tokens, target_bytes = stream.tokens, stream.target_bytes  # [N], [N - 1]
    sums = _Sums(tokens.numel() - 1, device, record_tokens)
    if cfg.method in SLIDING_METHODS:
        steps, chunks = _ttt_sliding(model, tokens, target_bytes, cfg, device, ctx, sums)
        document_steps, phases = 0, []
    else:
        steps, document_steps, chunks, phases = _ttt_documents(model, tokens, target_bytes, cfg, device, ctx, sums)
    nll_sum, token_count, byte_count, token_nll, token_counts = sums.finish(ctx)
    return TTTResult(score=score_from_sums(nll_sum, token_count, byte_count), tokens=int(token_count),
                     bytes=int(byte_count), optimizer_steps=steps, document_steps=document_steps,
                     seconds=time.perf_counter() - start, chunks=_running(chunks), phases=phases,
                     token_nll=token_nll, token_counts=token_counts)


def _running(chunks: list[dict]) -> list[dict]:
    """Add the running bpb (everything scored up to and including each row) to the rows."""
    nll = tokens = byte_count = 0.0
    for row in chunks:
        nll, tokens, byte_count = nll + row["nll_sum"], tokens + row["tokens"], byte_count + row["bytes"]
        row["bpb"] = score_from_sums(row["nll_sum"], row["tokens"], row["bytes"]).bpb if row["tokens"] else math.nan
        row["running_bpb"] = score_from_sums(nll, tokens, byte_count).bpb if tokens else math.nan
    return chunks


def cosine_lr(peak: float, chunk: int, num_chunks: int) -> float:
    """``peak · ½(1 + cos(π c / (C − 1)))``: the records' learning rate for chunk c of C."""
    return peak if num_chunks <= 1 else peak * 0.5 * (1.0 + math.cos(math.pi * chunk / (num_chunks - 1)))


# ---------------------------------------------------------------- style A: one model along the sliding windows


def trainable_parameters(model: GPT, method: str, last_n_blocks: int) -> list[nn.Parameter]:
    """``sgd_all``: every parameter. ``adamw_tail``: the last N blocks and every *norm*/*scale*/lm_head one."""
    names = dict(model.named_parameters())
    if method == "sgd_all":
        chosen = set(names)
    else:
        tail = {f"blocks.{i}." for i in range(len(model.blocks) - last_n_blocks, len(model.blocks))}
        chosen = {n for n in names if any(n.startswith(p) for p in tail) or any(s in n for s in TAIL_NAME_PARTS)}
    for name, parameter in names.items():
        parameter.requires_grad_(name in chosen)
    return [names[n] for n in names if n in chosen]


def _style_a_optimizer(params: list[nn.Parameter], cfg: TTTConfig) -> torch.optim.Optimizer:
    if cfg.method == "sgd_all":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0)


def chunk_of_windows(windows: list[Window], chunk_tokens: int, num_chunks: int) -> list[list[Window]]:
    """Windows grouped by the chunk of their first scored target, ``⌊(start + score_from) / chunk⌋``."""
    groups: list[list[Window]] = [[] for _ in range(num_chunks)]
    for window in windows:
        groups[min((window.start + window.score_from) // chunk_tokens, num_chunks - 1)].append(window)
    return groups


def _ttt_sliding(
    model: GPT, tokens: Tensor, target_bytes: Tensor, cfg: TTTConfig, device: torch.device, ctx: DistContext | None,
    sums: _Sums,
) -> tuple[int, list[dict]]:
    targets = tokens.numel() - 1
    windows = sliding_windows(tokens.numel(), cfg.seq_len, cfg.stride)
    num_chunks = math.ceil(targets / cfg.chunk_tokens)
    params = trainable_parameters(model, cfg.method, cfg.last_n_blocks)
    optimizer = _style_a_optimizer(params, cfg)  # created once: its state carries across chunks
    forward, compiled = _scoring_forward(model, cfg, device)
    steps, rows, scored_to = 0, [], 0
    for chunk, chunk_windows in enumerate(chunk_of_windows(windows, cfg.chunk_tokens, num_chunks)):
        part = _score_windows(forward, compiled, tokens, target_bytes, chunk_windows, cfg, device, ctx, sums)
        if not math.isfinite(part[0]):  # every process holds the all-reduced sums: all of them stop here
            raise sliding_divergence(cfg, chunk, num_chunks, part[0], steps)
        rows.append({"chunk": chunk, "nll_sum": part[0], "tokens": part[1], "bytes": part[2]})
        if chunk_windows:
            last = chunk_windows[-1]
            scored_to = min(last.start + cfg.seq_len, targets)  # every target below is scored now
        if chunk == num_chunks - 1 or cfg.epochs == 0:
            continue  # the last chunk is never trained on: nothing is left to score
        chunk_start = chunk * cfg.chunk_tokens
        train_end = min(chunk_start + cfg.chunk_tokens, scored_to)
        starts = list(range(chunk_start, train_end - cfg.seq_len + 1, cfg.seq_len))
        lr = cosine_lr(cfg.lr, chunk, num_chunks)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.epochs):
            for first in range(0, len(starts), cfg.batch_seqs):
                batch = starts[first:first + cfg.batch_seqs]
                _train_step(model, params, optimizer, tokens, batch, cfg.seq_len, cfg.grad_clip, device, ctx)
                steps += 1
        rows[-1]["lr"] = lr
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return steps, rows


def sliding_divergence(cfg: TTTConfig, chunk: int, num_chunks: int, loss: float, steps: int) -> NonFiniteScore:
    """The error of a chunk whose summed loss is not finite, naming the method, the chunk and the steps before it."""
    cause = "the artifact's own predictions are not finite" if steps == 0 else \
        f"test-time training diverged in the {steps} optimizer steps before it (ttt.lr={cfg.lr:g})"
    return NonFiniteScore(f"ttt {cfg.method}: chunk {chunk} of {num_chunks} scored a summed loss of {loss}: {cause}; "
                          "there is no score")


def _scoring_forward(model: GPT, cfg: TTTConfig, device: torch.device) -> tuple[Callable[[Tensor, int], Tensor], bool]:
    """The scoring pass's forward, and whether it is compiled (for fixed shapes: its batches are padded)."""
    compiled = use_compile(cfg.compile, device, "ttt.compile")
    return (torch.compile(model.forward_logits, dynamic=False) if compiled else model.forward_logits), compiled


def _score_windows(
    forward: Callable[[Tensor, int], Tensor], compiled: bool, tokens: Tensor, target_bytes: Tensor,
    windows: list[Window], cfg: TTTConfig, device: torch.device, ctx: DistContext | None, sums: _Sums,
) -> list[float]:
    """Score this process's share of one chunk's windows into ``sums``; the chunk's sums over all processes.

    ``compiled``: each batch is padded to ``score_batch_seqs`` windows, so the chunks' last batches, of
    every length, compile no graphs of their own."""
    mine = rank_share(windows, ctx) if ctx is not None and ctx.distributed else windows
    part = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for first in range(0, len(mine), cfg.score_batch_seqs):
            batch = mine[first:first + cfg.score_batch_seqs]
            if compiled:
                batch = padded(batch, cfg.score_batch_seqs, cfg.seq_len)
            scored = score_batch_tokens(forward, tokens, target_bytes, batch, cfg.seq_len, device, cfg.temperature)
            part += sums.add(scored.targets, scored.nll, scored.bytes)
    if ctx is not None and ctx.distributed:
        dist.all_reduce(part)
    return part.tolist()


def _train_step(
    model: GPT, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, tokens: Tensor, starts: list[int],
    seq_len: int, grad_clip: float, device: torch.device, ctx: DistContext | None,
    doc_ids: Tensor | None = None, segment_cap: int = 0,
) -> None:
    """One step on the sequences at ``starts`` (a global batch; each process takes its share).

    The loss is the mean CE over the whole batch at T = 1: each process sums its share's CE, the
    gradient sums are all-reduced and divided by the batch's target count, so 1 and N processes
    take the same step. With ``doc_ids`` ([N] per token) attention and targets stay inside a document;
    with ``segment_cap`` a process's (contiguous) share is one packed row instead (``_packed_row_loss``).
    """
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None and ctx.distributed else (1, 0)
    mine = starts[len(starts) * rank // world : len(starts) * (rank + 1) // world]
    optimizer.zero_grad(set_to_none=False)
    count = torch.zeros((), dtype=torch.float64, device=device)
    if mine:
        if segment_cap:
            loss, targets = _packed_row_loss(model, tokens, mine[0], mine[-1] + seq_len, segment_cap, device)
        else:
            loss, targets = _window_loss(model, tokens, mine, seq_len, device, doc_ids)
        loss.backward()
        count += targets
    for parameter in params:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if ctx is not None and ctx.distributed:
        dist.all_reduce(count)
        for parameter in params:
            dist.all_reduce(parameter.grad)
    for parameter in params:
        parameter.grad.div_(count.clamp(min=1).to(parameter.grad.dtype))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def _window_loss(
    model: GPT, tokens: Tensor, starts: list[int], seq_len: int, device: torch.device, doc_ids: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(summed CE, target count) of the ``seq_len`` windows at ``starts``, inside documents with ``doc_ids``."""
    index = torch.tensor(starts, device=device)[:, None] + torch.arange(seq_len, device=device)  # [b, T]
    inputs, labels = tokens[index], tokens[index + 1]  # [b, T]
    with (_document_attention(model, None if doc_ids is None else doc_ids[index]),
          torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")):
        logits = model.forward_logits(inputs)  # [b, T, V]
    if doc_ids is not None:
        labels = torch.where(doc_ids[index] == doc_ids[index + 1], labels, -100)  # no target across documents
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    return loss, (labels != -100).sum()


def _packed_row_loss(
    model: GPT, tokens: Tensor, start: int, end: int, segment_cap: int, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """(summed CE, target count) of ``tokens[start:end]`` as one packed row (#1855's global phase).

    Attention stays in segments that start at the row's start, at every BOS and every
    ``segment_cap`` tokens into a document; every target counts, the one after a document's
    closing BOS included, as the record trains.
    """
    inputs, labels = tokens[start:end], tokens[start + 1:end + 1]  # [T]
    doc_starts = (inputs == BOS_ID).nonzero().flatten().tolist()
    cu_seqlens, longest = build_cu_seqlens(doc_starts, inputs.numel(), segment_cap)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model.forward_logits(inputs[None], cu_seqlens=cu_seqlens.to(device), max_seqlen=longest)  # [1, T, V]
    loss = F.cross_entropy(logits[0].float(), labels, reduction="sum")
    return loss, torch.tensor(labels.numel(), device=device)


@contextmanager
def _document_attention(model: GPT, doc_ids: Tensor | None) -> Iterator[None]:
    """Within the block, ``model`` attends only inside each token's document (``doc_ids`` [b, T])."""
    if doc_ids is None:
        yield
        return
    original = model.attention
    model.attention = document_masked_attention(doc_ids)
    try:
        yield
    finally:
        model.attention = original


def document_masked_attention(doc_ids: Tensor) -> AttentionFn:
    """Causal attention restricted to positions of the same document; inputs [B, T, H, D]."""
    length = doc_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]  # [B, 1, T, T]

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        group = q.size(2) // k.size(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # [B, T, H, D]

    return attention


# ---------------------------------------------------------------- style B: per-document LoRA


@dataclass(frozen=True)
class Document:
    index: int  # in stream order
    start: int  # its first token in the stream
    length: int  # tokens, up to and including the next document's BOS (its last target)


def find_documents(tokens: Tensor) -> list[Document]:
    """Documents as PR #1586 cuts them: from a BOS to the next BOS inclusive; the last to the end.

    Tokens before the first BOS (a cut stream) form a document too, so every target is covered.
    """
    starts = (tokens[:-1] == BOS_ID).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*(s + 1 for s in starts[1:]), tokens.numel()]
    return [Document(i, s, e - s) for i, (s, e) in enumerate(zip(starts, ends))]


def document_groups(documents: list[Document], batch_docs: int) -> list[list[Document]]:
    """Sorted by length, cut into groups of ``batch_docs``, the groups processed longest first."""
    ordered = sorted(documents, key=lambda d: (d.length, d.index))
    groups = [ordered[i:i + batch_docs] for i in range(0, len(ordered), batch_docs)]
    return sorted(groups, key=lambda g: -g[-1].length)


def phase_pauses(groups: list[list[Document]], cfg: TTTConfig) -> list[tuple[int, int]]:
    """(documents, groups scored before it) of each global phase, by ``cfg.phase_rule``."""
    if cfg.phase_rule == "shortest":
        return shortest_rule_pauses(groups, cfg.phase_prefix_docs, cfg.phase_count)
    return phase_boundaries(groups, cfg.phase_prefix_docs, cfg.phase_count)


def phase_boundaries(groups: list[list[Document]], prefix_docs: int, count: int) -> list[tuple[int, int]]:
    """(documents, groups) at each pause: ``⌊prefix·(k+1)/count⌋`` documents, and the groups holding them."""
    pauses = []
    for k in range(count):
        docs = prefix_docs * (k + 1) // count
        seen, group_count = 0, 0
        while seen < docs and group_count < len(groups):
            seen += len(groups[group_count])
            group_count += 1
        if docs and seen >= docs and group_count < len(groups):
            pauses.append((docs, group_count))
    return pauses


def shortest_rule_pauses(groups: list[list[Document]], prefix_docs: int, count: int) -> list[tuple[int, int]]:
    """#1855's pauses, as one process meets them: after a group, if the documents scored reach the next
    boundary ``⌊min(prefix, docs)·(k+1)/count⌋``, one pause (a group never triggers two). The record
    also pauses after the last group, where nothing is left to score: that pause is left out."""
    prefix = min(prefix_docs, sum(len(group) for group in groups))
    boundaries = [prefix * (k + 1) // count for k in range(count)]
    pauses, phase, scored = [], 0, 0
    for end, group in enumerate(groups[:-1], start=1):
        scored += len(group)
        if phase < count and scored >= boundaries[phase]:
            if boundaries[phase]:
                pauses.append((boundaries[phase], end))
            phase += 1
    return pauses


def phase_documents(scored_groups: list[list[Document]], boundary: int, rule: str) -> list[Document]:
    """The ``boundary`` documents a phase trains on, in training order, all among ``scored_groups``.

    ``queue``: the first ones in queue order (longest groups first). ``shortest``: #1855's, the
    shortest ones, in order of (length-sorted group, position), i.e. by (length, index).
    """
    scored = [doc for group in scored_groups for doc in group]
    if rule == "shortest":
        scored.sort(key=lambda d: (d.length, d.index))
    return scored[:boundary]


class GroupAdapters:
    """The adapters and optimiser each document group is scored with (one per process).

    Without ``lora_warm_start_a`` every group starts from a fresh A. With it (#1855), the
    full-size groups of a phase share one adapter set: before each, B is zeroed and the
    optimiser starts afresh while A keeps what the earlier groups' steps made of it; a group of
    another size gets a fresh set, and ``new_phase`` drops the kept one. A fresh A is drawn per
    document (``lora_draws: document``) or, as #1855 draws it, from this process's generator
    each time a set is built (at the start and after every phase, as the record rebuilds it)
    or reset without warm start (``record``).
    """

    def __init__(self, model: GPT, cfg: TTTConfig):
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(cfg.seed) if cfg.lora_draws == "record" else None
        self.kept: DocumentLoRA | None = None
        self.new_phase()

    def new_phase(self) -> None:
        """Forget the kept set: the next full-size group starts from a fresh A."""
        self.kept = self._fresh(self.cfg.lora_batch_docs, []) if self.generator is not None else None

    def for_group(self, group: list[Document]) -> tuple[DocumentLoRA, torch.optim.Optimizer]:
        full = self.cfg.lora_batch_docs
        if len(group) != full:
            lora = self._fresh(len(group), group)
        elif self.kept is None:
            lora = self.kept = self._fresh(full, group)
        elif self.cfg.lora_warm_start_a:
            lora = self.kept
            lora.restart()
        else:
            lora = self.kept
            self._draw(lora, group)
        cfg = self.cfg
        optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.lora_lr, betas=(cfg.lora_beta1, cfg.lora_beta2),
                                      eps=cfg.lora_eps, weight_decay=cfg.lora_weight_decay)
        return lora, optimizer

    def _fresh(self, size: int, group: list[Document]) -> DocumentLoRA:
        """A new set of ``size`` documents, drawn for ``group`` (``record`` draws need no group)."""
        cfg = self.cfg
        lora = DocumentLoRA(self.model, size, cfg.lora_rank, k=cfg.lora_k, o=cfg.lora_o,
                            mlp=cfg.lora_mlp, alpha=cfg.lora_alpha)
        self._draw(lora, group)
        return lora

    def _draw(self, lora: DocumentLoRA, group: list[Document]) -> None:
        if self.generator is not None:
            lora.draw(self.generator)
        else:
            lora.reset([self.cfg.seed * 2**32 + doc.index for doc in group])


def _ttt_documents(
    model: GPT, tokens: Tensor, target_bytes: Tensor, cfg: TTTConfig, device: torch.device, ctx: DistContext | None,
    sums: _Sums,
) -> tuple[int, int, list[dict], list[dict]]:
    groups = document_groups(find_documents(tokens), cfg.lora_batch_docs)
    pauses = phase_pauses(groups, cfg) if cfg.method == "phased" else []
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None and ctx.distributed else (1, 0)
    group_sums = torch.zeros(len(groups), 3, dtype=torch.float64, device=device)  # nll, tokens, bytes per group
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # optimiser steps, document steps (this process)
    adapters = GroupAdapters(model, cfg)
    phases, done = [], 0
    for docs, end in [*pauses, (0, len(groups))]:
        for g in range(done + rank, end, world):  # groups of this segment, round-robin over the processes
            lora, optimizer = adapters.for_group(groups[g])
            part, group_steps = score_document_group(model, tokens, target_bytes, groups[g], lora, optimizer, cfg,
                                                     device, sums)
            group_sums[g] += part
            counts += torch.tensor(group_steps, device=device)
        done = end
        if docs:
            used = phase_documents(groups[:end], docs, cfg.phase_rule)  # every one scored
            phases.append(global_sgd_phase(model, tokens, used, cfg, device, ctx) | {"after_groups": end})
            adapters.new_phase()
    if ctx is not None and ctx.distributed:
        dist.all_reduce(group_sums)
        dist.all_reduce(counts)
    rows = [{"chunk": g, "nll_sum": s[0], "tokens": s[1], "bytes": s[2]} for g, s in enumerate(group_sums.tolist())]
    check_document_groups(cfg, rows, phases)
    optimizer_steps, document_steps = counts.tolist()
    return optimizer_steps + sum(p["steps"] for p in phases), document_steps, rows, phases


def check_document_groups(cfg: TTTConfig, rows: list[dict], phases: list[dict]) -> None:
    """Refuse a non-finite summed loss, naming the method and the first document group (all processes' sums).

    Checked once all groups are scored: each process scores its own groups, and one that stopped
    alone would leave the others waiting in the next collective.
    """
    bad = next((row for row in rows if not math.isfinite(row["nll_sum"])), None)
    if bad is None:
        return
    group = bad["chunk"]
    before = sum(phase["after_groups"] <= group for phase in phases)
    phased = f" or the {before} global SGD phase(s) before it (ttt.phase_lr={cfg.phase_lr:g})" if before else ""
    raise NonFiniteScore(f"ttt {cfg.method}: document group {group} of {len(rows)} scored a summed loss of "
                         f"{bad['nll_sum']}: test-time training diverged in its adapters' steps "
                         f"(ttt.lora_lr={cfg.lora_lr:g}){phased}; there is no score")


def _chunk_window(chunk: int, num_chunks: int, predictions: int, chunk_size: int, seq_len: int) -> tuple[int, int, int]:
    """(window start, window length, scored offset in the window) of a document's chunk (PR #1586)."""
    chunk_end = predictions if chunk == num_chunks - 1 else (chunk + 1) * chunk_size
    window_start = max(0, chunk_end - seq_len)
    return window_start, chunk_end - window_start, chunk * chunk_size - window_start


def score_document_group(
    model: GPT, tokens: Tensor, target_bytes: Tensor, group: list[Document], lora: DocumentLoRA,
    optimizer: torch.optim.Optimizer, cfg: TTTConfig, device: torch.device, sums: _Sums,
) -> tuple[Tensor, tuple[int, int]]:
    """Score one group of documents chunk by chunk, one ``lora`` step after each; (sums [3], (steps, document steps))."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    size = cfg.lora_chunk_tokens
    predictions = torch.tensor([doc.length - 1 for doc in group], device=device)  # [B]
    num_chunks = (predictions + size - 1) // size  # [B]
    doc_starts = torch.tensor([doc.start for doc in group], device=device)  # [B]
    part = torch.zeros(3, dtype=torch.float64, device=device)
    steps = document_steps = 0
    for chunk in range(int(num_chunks.max())):
        width = min((chunk + 1) * size, cfg.seq_len)  # depends on the chunk alone, never on the batch
        window = [_chunk_window(chunk, int(n), int(p), size, cfg.seq_len) for n, p in zip(num_chunks, predictions)]
        win_start, win_len, offset = (torch.tensor(col, device=device) for col in zip(*window))  # [B] each
        columns = torch.arange(width, device=device)  # [W]
        active = chunk < num_chunks  # [B]
        valid = active[:, None] & (columns < win_len[:, None])  # [B, W]
        index = (doc_starts + win_start)[:, None] + columns  # [B, W]
        inputs = torch.where(valid, tokens[index.clamp(max=tokens.numel() - 2)], 0)  # [B, W]
        labels = torch.where(valid, tokens[(index + 1).clamp(max=tokens.numel() - 1)], 0)  # [B, W]
        scored = valid & (columns >= offset[:, None])  # [B, W]: this chunk's predictions
        train_rows = chunk < num_chunks - 1  # [B]: documents with a later chunk to score
        for step in range(max(cfg.lora_steps, 1)):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model.forward_logits(inputs, adapter=lora).float()  # [B, W, V]
            if step == 0:  # score first, from this very forward, before any update that saw the chunk
                scoring = logits.detach() if cfg.temperature == 1.0 else logits.detach() / cfg.temperature
                nll = F.cross_entropy(scoring.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
                flat = scored.flatten()
                positions = index.flatten()[flat]  # [S]: stream positions of the scored predictions
                part += sums.add(positions, nll.flatten()[flat], target_bytes[positions])
            if not bool(train_rows.any()) or step >= cfg.lora_steps:
                break
            train_nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
            mask = (scored & train_rows[:, None]).float()  # [B, W]
            loss = ((train_nll * mask).sum(dim=1) / size).sum()  # Σ_docs mean over the chunk's predictions
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            document_steps += int(train_rows.sum())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return part, (steps, document_steps)


def global_sgd_phase(
    model: GPT, tokens: Tensor, documents: list[Document], cfg: TTTConfig, device: torch.device,
    ctx: DistContext | None,
) -> dict:
    """SGD on all base weights over ``documents`` (all scored), concatenated; the last chunk skipped.

    Cosine learning rate over ``phase_chunk_tokens`` chunks, each cut into sequences of
    ``phase_seq_len``; with ``phase_rows: windows`` attention and targets stay inside each
    document, with ``packed`` a process's sequences form one row cut into segments at every BOS
    (#1855). A fresh optimiser per phase (04-22).
    """
    stream = torch.cat([tokens[d.start:d.start + d.length] for d in documents])  # [M]
    packed = cfg.phase_rows == "packed"
    seq_len = cfg.phase_seq_len or cfg.seq_len
    doc_ids = None if packed else \
        torch.cat([torch.full((d.length,), i, device=device) for i, d in enumerate(documents)])  # [M]
    targets = stream.numel() - 1
    num_chunks = math.ceil(targets / cfg.phase_chunk_tokens)
    params = list(model.parameters())
    for parameter in params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.phase_lr, momentum=cfg.phase_momentum, weight_decay=0.0)
    steps = 0
    for chunk in range(num_chunks - 1):  # the last chunk of the concatenation is skipped (04-22)
        start = chunk * cfg.phase_chunk_tokens
        end = min(start + cfg.phase_chunk_tokens, targets)
        starts = list(range(start, end - seq_len + 1, seq_len))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.phase_lr, chunk, num_chunks)
        for _ in range(cfg.phase_epochs):
            for first in range(0, len(starts), cfg.batch_seqs):
                _train_step(model, params, optimizer, stream, starts[first:first + cfg.batch_seqs], seq_len,
                            cfg.phase_grad_clip, device, ctx, doc_ids=doc_ids, segment_cap=seq_len if packed else 0)
                steps += 1
    return {"documents": len(documents), "doc_indices": [d.index for d in documents], "tokens": int(stream.numel()),
            "chunks": num_chunks, "steps": steps}


# ---------------------------------------------------------------- legality


def compliance(result: TTTResult) -> dict:
    """The four conditions of issue #1017, how this implementation meets each, and the test proving it."""
    test = "tests/eval/test_ttt.py::"
    return {
        "causal_prefix": {"holds": True, "how": "each prediction's logits come from its prefix in the stream "
                          "(style A) or in its document (style B) and the state left by earlier chunks (and, "
                          "under warm-start A, by documents scored before)",
                          "test": test + "test_prefix_invariance"},
        "full_normalized_distribution": {"holds": True, "how": "cross-entropy of a softmax over the whole "
                                         "vocabulary of softcap(z)/T, T fixed before scoring",
                                         "test": test + "test_temperature_divides_softcapped_logits"},
        "score_before_update": {"holds": True, "how": "a chunk's sums are taken before any step on it; the "
                                "last chunk is never trained on; phases train on scored documents only",
                                "test": test + "test_step_counts_and_last_chunk"},
        "single_pass": {"holds": True, "how": "every target is scored exactly once; no second pass is offered",
                        "test": test + "test_coverage_every_target_once"},
        "seconds": result.seconds,
    }


def ttt_metrics(result: TTTResult, cfg: TTTConfig, evaluated: dict, world_size: int) -> dict:
    """The stage's metrics: the score, the work, the gain over evaluate's sliding score, compliance.

    The gain is reported only when evaluate scored the same number of targets (same split and cut).
    """
    metrics = {"enabled": True, "method": cfg.method, "val_loss": result.score.loss, "val_bpb": result.score.bpb,
               "tokens": result.tokens, "bytes": result.bytes, "optimizer_steps": result.optimizer_steps,
               "document_steps": result.document_steps, "temperature": cfg.temperature, "world_size": world_size,
               "seconds": result.seconds}
    sliding = evaluated.get("quantized", {}).get("sliding_val_bpb")
    if sliding is not None and evaluated.get("val_tokens") == result.tokens:
        metrics["sliding_val_bpb"] = sliding
        metrics["gain_vs_sliding_bpb"] = result.score.bpb - sliding
    if result.phases:
        metrics["phases"] = [{k: v for k, v in p.items() if k != "doc_indices"} for p in result.phases]
    metrics["compliance"] = compliance(result)
    return metrics
