"""pgolf's GPTQ against the textbook GPTQ + SDClip on the record's shapes, one thread, in one run.

The baseline is the record's algorithm in its plainest form, written here: per matrix, dead
columns zeroed, damping, columns by descending Hessian diagonal, the upper Cholesky factor
of H⁻¹, then blocks of 128 columns quantized one column at a time with a rank-1 update of
the block per column and one matmul per block for the columns after it (docs/DESIGN.md §5).
pgolf's side is the quantize stage's own call, ``quantize_model`` at the record's settings,
report included. Both see the same weights and Hessians: the record's 11 layers × width 512
(c_q 512×512, c_k and c_v 256×512 reading one input, so sharing one Hessian as calibration
makes them, attn.proj 512×512, mlp.fc 2048×512, mlp.proj 512×2048) and the tied embedding
8192×512; weights random normal, Hessians ``XᵀX / tokens`` of random inputs with per-column
scales. Runs alternate (baseline, pgolf, baseline, ...) so that a load on the machine falls
on both; the ratio is of the medians. It also prints how many codes agree.

    python -m benchmarks.bench_gptq [--rounds 3] [--layers 11] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from benchmarks.bench_quantize import random_hessian, record_tensors
from pgolf.artifact.tensors import QuantizedTensor
from pgolf.config import ModelConfig, QuantizeConfig
from pgolf.quant.gptq import quantize_model, tensor_plan


def record_hessians(shapes: dict[str, tuple[int, int]], generator: torch.Generator) -> dict[str, Tensor]:
    """A random Hessian per input: c_q, c_k and c_v of a layer share their input, so one Hessian."""
    hessians: dict[str, Tensor] = {}
    for name, (_, cols) in shapes.items():
        shared = name.replace(".c_k.", ".c_q.").replace(".c_v.", ".c_q.")
        hessians[name] = hessians[shared].clone() if shared in hessians else random_hessian(cols, generator)
    return hessians


def textbook_gptq(weight: Tensor, hessian: Tensor, bits: int, clip_sigmas: float, block: int = 128,
                  damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """int8 codes [rows, cols] and fp16 row scales [rows] of one matrix, column by column."""
    original = weight.float()
    weight, hessian = original.clone(), hessian.float().clone()  # [rows, cols], [cols, cols]
    cols = weight.shape[1]
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian += damping * torch.mean(torch.diag(hessian)) * torch.eye(cols)
    perm = torch.argsort(torch.diag(hessian), descending=True)
    weight, hessian = weight[:, perm], hessian[perm][:, perm]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    qmax = 2 ** (bits - 1) - 1
    scale = (clip_sigmas * original.std(dim=1) / qmax).clamp_min(1e-10).to(torch.float16)  # [rows]
    step = scale.float()
    codes = torch.zeros_like(weight)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        part, errors = weight[:, i1:i2].clone(), torch.zeros(weight.shape[0], i2 - i1)  # [rows, B]
        for i in range(i2 - i1):
            column = part[:, i]
            code = torch.clamp(torch.round(column / step), -qmax, qmax)
            codes[:, i1 + i] = code
            error = (column - code * step) / upper[i1 + i, i1 + i]
            part[:, i:] -= error.unsqueeze(1) @ upper[i1 + i, i1 + i:i2].unsqueeze(0)
            errors[:, i] = error
        weight[:, i2:] -= errors @ upper[i1:i2, i2:]
    return codes[:, torch.argsort(perm)].to(torch.int8), scale


def run_textbook(state: dict[str, Tensor], hessians: dict[str, Tensor], cfg: QuantizeConfig) -> dict[str, Tensor]:
    codes = {}
    for name, weight in state.items():
        plan = tensor_plan(name, weight, cfg)
        codes[name] = textbook_gptq(weight, hessians[name], plan.bits, plan.clip_sigmas, cfg.block_size,
                                    cfg.damping)[0]
    return codes


def run_pgolf(state: dict[str, Tensor], hessians: dict[str, Tensor], cfg: QuantizeConfig) -> dict[str, Tensor]:
    qm, _ = quantize_model(ModelConfig(), state, hessians, cfg, "cpu", show_progress=False)
    return {name: t.q for name, t in qm.tensors.items() if isinstance(t, QuantizedTensor)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternated")
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shapes = record_tensors(args.layers)
    state = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    hessians = record_hessians(shapes, generator)
    cfg = QuantizeConfig(device="cpu")
    print(f"torch threads {torch.get_num_threads()}, {len(state)} matrices, "
          f"{sum(t.numel() for t in state.values()):,} weights, {args.rounds} alternated rounds")
    times: dict[str, list[float]] = {"textbook": [], "pgolf": []}
    codes: dict[str, dict[str, Tensor]] = {}
    for _ in range(args.rounds):
        for label, run in (("textbook", run_textbook), ("pgolf", run_pgolf)):
            start = time.perf_counter()
            codes[label] = run(state, hessians, cfg)
            times[label].append(time.perf_counter() - start)
            print(f"  {label:8s} {times[label][-1]:7.2f} s")
    equal = sum(int((codes["pgolf"][n] == codes["textbook"][n]).sum()) for n in state)
    numel = sum(t.numel() for t in state.values())
    base, ours = statistics.median(times["textbook"]), statistics.median(times["pgolf"])
    print(f"textbook GPTQ {base:.2f} s, pgolf quantize_model {ours:.2f} s (medians): "
          f"pgolf / textbook = {ours / base:.3f}; codes equal {equal / numel:.6%}")


if __name__ == "__main__":
    main()
