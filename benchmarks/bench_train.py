"""Training throughput (tokens/s) of one process for a params file's ``model:`` and ``train:``.

Runs the train stage's loop (``pgolf.train.loop.train``: compile warm-up, then timed steps with
looping switched on half-way, EMA, all optimisers) on random token ids, which cost the same
as real text, and prints the tokens per second of the timed steps. With ``train.loader: packed``
each micro-batch is one packed row whose documents start at random, ``MEAN_DOC_TOKENS`` long on
average (the frontier's validation documents), so attention runs on segments as in training. Usage::

    python -m benchmarks.bench_train --params presets/micro.yaml [--steps 20] [--device cpu]
    python -m benchmarks.bench_train --params presets/record.yaml --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from pgolf.config import ModelConfig, TrainConfig, load_params, section
from pgolf.data.packing import row_cu_seqlens
from pgolf.data.shards import BOS_ID
from pgolf.distributed import DistContext
from pgolf.model.gpt import GPT, count_parameters
from pgolf.runtime import resolve_device
from pgolf.train.loop import train

MEAN_DOC_TOKENS = 957  # PR #1855's logs: the mean CaseOps validation document


class RandomBatches:
    """Uniform random token ids in the shapes of the train stage's micro-batches (packed rows for ``packed``)."""

    def __init__(self, cfg: TrainConfig, vocab_size: int, seed: int = 0):
        self.per_step = cfg.grad_accum_steps
        self.batch_size = cfg.train_batch_tokens // (cfg.grad_accum_steps * cfg.train_seq_len)
        self.seq_len, self.vocab_size, self.seed = cfg.train_seq_len, vocab_size, seed
        self.packed = cfg.loader == "packed"

    def micro_batches(self, step: int) -> Sequence[tuple[Tensor, ...]]:
        generator = torch.Generator().manual_seed(self.seed + step)
        tokens = torch.randint(2, self.vocab_size, (self.per_step, self.batch_size, self.seq_len + 1),
                               generator=generator)  # [A, B, T+1]
        if not self.packed:
            return [(t[:, :-1], t[:, 1:]) for t in tokens]
        rows = tokens.view(self.per_step, -1)[:, : self.batch_size * self.seq_len + 1]  # [A, L+1]: one row each
        starts = torch.rand(rows.shape, generator=generator) < 1.0 / MEAN_DOC_TOKENS  # [A, L+1]
        starts[:, 0] = True
        rows = torch.where(starts, BOS_ID, rows)
        return [(row[None, :-1], row[None, 1:], row_cu_seqlens(row[:-1], self.seq_len)) for row in rows]

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def check_state(self, state: dict, source: str) -> None:
        raise ValueError(f"{source}: the benchmark never resumes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (model: and train: sections)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=None, help="compile warm-up steps (default: train:)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default: train.device)")
    args = parser.parse_args()

    params = load_params(args.params, args.overrides)
    model_cfg = section(params, "model", ModelConfig)
    cfg = section(params, "train", TrainConfig)
    cfg = dataclasses.replace(
        cfg, iterations=args.steps, max_wallclock_seconds=0.0, checkpoint_every=0, val_loss_every=0,
        train_log_every=0, device=args.device or cfg.device,
        warmup_steps=cfg.warmup_steps if args.warmup_steps is None else args.warmup_steps)
    device = resolve_device(cfg.device)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    num_params = count_parameters(model)
    result = train(model, cfg, RandomBatches(cfg, model_cfg.vocab_size), ctx)
    tokens = result.steps * result.tokens_per_step
    report = {
        "params_file": args.params,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model_params": num_params,
        "tokens_per_step": result.tokens_per_step,
        "timed_steps": result.steps,
        "warmup_steps": cfg.warmup_steps,
        "compile": cfg.compile,
        "train_time_s": round(result.elapsed_s, 3),
        "step_ms": round(1000 * result.elapsed_s / result.steps, 1),
        "tokens_per_s": round(tokens / result.elapsed_s, 1),
        "loader": cfg.loader,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
