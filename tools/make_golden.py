"""Make the compact golden set of ``tests/assets/`` by running the record's own code on the CPU.

The record's script (``train_gpt_human.py`` of PR #1394, not part of this
repository) is imported as a module with a tiny configuration in its own
environment-variable names; every golden value is then computed by its own
functions and classes: the model's logits and losses, three steps of its Muon,
a short run of its training loop, its Hessian collection, its GPTQ, its byte
shuffle, its byte tables and its two evaluations. The data is real FineWeb
text (``../shared/fineweb/docs_sample.jsonl``) encoded with the challenge's
1024-piece tokenizer into challenge-format shards that the record's loaders read.

What differs from a GPU run, and why:
- attention goes through PyTorch's scaled-dot-product attention instead of
  FlashAttention 3 (a small shim module stands in for ``flash_attn_interface``);
- nothing is compiled (``torch.compile`` returns its argument), CUDA synchronisation is a
  no-op, and the model stays in float32 where the record casts it to bf16 for
  CUDA autocast (which is off on the CPU);
- Hessians are collected for every linear, not only those above 65,536 elements
  (one constant of ``collect_hessians`` is changed in the imported source), so
  that every tensor of the tiny model exercises GPTQ.

Usage (the record's script copied outside the repository first)::

    python tools/make_golden.py /tmp/ref/train_gpt_human.py --reference-commit <sha>
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
TOKENIZER_NAME = "fineweb_1024_bpe.model"
# The sample's first 50 documents are its validation split (as in ../shared/fineweb), the rest its training
# split. The validation prefix starts at the second document: the first alone (19,462 tokens) would fill it,
# leaving no document boundary to score.
VAL_DOCUMENTS, TRAIN_DOCUMENTS = slice(1, 50), slice(50, None)
VAL_TOKENS = 64 * 128 + 1  # a prefix of that split: 64 windows of 128, cut as the record cuts it
LOGIT_POSITIONS = 8  # logits are kept for the first positions of each row only (size); the loss covers all
CALIB_BATCH_TOKENS = 256  # 2 sequences of 128 per calibration batch
CALIB_BATCHES = 4
MUON_STEPS = 3
MUON_MOMENTUM = 0.95
WEIGHT_SEED = 1234
WEIGHT_NOISE = 0.05  # added to every parameter: no zero-initialised tensor, so every path matters
EMBED_NOISE = 0.5  # the tied embedding's: logits of several units, where the softcap's tanh bends
SHUFFLE_BYTES = 1001  # odd: the shuffle's remainder path

MODEL_ENV = {
    "VOCAB_SIZE": 1024, "NUM_LAYERS": 4, "MODEL_DIM": 32, "EMBEDDING_DIM": 32, "NUM_HEADS": 4,
    "NUM_KV_HEADS": 2, "MLP_MULT": 2.0, "ROPE_DIMS": 4, "XSA_LAST_N": 4, "NUM_LOOPS": 2, "LOOP_START": 1,
    "LOOP_END": 2, "TRAIN_SEQ_LEN": 128, "EVAL_SEQ_LEN": 128, "EVAL_STRIDE": 32, "QK_GAIN_INIT": 4.0,
    "LOGIT_SOFTCAP": 30.0,
}
TRAIN_ENV = {
    "ITERATIONS": 8, "WARMUP_STEPS": 1, "WARMDOWN_FRAC": 0.5, "ENABLE_LOOPING_AT": 0.5,
    "MUON_MOMENTUM_WARMUP_STEPS": 4, "EMA_DECAY": 0.9, "MAX_WALLCLOCK_SECONDS": 0, "TRAIN_BATCH_TOKENS": 1024,
    "VAL_LOSS_EVERY": 0, "TRAIN_LOG_EVERY": 1, "SEED": 1337,
}

# The one change to the record's source: collect a Hessian for every linear.
HESSIAN_THRESHOLD = ("module.weight.numel() > 65536", "module.weight.numel() > 0")


# ------------------------------------------------------------------ importing the record


def flash_attn_shim() -> types.ModuleType:
    """``flash_attn_interface`` for the CPU: causal SDPA in FlashAttention's [B, T, H, D] layout."""

    def flash_attn_func(q, k, v, causal=True):
        out = F.scaled_dot_product_attention(  # [B, H, T, D]
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)  # [B, T, H, D]

    shim = types.ModuleType("flash_attn_interface")
    shim.flash_attn_func = flash_attn_func
    return shim


@contextlib.contextmanager
def environment(values: dict):
    """``os.environ`` with ``values`` set (the record reads its settings at import) and no RANK."""
    saved = dict(os.environ)
    os.environ.update({key: str(value) for key, value in values.items()})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def import_reference(script: Path, env: dict) -> types.ModuleType:
    source = script.read_text(encoding="utf-8")
    old, new = HESSIAN_THRESHOLD
    if source.count(old) != 1:
        raise SystemExit(f"{script}: expected `{old}` once in collect_hessians; is this the record's script?")
    source = source.replace(old, new)
    sys.modules.setdefault("flash_attn_interface", flash_attn_shim())
    module = types.ModuleType("reference_train_gpt")
    module.__file__ = str(script)
    with environment(env):
        exec(compile(source, str(script), "exec"), module.__dict__)  # noqa: S102 - the record's own code
    return module


@contextlib.contextmanager
def cpu_runtime():
    """What the record's training loop needs from CUDA, on the CPU: nothing compiled, no synchronisation."""
    saved = (torch.compile, torch.cuda.synchronize, torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved)
    torch.compile = lambda model=None, **options: model if model is not None else (lambda fn: fn)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        torch.compile, torch.cuda.synchronize, torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved = saved


# ------------------------------------------------------------------------------ data


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """The challenge's shard format: 256 int32 header [magic, version, count], then uint16 ids."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, tokens.size)
    with open(path, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype("<u2").tobytes())


def make_data_dir(root: Path, docs_path: Path, tokenizer_path: Path) -> None:
    """``root`` laid out as the record's DATA_DIR: the tokenizer and one val and one train shard."""
    (root / "tokenizers").mkdir(parents=True)
    shutil.copyfile(tokenizer_path, root / "tokenizers" / TOKENIZER_NAME)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    with open(docs_path, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    encoded = [[sp.bos_id(), *ids] for ids in sp.encode(texts, out_type=int)]  # [bos] + ids per document
    val = np.concatenate([np.asarray(ids) for ids in encoded[VAL_DOCUMENTS]])[:VAL_TOKENS]
    train = np.concatenate([np.asarray(ids) for ids in encoded[TRAIN_DOCUMENTS]])
    dataset = root / "datasets" / f"fineweb10B_sp{MODEL_ENV['VOCAB_SIZE']}"
    dataset.mkdir(parents=True)
    write_shard(dataset / "fineweb_val_000000.bin", val)
    write_shard(dataset / "fineweb_train_000000.bin", train)


def recording_loader(ref: types.ModuleType, draws: list) -> type:
    """The record's loader, appending every (loader, x, y) it draws to ``draws``."""

    class RecordingLoader(ref.ShuffledSequenceLoader):
        def next_batch(self, global_tokens, grad_accum_steps):
            x, y = super().next_batch(global_tokens, grad_accum_steps)
            draws.append((self, x.clone(), y.clone()))
            return x, y

    return RecordingLoader


# ---------------------------------------------------------------------- golden values


def golden_weights(ref: types.ModuleType, h) -> dict:
    """The record's model, initialised by its own code, plus noise on every parameter."""
    torch.manual_seed(WEIGHT_SEED)
    model = ref.GPT(h)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = EMBED_NOISE if name == "tok_emb.weight" else WEIGHT_NOISE
            parameter.add_(noise * torch.randn_like(parameter))
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def load_model(ref: types.ModuleType, h, state: dict, looping: bool):
    model = ref.GPT(h)
    model.load_state_dict(state, strict=True)
    model.looping_active = looping
    return model


def logits_and_losses(ref, h, state: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    out = {}
    for suffix, looping in (("noloop", False), ("loop", True)):
        model = load_model(ref, h, state, looping).eval()
        with torch.no_grad():
            out[f"logits_{suffix}"] = model.forward_logits(x)[:, :LOGIT_POSITIONS].clone()  # [B, P, V]
            out[f"loss_{suffix}"] = model(x, y).detach().clone()
    return out


def muon_steps(ref, h, state: dict, loader) -> dict:
    """Three steps of the record's Muon on block 0's matrices, with real gradients at each step's weights.

    Muon treats each matrix on its own (one process), so block 0's six matrices
    (square, wide and tall) stand for the whole group and keep the file small.
    """
    model = load_model(ref, h, state, looping=True).train()
    named = [(f"blocks.0.{name}", p) for name, p in model.blocks[0].named_parameters()
             if p.ndim == 2 and not any(pattern in name for pattern in ref.CONTROL_TENSOR_NAME_PATTERNS)]
    params = [p for _, p in named]
    muon = ref.Muon(params, lr=h.matrix_lr, momentum=MUON_MOMENTUM, backend_steps=h.muon_backend_steps,
                    weight_decay=h.muon_wd, row_normalize=h.muon_row_normalize)
    before = [p.detach().clone() for p in params]
    grads, after = [], []
    for _ in range(MUON_STEPS):
        model.zero_grad(set_to_none=True)
        x, y = loader.next_batch(h.train_batch_tokens, h.grad_accum_steps)
        model(x, y).backward()
        grads.append([p.grad.detach().clone() for p in params])
        muon.step()
        after.append([p.detach().clone() for p in params])
    group = muon.param_groups[0]
    return {"lr": group["lr"], "momentum": group["momentum"], "backend_steps": group["backend_steps"],
            "weight_decay": group["weight_decay"], "row_normalize": group["row_normalize"],
            "nesterov": group["nesterov"], "names": [name for name, _ in named],
            "before": before, "grads": grads, "after": after}


def hessians_and_gptq(ref, h, state: dict) -> tuple[list, dict]:
    """The record's calibration (looping on) and its GPTQ of every linear and the embedding."""
    draws: list = []
    calib_h = copy.copy(h)
    calib_h.train_batch_tokens = CALIB_BATCH_TOKENS * h.grad_accum_steps  # 2 sequences per batch
    loader = recording_loader(ref, draws)(calib_h, torch.device("cpu"))
    model = load_model(ref, h, state, looping=True)
    hessians = ref.collect_hessians(model, loader, calib_h, torch.device("cpu"), n_calibration_batches=CALIB_BATCHES)
    gptq = {}
    for name, hessian in sorted(hessians.items()):
        embedding = "tok_emb" in name  # the record's rule in gptq_mixed_quantize
        bits = h.embed_bits if embedding else h.matrix_bits
        clip_sigmas = h.embed_clip_sigmas if embedding else h.matrix_clip_sigmas
        q, scale = ref.gptq_quantize_weight(state[name], hessian, clip_sigmas=clip_sigmas,
                                            clip_range=2 ** (bits - 1) - 1)
        gptq[name] = {"H": hessian, "bits": bits, "clip_sigmas": clip_sigmas, "q": q, "scale": scale}
    return [x for _, x, _ in draws], gptq


def evaluations(ref, h, state: dict) -> dict:
    device = torch.device("cpu")
    val_data = ref.ValidationData(h, device)
    tokens = val_data.val_tokens.long()  # [N]
    prev, target = tokens[:-1], tokens[1:]
    per_token = val_data.base_bytes_lut[target].long() + (  # docs/DESIGN.md §2, as in the record's eval_val
        val_data.has_leading_space_lut[target] & ~val_data.is_boundary_token_lut[prev]).long()
    model = load_model(ref, h, state, looping=True)
    return {"val_tokens": tokens, "val_byte_count": int(per_token.sum()),
            "eval_val": ref.eval_val(h, device, val_data, model),
            "eval_val_sliding": ref.eval_val_sliding(h, device, val_data, model), "eval_stride": h.eval_stride}


def make_golden(ref) -> dict:
    h = ref.Hyperparameters()
    device = torch.device("cpu")
    state = golden_weights(ref, h)
    val = ref.ValidationData(h, device).val_tokens.long()
    x, y = val[:256].view(2, 128), val[1:257].view(2, 128)  # real text from the validation prefix
    model = load_model(ref, h, state, looping=True)
    calib_batches, gptq = hessians_and_gptq(ref, h, state)
    codes = gptq["blocks.0.mlp.fc.weight"]
    shuffle_in = (codes["q"].numpy().tobytes() + codes["scale"].numpy().tobytes())[:SHUFFLE_BYTES]
    return {
        "config": dict(MODEL_ENV), "seed": WEIGHT_SEED, "state_dict": state, "x": x, "y": y,
        **logits_and_losses(ref, h, state, x, y),
        "encoder_indices": list(model.encoder_indices), "decoder_indices": list(model.decoder_indices),
        "muon": muon_steps(ref, h, state, ref.ShuffledSequenceLoader(h, device)),
        "calib_batches": calib_batches, "gptq": gptq,
        "shuffle_in": shuffle_in, "shuffle_out": ref._byte_shuffle(shuffle_in, 2),
        **evaluations(ref, h, state),
    }


def make_trajectory(ref) -> dict:
    """The record's train_model as train_and_eval runs it, recording batches, losses and weights."""
    h = ref.Hyperparameters()
    device = torch.device("cpu")
    draws: list = []
    forward_losses: list = []
    init_states: list = []
    reference_gpt = ref.GPT

    class Float32GPT(reference_gpt):
        """The record's GPT, kept in float32 (its bf16 cast is for CUDA autocast) and observed."""

        def __init__(self, hparams):
            super().__init__(hparams)
            init_states.append({name: t.detach().clone() for name, t in self.state_dict().items()})

        def bfloat16(self):
            return self

        def forward(self, input_ids, target_ids):
            loss = super().forward(input_ids, target_ids)
            if self.training and torch.is_grad_enabled():
                forward_losses.append(loss.detach().clone())
            return loss

    random.seed(h.seed)
    np.random.seed(h.seed)
    torch.manual_seed(h.seed)
    val_data = ref.ValidationData(h, device)
    ref.GPT, saved_loader = Float32GPT, ref.ShuffledSequenceLoader
    ref.ShuffledSequenceLoader = recording_loader(ref, draws)
    try:
        base_model, _ = ref.train_model(h, device, val_data)
    finally:
        ref.GPT, ref.ShuffledSequenceLoader = reference_gpt, saved_loader
    training_loader = draws[-1][0]  # warm-up draws from a first loader; training from a fresh one
    batches = [torch.stack((x, y)) for loader, x, y in draws if loader is training_loader]  # [2, B, T] each
    micro = forward_losses[-len(batches):]
    if len(batches) != h.iterations * h.grad_accum_steps or len(init_states) != 1:
        raise SystemExit(f"unexpected run: {len(batches)} training micro-batches, {len(init_states)} models")
    losses = []
    for step in range(h.iterations):
        step_loss = torch.zeros(())  # as the record's step_fn: a float32 sum of the micro losses, then / accum
        for loss in micro[step * h.grad_accum_steps:(step + 1) * h.grad_accum_steps]:
            step_loss += loss
        losses.append((step_loss / h.grad_accum_steps).item())
    return {
        "config": {**MODEL_ENV, **TRAIN_ENV}, "grad_accum_steps": h.grad_accum_steps,
        "init_state_dict": init_states[0], "train_batches": batches, "train_losses": losses,
        "final_state_dict": {name: t.detach().clone() for name, t in base_model.state_dict().items()},
    }


# ------------------------------------------------------------------------------ output


def summary(golden: dict, trajectory: dict, provenance: dict) -> dict:
    scalars = ("seed", "encoder_indices", "decoder_indices", "val_byte_count", "eval_stride", "eval_val",
               "eval_val_sliding")
    return {
        "provenance": provenance, "config": golden["config"],
        **{key: golden[key] for key in scalars},
        "loss_noloop": golden["loss_noloop"].item(), "loss_loop": golden["loss_loop"].item(),
        "val_tokens": golden["val_tokens"].numel(), "muon_names": golden["muon"]["names"],
        "gptq_tensors": sorted(golden["gptq"]),
        "train_config": trajectory["config"], "train_losses": trajectory["train_losses"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", type=Path, help="the record's train_gpt_human.py (kept outside the repository)")
    parser.add_argument("--reference-commit", default="", help="the parameter-golf commit the script came from")
    parser.add_argument("--shared", type=Path, default=SHARED_DIR, help="the shared data (FineWeb sample, tokenizer)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "assets")
    args = parser.parse_args(argv)
    tokenizer = args.shared / "tokenizers" / TOKENIZER_NAME
    docs = args.shared / "fineweb" / "docs_sample.jsonl"
    for path in (args.script, tokenizer, docs):
        if not path.is_file():
            raise SystemExit(f"{path}: not found")
    with tempfile.TemporaryDirectory() as tmp, cpu_runtime():
        data_dir = Path(tmp) / "data"
        make_data_dir(data_dir, docs, tokenizer)
        ref = import_reference(args.script, {**MODEL_ENV, **TRAIN_ENV, "DATA_DIR": f"{data_dir}/",
                                             "RUN_ID": "golden"})
        golden = make_golden(ref)
        trajectory = make_trajectory(ref)
    provenance = {"script_sha256": hashlib.sha256(args.script.read_bytes()).hexdigest(),
                  "reference_commit": args.reference_commit, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(golden, args.out / "golden_compact.pt")
    torch.save(trajectory, args.out / "golden_train_compact.pt")
    shutil.copyfile(tokenizer, args.out / TOKENIZER_NAME)
    text = json.dumps(summary(golden, trajectory, provenance), indent=1)
    (args.out / "golden_compact.json").write_text(text + "\n", encoding="utf-8")
    for name in ("golden_compact.pt", "golden_train_compact.pt", "golden_compact.json", TOKENIZER_NAME):
        print(f"{args.out / name}: {(args.out / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
