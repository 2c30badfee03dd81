"""Rate-aware GPTQ's λ against bytes, H-weighted error and bpb on a trained model, beside widening the clip.

For a run directory of the research preset (as ``bench_allocate`` takes it) it quantizes at
the params' settings with ``scale_search: loss_sdclip`` and, for each λ, ``rate_lambda: λ``;
then, with λ 0, at wider clips. Per point it prints the submission bytes under the ``ans``
coder (code bytes excluded), Σ tr(ΔHΔᵀ) and the validation bpb (plain windows): whether the
bytes rate-aware GPTQ saves cost less loss than the same bytes saved by the clip. Usage::

    python -m benchmarks.bench_rate_aware --run runs/research_seed1337 [--params presets/research.yaml]
        [--lambdas 0 0.1 0.2] [--clips 13.3 13.8]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from benchmarks.bench_allocate import load_run
from pgolf.artifact.size import submission_bytes
from pgolf.config import CompressConfig, QuantizeConfig, section
from pgolf.quant.gptq import quantize_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("presets/research.yaml"))
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--clips", type=float, nargs="+", default=[13.3, 13.8])
    args = parser.parse_args(argv)
    run = load_run(args.run, args.params, None, sliding=False)
    base = dataclasses.replace(section(run.params, "quantize", QuantizeConfig), scale_search="loss_sdclip")
    ans = CompressConfig(compressor="ans", size_limit_bytes=2**62)
    embed_per_matrix = base.embed_clip_sigmas / base.matrix_clip_sigmas  # the embedding's clip moves with the rest
    points = [{"rate_lambda": lam} for lam in args.lambdas]
    points += [{"matrix_clip_sigmas": clip, "embed_clip_sigmas": clip * embed_per_matrix} for clip in args.clips]
    print(f"{'setting':50s} {'bytes (ans)':>12s} {'Σ H-err':>10s} {'bpb':>9s}")
    for changes in points:
        qm, _ = quantize_model(run.model_config, run.state_dict, run.hessians, dataclasses.replace(base, **changes),
                               show_progress=False, sensitivity=run.sensitivity)
        label = ", ".join(f"{k} {v:g}" for k, v in changes.items())
        print(f"{label:50s} {submission_bytes(qm, ans, 0):>12,} {run.h_error(qm):10.4g} "
              f"{run.quantized_bpb(qm, label):9.5f}", flush=True)


if __name__ == "__main__":
    main()
