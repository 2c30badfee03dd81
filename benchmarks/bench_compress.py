"""Bytes and seconds of every compressor on the same quantized models, side by side.

For each model it prints, per compressor (brotli, lzma, zstd, the model-based ``ans`` coder
of ``pgolf.artifact.ans`` and PR #1855's per-group lrzip ``pergroup`` of
``pgolf.artifact.pergroup``): the artifact's bytes, bits per quantized weight, compress and
decompress seconds, and each coder's size and time relative to brotli measured in the same
run; and, as the floor, the order-0 entropy of the codes: each code tensor under its own
exact histogram, no model cost, the bound of any coder that codes the codes one by one
without context (scales and passthrough tensors come on top of it in every artifact).

The first model is record-shaped: the tensors of ``GPT(ModelConfig())`` (the record's
model), every matrix of more than 65,536 elements as random int6 codes (int8 for the
embedding) with fp16 row scales, the rest fp16; the codes are rounded Gaussians with the
spread SDClip gives them (``std = qmax / clip_sigmas``). ``--quantized PATH`` adds a real
quantized model (``out/quantize/quantized.bin``, or one that ``pgolf import`` brought in);
repeatable. ``--compressor`` limits the run to the coders named (repeatable; pergroup needs
the lrzip program and codes about 0.3 MB/s of codes on one core). Usage::

    python -m benchmarks.bench_compress [--quantized PATH ...] [--no-record] [--compressor NAME ...]
        [--brotli-quality 11] [--lzma-preset 6] [--zstd-level 22] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.artifact.compress import COMPRESSORS, compress, decompress
from pgolf.artifact.format import deserialize, serialize
from pgolf.artifact.tensors import CodedTensor, QuantizedModel, QuantizedTensor
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.model.gpt import GPT


def random_codes(rows: int, cols: int, bits: int, clip_sigmas: float, generator: torch.Generator) -> QuantizedTensor:
    qmax = 2 ** (bits - 1) - 1
    spread = qmax / clip_sigmas  # a weight at one std lands this many steps from 0
    q = (torch.randn(rows, cols, generator=generator) * spread).round().clamp(-qmax, qmax).to(torch.int8)
    scale = (torch.rand(rows, generator=generator) * 1e-3 + 1e-3).half()  # [rows]
    return QuantizedTensor(q=q, scale=scale, bits=bits, clip_sigmas=clip_sigmas)


def record_like_model(seed: int) -> QuantizedModel:
    model_cfg, quant_cfg = ModelConfig(), QuantizeConfig()
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, QuantizedTensor | torch.Tensor] = {}
    for name, weight in GPT(model_cfg).state_dict().items():
        if weight.numel() <= quant_cfg.passthrough_max_numel:
            tensors[name] = torch.randn(weight.shape, generator=generator).half()
        elif name == "tok_emb.weight":
            tensors[name] = random_codes(*weight.shape, quant_cfg.embed_bits, quant_cfg.embed_clip_sigmas, generator)
        else:
            tensors[name] = random_codes(*weight.shape, quant_cfg.matrix_bits, quant_cfg.matrix_clip_sigmas, generator)
    return QuantizedModel(model_config=model_cfg, tensors=tensors)


def order0_bits(qm: QuantizedModel) -> float:
    """Bits of all codes, each tensor's under its own exact histogram (order-0 entropy)."""
    total = 0.0
    for tensor in qm.tensors.values():
        if isinstance(tensor, CodedTensor) and tensor.q.numel():
            counts = np.bincount(tensor.q.numpy().ravel().astype(np.int64) + 128)
            counts = counts[counts > 0]
            total += float(-(counts * np.log2(counts / counts.sum())).sum())
    return total


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_model(label: str, raw: bytes, configs: list[tuple[str, CompressConfig]]) -> None:
    qm = deserialize(raw)
    weights = sum(t.q.numel() for t in qm.tensors.values() if isinstance(t, CodedTensor))
    floor = order0_bits(qm) / 8
    print(f"\n## {label}: {len(qm.tensors)} tensors, {weights:,} quantized weights, {len(raw):,} serialized bytes\n")
    print("| compressor | bytes | bits/weight | vs brotli | over the floor | compress s | decompress s | time vs brotli |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| floor: order-0 entropy of the codes | {floor:,.0f} | {8 * floor / max(weights, 1):.4f} | | | | | |")
    reference: tuple[int, float] | None = None
    for name, cfg in configs:
        blob, seconds = timed(compress, raw, cfg)
        restored, back = timed(decompress, blob)
        if restored != raw:
            raise SystemExit(f"{name} round trip changed {label}")
        reference = reference or (len(blob), seconds)
        print(f"| {name} | {len(blob):,} | {8 * len(blob) / max(weights, 1):.4f} | "
              f"{100 * (len(blob) / reference[0] - 1):+.2f} % | {100 * (len(blob) / floor - 1):+.2f} % | "
              f"{seconds:.2f} | {back:.2f} | {seconds / reference[1]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantized", type=Path, action="append", default=[], help="a quantized model; repeatable")
    parser.add_argument("--no-record", action="store_true", help="skip the record-shaped random codes")
    parser.add_argument("--compressor", action="append", default=[], choices=COMPRESSORS,
                        help="run only these compressors (repeatable; default: all, brotli first)")
    parser.add_argument("--brotli-quality", type=int, default=11)
    parser.add_argument("--lzma-preset", type=int, default=6)
    parser.add_argument("--zstd-level", type=int, default=22)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    configs = [  # brotli first: the others are compared with it
        (f"brotli-{args.brotli_quality}", CompressConfig(compressor="brotli", brotli_quality=args.brotli_quality)),
        (f"lzma-{args.lzma_preset}", CompressConfig(compressor="lzma", lzma_preset=args.lzma_preset)),
        (f"zstd-{args.zstd_level}", CompressConfig(compressor="zstd", zstd_level=args.zstd_level)),
        ("ans", CompressConfig(compressor="ans")),
        ("pergroup (lrzip -z -L 9)", CompressConfig(compressor="pergroup", brotli_quality=args.brotli_quality)),
    ]
    if args.compressor:
        configs = [(name, cfg) for name, cfg in configs if cfg.compressor in args.compressor]
    models: list[tuple[str, bytes]] = []
    if not args.no_record:
        models.append(("record-shaped random codes", serialize(record_like_model(args.seed))))
    models += [(str(path), path.read_bytes()) for path in args.quantized]
    print(f"torch threads {torch.get_num_threads()}")
    for label, raw in models:
        bench_model(label, raw, configs)


if __name__ == "__main__":
    main()
