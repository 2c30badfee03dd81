"""Time GPTQ + SDClip (and the compressor) on the record's shapes; print seconds and bytes.

The record's quantized tensors are, per layer of 11, c_q 512×512, c_k and c_v
256×512, attn.proj 512×512, mlp.fc 2048×512 and mlp.proj 512×2048, plus the
tied embedding 8192×512. Weights are random normal and Hessians random SPD
matrices ``XᵀX / tokens`` with per-column input scales, which is enough to time
the algorithm (a trained model compresses a little differently). The second
GPTQ pass reuses the Hessian factors, as each step of ``fit_to_size`` does; with
serialize and compress it is one retune step (one size-search try, or the
quantize + compress stages of ``dvc exp run -S quantize...``), timed as a whole.

    python benchmarks/bench_quantize.py [--device cpu|cuda|auto] [--threads N]
        [--compressor ans|brotli|lzma|zstd ...] [--no-compress]
"""

from __future__ import annotations

import argparse
import time

import torch

from pgolf.artifact.compress import COMPRESSORS, compress
from pgolf.artifact.format import serialize
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.quant.gptq import quantize_model, report_totals
from pgolf.runtime import resolve_device

LAYER_SHAPES = {
    "attn.c_q": (512, 512), "attn.c_k": (256, 512), "attn.c_v": (256, 512),
    "attn.proj": (512, 512), "mlp.fc": (2048, 512), "mlp.proj": (512, 2048),
}


def record_tensors(num_layers: int) -> dict[str, tuple[int, int]]:
    shapes = {f"blocks.{i}.{name}.weight": shape for i in range(num_layers) for name, shape in LAYER_SHAPES.items()}
    return {"tok_emb.weight": (8192, 512)} | shapes


def random_hessian(cols: int, generator: torch.Generator) -> torch.Tensor:
    tokens = 2 * cols
    x = torch.randn(tokens, cols, generator=generator) * (0.1 + torch.rand(cols, generator=generator))  # [T, cols]
    return x.T @ x / tokens  # [cols, cols]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--compressor", action="append", default=[], choices=sorted(COMPRESSORS),
                        help="compressor of the retune step; repeatable (default: ans and brotli)")
    parser.add_argument("--no-compress", action="store_true", help="time GPTQ only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    generator = torch.Generator().manual_seed(0)
    shapes = record_tensors(args.layers)
    state = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    hessians = {name: random_hessian(shape[1], generator) for name, shape in shapes.items()}
    cfg = QuantizeConfig(device=args.device)
    numel = sum(t.numel() for t in state.values())
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(state)} tensors, {numel:,} weights")

    cache: dict = {}
    start = time.perf_counter()
    qm, rows = quantize_model(ModelConfig(), state, hessians, cfg, device, factor_cache=cache)
    first = time.perf_counter() - start
    start = time.perf_counter()
    quantize_model(ModelConfig(), state, hessians, cfg, device, show_progress=False, factor_cache=cache)
    again = time.perf_counter() - start
    print(f"gptq: {first:.2f} s (with Hessian factoring), {again:.2f} s (factors reused, one fit_to_size step)")
    print(f"H-weighted relative error (weighted mean): {report_totals(rows)['h_rel_error_weighted']:.4e}")

    start = time.perf_counter()
    raw = serialize(qm)
    serialize_seconds = time.perf_counter() - start
    print(f"serialize: {serialize_seconds:.2f} s, {len(raw):,} bytes")
    for name in [] if args.no_compress else args.compressor or ["ans", "brotli"]:
        start = time.perf_counter()
        blob = compress(raw, CompressConfig(compressor=name))
        seconds = time.perf_counter() - start
        print(f"compress ({name}): {seconds:.2f} s, {len(blob):,} bytes; retune step (GPTQ with cached factors "
              f"+ serialize + compress): {again + serialize_seconds + seconds:.2f} s")


if __name__ == "__main__":
    main()
