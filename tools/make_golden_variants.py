"""Make the golden sets of PR #576 and PR #1218 in ``tests/assets/`` by running each PR's own code on the CPU.

Each PR's ``train_gpt.py`` (not part of this repository: copy it out of the
challenge repository first) is executed as a module with a tiny configuration
in its own environment-variable names, as ``tools/make_golden.py`` does for the
record. Every golden value is computed by the PR's own functions and classes:
its model's logits and loss (seeded weights with noise on every parameter, so
the zero-initialised BigramHash table and the value embeddings matter), its
BigramHash on the spec's test vectors (docs/VARIANTS.md §4.2), one step of its
optimisers (its own parameter grouping: #576's is a passage of ``main`` that is
cut out of the source and run as is), its fake quantization (#576's QAT), its
pruning (a passage of #576's ``main``), its GPTQ and its int8 table rounding on
a tiny matrix. Token ids are real FineWeb text in the challenge's 1024-piece
tokenizer (``../shared/fineweb/docs_sample.jsonl``).

The export check quantizes the whole tiny model as each PR's export does (its
Hessian collection on the loader shards, #576's pruning, its mixed quantizer), from
a second import of the PR in which the size threshold 65536 (below which a tensor
is stored as fp16 and not pruned) is 200, so that the tiny model's matrices and
tables are quantized.

What differs from a GPU run, and why: attention runs through PyTorch's
scaled-dot-product attention (a shim stands in for ``flash_attn_interface``),
nothing is compiled (``torch.compile`` returns its argument) and the model stays
in float32 (no CUDA autocast on the CPU).

Usage::

    git --git-dir=<mirror> show refs/pull/576/head:records/track_10min_16mb/2026-03-23_TrainLarger_QuantizeHarder_33M_Int5/train_gpt.py > /tmp/ref/pr576.py
    git --git-dir=<mirror> show <main>:records/track_10min_16mb/2026-04-01_Vocab4096_MLPMult4_WD085/train_gpt.py > /tmp/ref/pr1218.py
    python tools/make_golden_variants.py --pr576 /tmp/ref/pr576.py --pr576-commit <sha> \\
        --pr1218 /tmp/ref/pr1218.py --pr1218-commit <sha>
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import cpu_runtime, environment, flash_attn_shim, write_shard  # noqa: E402  (the record's CPU shims)

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "tests" / "assets"
DOCS_PATH = REPO_ROOT.parent / "shared" / "fineweb" / "docs_sample.jsonl"
TOKENIZER_PATH = ASSETS_DIR / "fineweb_1024_bpe.model"
WEIGHT_SEED = 1234
WEIGHT_NOISE = 0.05
EMBED_NOISE = 0.5  # logits of several units, where the softcap bends
LOGIT_POSITIONS = 4  # logits kept for the first and the last positions of each row (size); the loss covers all
HASH_VECTORS = [(1, 2), (0, 0), (5, 7), (7, 5), (1023, 1023)]  # (prev, cur): docs/VARIANTS.md §4.2
QUANT_ROWS, QUANT_COLS, QUANT_BLOCK = 24, 96, 32  # three GPTQ blocks
TABLE_SHAPE = (40, 24)
PRUNE_SHAPE = (48, 40)  # pruned by the passage with the export check's threshold (200)
SIZE_THRESHOLD = 65536  # the PRs' passthrough and pruning threshold
EXPORT_THRESHOLD = 200  # ... in the export check: every matrix of the tiny model above it but the projections
CALIB_SEQ, CALIB_SAMPLES = 64, 4
# The loaders: 10 shards of 300..700 tokens, rows of 16, 2 rows per micro-batch, 8 micro-batches per step.
LOADER_SHARDS, LOADER_SEQ, LOADER_ROWS, LOADER_MICRO, LOADER_STEPS = 10, 16, 2, 8, 3

# #576: MHA, relu², MLP 3.5x, BigramHash, SmearGate, VE on the last two layers, rotary reference 1024
# (hard-coded in the PR): rows of 1040 tokens exercise its NTK scaling.
PR576_ENV = {
    "VOCAB_SIZE": 1024, "NUM_LAYERS": 4, "MODEL_DIM": 16, "NUM_HEADS": 2, "NUM_KV_HEADS": 2, "MLP_MULT": 3.5,
    "ROPE_DIMS": 4, "XSA_LAST_N": 4, "QK_GAIN_INIT": 1.5, "BIGRAM_VOCAB_SIZE": 128, "BIGRAM_DIM": 8,
    "VE_ENABLED": 1, "VE_DIM": 8, "VE_LAYERS": "2,3", "TRAIN_SEQ_LEN": 1040, "LOGIT_SOFTCAP": 30.0,
}
PR576_SEQ = 1040
# #1218: GQA, leaky relu², MLP 4x, skip gates, VE (kv width 8, VE dim 4 so it has a projection); rows of 96
# tokens against a rotary reference of 64 exercise the NTK scaling. Vocab 1024 instead of 4096 keeps the file
# small (the vocabulary is a size, not a mechanism).
PR1218_ENV = {
    "VOCAB_SIZE": 1024, "NUM_LAYERS": 4, "MODEL_DIM": 16, "EMBEDDING_DIM": 16, "NUM_HEADS": 2, "NUM_KV_HEADS": 1,
    "MLP_MULT": 4.0, "ROPE_DIMS": 4, "XSA_LAST_N": 4, "QK_GAIN_INIT": 4.0, "VE_ENABLED": 1, "VE_DIM": 4,
    "VE_LAYERS": "2,3", "TRAIN_SEQ_LEN": 64, "LOGIT_SOFTCAP": 30.0,
}
PR1218_SEQ = 96

# #576 builds its optimisers and prunes inside main(): these passages are cut out and run as they are.
PR576_OPTIMISER_PASSAGE = ("    block_named_params = list(base_model.blocks.named_parameters())",
                           "    n_params = sum(p.numel() for p in base_model.parameters())")
PR576_PRUNE_PASSAGE = ("    if args.prune_pct > 0:", "        if master_process:")


def pr_source(script: Path, threshold: int | None = None) -> str:
    """The PR's source; with ``threshold``, its three uses of the 65,536-element size threshold changed."""
    source = script.read_text(encoding="utf-8")
    if threshold is None:
        return source
    if source.count(str(SIZE_THRESHOLD)) != 3:
        raise SystemExit(f"{script}: expected the size threshold {SIZE_THRESHOLD} three times")
    return source.replace(str(SIZE_THRESHOLD), str(threshold))


def import_pr(script: Path, env: dict, threshold: int | None = None) -> types.ModuleType:
    sys.modules.setdefault("flash_attn_interface", flash_attn_shim())
    module = types.ModuleType(f"pr_{script.stem}")
    module.__file__ = str(script)
    with environment(env), cpu_runtime():
        exec(compile(pr_source(script, threshold), str(script), "exec"), module.__dict__)  # noqa: S102
    return module


def main_passage(script: Path, bounds: tuple[str, str], threshold: int | None = None) -> str:
    """The lines of the PR's source from ``bounds[0]`` up to (not including) ``bounds[1]``, dedented."""
    source = pr_source(script, threshold)
    start = source.index(bounds[0])
    return textwrap.dedent(source[start:source.index(bounds[1], start)])


def token_rows(rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_PATH))
    with open(DOCS_PATH, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:40]
    ids = torch.tensor([i for text in texts for i in [sp.bos_id(), *sp.encode(text)]], dtype=torch.long)
    ids = ids[: rows * seq_len + 1]
    return ids[:-1].reshape(rows, seq_len).clone(), ids[1:].reshape(rows, seq_len).clone()


def seeded_state(model: torch.nn.Module) -> dict:
    torch.manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_((EMBED_NOISE if name == "tok_emb.weight" else WEIGHT_NOISE) * torch.randn_like(parameter))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def logits_and_loss(model, x, y) -> dict:
    with torch.no_grad():
        logits = model.forward_logits(x)  # [B, T, V]
        loss = model(x, y)
    return {"logits_head": logits[:, :LOGIT_POSITIONS].clone(), "logits_tail": logits[:, -LOGIT_POSITIONS:].clone(),
            "loss": loss.detach().clone()}


def optimiser_step(model, optimizers, muon, x, y, args) -> dict:
    """One step as the PRs' training loops take it: momentum, lr = base_lr, grad clip, every optimiser."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    model.train()
    model(x, y).backward()
    for group in muon.param_groups:
        group["momentum"] = args.muon_momentum_warmup_start
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"]
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    return {"after": {name: t.detach().clone() for name, t in model.state_dict().items()},
            "momentum": args.muon_momentum_warmup_start}


def tiny_quant_inputs() -> dict:
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(QUANT_ROWS, QUANT_COLS, generator=generator) * 0.05
    weight[3, 5] = 0.9  # an outlier: the percentile clips differ from the row maximum
    inputs = torch.randn(512, QUANT_COLS, generator=generator) * torch.linspace(0.2, 2.0, QUANT_COLS)
    table = torch.randn(*TABLE_SHAPE, generator=generator) * 0.02
    table[0, 0] = 0.5
    return {"weight": weight, "hessian": inputs.T @ inputs / inputs.size(0), "table": table,
            "prune_input": torch.randn(*PRUNE_SHAPE, generator=generator)}


@contextlib.contextmanager
def loader_shards():
    """A directory of small challenge-format train shards of real text; the working directory while open."""
    x, _ = token_rows(1, 6000)
    lengths = np.random.default_rng(5).integers(300, 700, size=LOADER_SHARDS)
    ids = x[0].numpy()
    saved = os.getcwd()
    with tempfile.TemporaryDirectory() as root:
        offset = 0
        for index, length in enumerate(lengths):
            write_shard(Path(root) / f"fineweb_train_{index:06d}.bin", ids[offset:offset + length])
            offset += int(length)
        os.chdir(root)  # #1218 seeds its generator from the paths its glob returns: here the bare names
        try:
            yield Path(root), [int(n) for n in lengths]
        finally:
            os.chdir(saved)


def loader_golden(ref, world_size: int) -> dict:
    """The PR's DistributedTokenLoader on the shards: every (step, rank) batch's inputs."""
    global_tokens = LOADER_MICRO * LOADER_ROWS * LOADER_SEQ
    accum = LOADER_MICRO // world_size
    with loader_shards() as (root, lengths):
        loaders = [ref.DistributedTokenLoader("fineweb_train_*.bin", rank, world_size, torch.device("cpu"))
                 for rank in range(world_size)]
        inputs = torch.stack([torch.stack([torch.cat([loader.next_batch(global_tokens, LOADER_SEQ, accum)[0]
                                                      for _ in range(accum)]) for loader in loaders])
                              for _ in range(LOADER_STEPS)])  # [steps, ranks, accum * rows, T]
        shards = {p.name: torch.from_numpy(np.fromfile(p, dtype="<u2", offset=1024).astype(np.int64))
                  for p in sorted(root.glob("*.bin"))}
    return {"world_size": world_size, "grad_accum_steps": accum, "seq_len": LOADER_SEQ,
            "batch_tokens": global_tokens, "inputs": inputs, "shards": shards, "lengths": lengths}


def export_golden_pr576(script: Path, env: dict, model_state: dict) -> dict:
    """#576's export of the tiny model: Hessians on its sequential stream, 2 % pruning, mixed int5/int8."""
    ref = import_pr(script, env, EXPORT_THRESHOLD)
    args = ref.Hyperparameters()
    model = pr576_model(ref, args)
    model.load_state_dict(model_state, strict=True)
    with loader_shards():
        hessians = ref.gptq_calibrate(model, "fineweb_train_*.bin", torch.device("cpu"), CALIB_SAMPLES, CALIB_SEQ)
    sd_cpu = {k: v.detach().clone() for k, v in model.state_dict().items()}
    exec(main_passage(script, PR576_PRUNE_PASSAGE, EXPORT_THRESHOLD), {"args": args, "sd_cpu": sd_cpu, "torch": torch})  # noqa: S102
    result, meta = ref.mixed_quantize_int6_gptq(sd_cpu, {"mlp", "attn"}, hessians)
    return {"threshold": EXPORT_THRESHOLD, "hessians": {f"{k}.weight": v for k, v in hessians.items()},
            "result": result, "methods": {k: v if isinstance(v, str) else v["type"] for k, v in meta.items()}}


def export_golden_pr1218(script: Path, env: dict, model_state: dict) -> dict:
    """#1218's export of the tiny model: Hessians on its coprime loader, GPTQ over five clips, int8 tables."""
    ref = import_pr(script, env, EXPORT_THRESHOLD)
    h = ref.Hyperparameters()
    h.train_batch_tokens = h.grad_accum_steps * 2 * h.train_seq_len  # two rows a calibration batch
    model = ref.GPT(h)
    model.load_state_dict(model_state, strict=True)
    with loader_shards():
        loader = ref.DistributedTokenLoader("fineweb_train_*.bin", 0, 1, torch.device("cpu"))
        hessians = ref.collect_hessians(model, loader, h, torch.device("cpu"), n_calibration_batches=CALIB_SAMPLES)
    sd_cpu = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h.logfile = None  # its log() prints, and writes no file
    ref.set_logging_hparams(h)
    result, meta = ref.gptq_mixed_quantize_int6(sd_cpu, {"mlp", "attn"}, hessians)
    return {"threshold": EXPORT_THRESHOLD, "hessians": hessians, "result": result,
            "methods": {k: v if isinstance(v, str) else v["type"] for k, v in meta.items()}}


def pr576_model(ref, args):
    return ref.GPT(
        vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=args.model_dim,
        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, mlp_mult=args.mlp_mult,
        tie_embeddings=args.tie_embeddings, tied_embed_init_std=args.tied_embed_init_std,
        logit_softcap=args.logit_softcap, rope_base=args.rope_base, qk_gain_init=args.qk_gain_init,
        bigram_vocab_size=args.bigram_vocab_size, bigram_dim=args.bigram_dim, xsa_last_n=args.xsa_last_n,
        rope_dims=args.rope_dims, ln_scale=args.ln_scale, dtg=args.dtg_enabled,
        ve_enabled=args.ve_enabled, ve_dim=args.ve_dim, ve_layers=args.ve_layers)


def fake_quant_golden(ref, weight: torch.Tensor) -> dict:
    """#576's CastedLinear in training mode with QAT on, and off."""
    layer = ref.CastedLinear(weight.size(1), weight.size(0), bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    x = torch.randn(5, weight.size(1), generator=torch.Generator().manual_seed(3))
    layer.train()
    ref.CastedLinear._qat_enabled = True
    on = layer(x).detach().clone()
    ref.CastedLinear._qat_enabled = False
    return {"x": x, "qat_on": on, "qat_off": layer(x).detach().clone()}


def golden_pr576(script: Path) -> dict:
    ref = import_pr(script, PR576_ENV)
    args = ref.Hyperparameters()
    with cpu_runtime():
        torch.manual_seed(0)
        model = pr576_model(ref, args)
        state = seeded_state(model)
        x, y = token_rows(2, PR576_SEQ)
        model.eval()
        out = {"env": dict(PR576_ENV), "state_dict": state, "x": x, "y": y, **logits_and_loss(model, x, y)}
        hasher = ref.BigramHashEmbedding(8192, 4, 8)
        pairs = torch.tensor(HASH_VECTORS, dtype=torch.long)  # [5, 2]: rows (prev, cur)
        out["hash_pairs"], out["hash_buckets"] = pairs, hasher.bigram_hash(pairs)[:, 1].clone()
        out["hash_row"] = x[0, :64].clone()
        out["hash_row_buckets"] = hasher.bigram_hash(x[0, :64]).clone()
        namespace = {"base_model": model, "args": args, "CONTROL_TENSOR_NAME_PATTERNS": ref.CONTROL_TENSOR_NAME_PATTERNS,
                     "Muon": ref.Muon, "torch": torch}
        exec(main_passage(script, PR576_OPTIMISER_PASSAGE), namespace)  # noqa: S102 - the PR's own code
        out["step"] = optimiser_step(model, namespace["optimizers"], namespace["optimizer_muon"], x, y, args)
        quant = tiny_quant_inputs()
        q, scale = ref.gptq_quantize_weight(quant["weight"], quant["hessian"], clip_range=15, block_size=QUANT_BLOCK)
        table_q, table_scale = ref.quantize_float_tensor(quant["table"])
        sd_cpu = {"prune.weight": quant["prune_input"].clone()}
        exec(main_passage(script, PR576_PRUNE_PASSAGE, EXPORT_THRESHOLD),  # noqa: S102
             {"args": args, "sd_cpu": sd_cpu, "torch": torch})
        out["quant"] = {**quant, "q": q, "scale": scale, "table_q": table_q, "table_scale": table_scale,
                        "pruned_mask": sd_cpu["prune.weight"] == 0, "prune_pct": args.prune_pct,
                        "prune_threshold": EXPORT_THRESHOLD,
                        "row_scales": ref._find_best_row_scales(quant["weight"], 15)}
        out["fake_quant"] = fake_quant_golden(ref, quant["weight"])
        out["loader"] = loader_golden(ref, world_size=1)  # one process, 8 micro-batches a step
        out["export"] = export_golden_pr576(script, PR576_ENV, state)
    return out


def golden_pr1218(script: Path) -> dict:
    ref = import_pr(script, PR1218_ENV)
    h = ref.Hyperparameters()
    with cpu_runtime():
        torch.manual_seed(0)
        model = ref.GPT(h)
        state = seeded_state(model)
        x, y = token_rows(2, PR1218_SEQ)
        model.eval()
        out = {"env": dict(PR1218_ENV), "state_dict": state, "x": x, "y": y, **logits_and_loss(model, x, y)}
        optimizers = ref.Optimizers(h, model)
        out["step"] = optimiser_step(model, list(optimizers), optimizers.optimizer_muon, x, y, h)
        quant = tiny_quant_inputs()
        q, scale = ref.gptq_quantize_weight(quant["weight"], quant["hessian"], clip_range=31, block_size=QUANT_BLOCK)
        table_q, table_scale = ref.quantize_float_tensor(quant["table"])
        out["quant"] = {"weight": quant["weight"], "hessian": quant["hessian"], "table": quant["table"],
                        "q": q, "scale": scale, "table_q": table_q, "table_scale": table_scale}
        out["loader"] = loader_golden(ref, world_size=8)  # its record's layout: 8 ranks, one micro-batch each
        out["export"] = export_golden_pr1218(script, PR1218_ENV, state)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pr576", type=Path, required=True)
    parser.add_argument("--pr576-commit", required=True)
    parser.add_argument("--pr1218", type=Path, required=True)
    parser.add_argument("--pr1218-commit", required=True)
    args = parser.parse_args()
    for name, script, commit, make in (("pr576", args.pr576, args.pr576_commit, golden_pr576),
                                        ("pr1218", args.pr1218, args.pr1218_commit, golden_pr1218)):
        golden = make(script)
        golden["source"] = {"commit": commit, "sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
                            "torch": str(torch.__version__)}
        path = ASSETS_DIR / f"golden_{name}.pt"
        torch.save(golden, path)
        print(f"{path}: {path.stat().st_size:,} bytes, loss {float(golden['loss']):.6f}")


if __name__ == "__main__":
    main()
