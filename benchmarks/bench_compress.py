"""Seconds and bytes of serialize + compress (brotli and lzma) on the record's tensor shapes.

The tensors are those of ``GPT(ModelConfig())`` (the record's model): every matrix of more
than 65,536 elements becomes random int6 codes (int8 for the embedding) with fp16 row scales,
the rest stays fp16. The codes are rounded Gaussians with the spread SDClip gives them
(``std = qmax / clip_sigmas``), so their entropy, and hence the compressed size, is close to
a real GPTQ artifact's. Usage::

    python -m benchmarks.bench_compress [--brotli-quality 11] [--lzma-preset 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from pgolf.codec import QuantizedModel, QuantizedTensor, compress, decompress, deserialize, serialize
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.model import GPT


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


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brotli-quality", type=int, default=11)
    parser.add_argument("--lzma-preset", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    qm = record_like_model(args.seed)
    codes = sum(t.q.numel() for t in qm.tensors.values() if isinstance(t, QuantizedTensor))
    raw, seconds = timed(serialize, qm)
    print(f"tensors: {len(qm.tensors)}, quantized weights: {codes:,}")
    print(f"serialize:   {seconds:7.2f} s  {len(raw):>12,} bytes")
    _, seconds = timed(deserialize, raw)
    print(f"deserialize: {seconds:7.2f} s")
    for cfg in (CompressConfig(compressor="brotli", brotli_quality=args.brotli_quality),
                CompressConfig(compressor="lzma", lzma_preset=args.lzma_preset)):
        level = cfg.brotli_quality if cfg.compressor == "brotli" else cfg.lzma_preset
        blob, seconds = timed(compress, raw, cfg)
        restored, back = timed(decompress, blob)
        assert restored == raw, f"{cfg.compressor} round trip failed"
        print(f"{cfg.compressor}-{level}: compress {seconds:7.2f} s, decompress {back:5.2f} s, "
              f"{len(blob):>12,} bytes ({8 * len(blob) / codes:.3f} bits per quantized weight)")


if __name__ == "__main__":
    main()
