"""Test-time training throughput (scored tokens/s) of each ``ttt.method`` for a params file's ``model:`` and ``ttt:``.

Runs ``pgolf.eval.ttt.run_ttt`` on a random model over a synthetic validation stream of random
documents (``[BOS] + ids`` of random lengths, which cost the same as real text) and prints,
per method, the scored tokens per second, the optimiser steps and the seconds, after an untimed
warm-up on a short prefix. Usage::

    python -m benchmarks.bench_ttt --params params.yaml --tokens 65536 [--device cpu]
    python -m benchmarks.bench_ttt --params presets/record.yaml --tokens 1048576 --device cuda \
        --methods sgd_all lora_doc      # the record's shapes: 11 x 512, windows of 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from pgolf.config import TTT_METHODS, ModelConfig, TTTConfig, load_params, section
from pgolf.data.accounting import lookup_stream
from pgolf.data.shards import BOS_ID
from pgolf.data.tokenizer import ByteTables
from pgolf.eval.ttt import run_ttt
from pgolf.model.gpt import GPT, count_parameters
from pgolf.runtime import resolve_device


def random_stream(num_tokens: int, vocab_size: int, mean_doc_len: int, seed: int = 0) -> torch.Tensor:
    """Random documents ``[BOS] + ids`` with exponentially distributed lengths (as web text roughly is)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab_size, (num_tokens,), generator=generator)  # [N]
    position = 0
    while position < num_tokens:
        tokens[position] = BOS_ID
        position += 2 + int(torch.empty(1).exponential_(1.0 / mean_doc_len, generator=generator))
    return tokens


def unit_tables(vocab_size: int) -> ByteTables:
    """Every piece one byte: the byte count does not change the work."""
    boundary = torch.zeros(vocab_size, dtype=torch.bool)
    boundary[BOS_ID] = True
    return ByteTables(torch.ones(vocab_size, dtype=torch.int16), torch.zeros(vocab_size, dtype=torch.bool), boundary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (model: and ttt: sections)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--tokens", type=int, default=65_536, help="validation tokens to score")
    parser.add_argument("--mean-doc-len", type=int, default=800, help="mean document length (FineWeb: about 810)")
    parser.add_argument("--methods", nargs="+", default=list(TTT_METHODS), choices=TTT_METHODS)
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default: ttt.device)")
    args = parser.parse_args()

    params = load_params(args.params, args.overrides)
    model_cfg = section(params, "model", ModelConfig)
    base = section(params, "ttt", TTTConfig)
    device = resolve_device(args.device or base.device)
    tokens = random_stream(args.tokens, model_cfg.vocab_size, args.mean_doc_len)
    tables = unit_tables(model_cfg.vocab_size)
    report = {"params_file": args.params, "model_params": None, "tokens": args.tokens,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "methods": {}}
    for method in args.methods:
        cfg = dataclasses.replace(base, method=method)
        torch.manual_seed(0)
        model = GPT(model_cfg).to(device)
        model.looping_active = True
        report["model_params"] = count_parameters(model)
        # untimed warm-up on a short prefix: first-use imports (torch.optim loads dynamo), allocator, kernels
        run_ttt(model, lookup_stream(tokens[: 4 * cfg.seq_len + 1], tables), cfg, device)
        result = run_ttt(model, lookup_stream(tokens, tables), cfg, device)
        report["methods"][method] = {"seconds": round(result.seconds, 2), "optimizer_steps": result.optimizer_steps,
                                     "tokens_per_s": round(result.tokens / result.seconds, 1)}
        print(json.dumps({method: report["methods"][method]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
