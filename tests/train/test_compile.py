"""The GPU's code path on the CPU: torch.compile against eager, and the record's bf16 mixed precision.

On the GPU, training and evaluation compile the model (``compile: auto``, fullgraph) and run
the record's bf16 policy; every other test runs eager float32 on the CPU. These run the same
functions with compilation (inductor's C++ backend here) and bf16 switched on, on a model
small enough to compile in seconds. The ``gpu`` variants run on CUDA only
(``pytest -m gpu``; ``benchmarks/gpu_check.py`` runs them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from pgolf.config import ModelConfig, TrainConfig
from pgolf.data.accounting import lookup_stream
from pgolf.data.tokenizer import ByteTables
from pgolf.distributed import DistContext
from pgolf.eval.bpb import eval_sliding
from pgolf.model.gpt import GPT
from pgolf.train.loop import Trainer, train
from pgolf.train.optim import is_control_tensor
from tests.conftest import REPO_ROOT
from tests.train.recorded_batches import RecordedBatches
from tests.train.test_loop import one_thread  # noqa: F401  (autouse: one thread, as for the other tiny models)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]

# A micro config with every feature of the record's (XSA on all layers, skip gates, looping), 3 layers of
# width 32 and a vocabulary of 64: inductor builds its graphs in seconds.
MICRO_MODEL = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                          rope_dims=8, rope_train_seq_len=16, xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1)
MICRO_TRAIN = TrainConfig(iterations=4, max_wallclock_seconds=0, warmup_steps=1, enable_looping_at=0.5,
                          train_batch_tokens=2 * 4 * 16, train_seq_len=16, grad_accum_steps=2,
                          muon_momentum_warmup_steps=3, ema_decay=0.9, train_log_every=1)


def context(device: str) -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device(device))


def perturbed_model(seed: int = 0, cfg: ModelConfig = MICRO_MODEL) -> GPT:
    """A model whose every layer (and gate, lane, smear) matters: nothing at its zero or identity init."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def batches(steps: int, repeat: bool = False) -> RecordedBatches:
    """Random micro-batches of MICRO_TRAIN's shape; ``repeat``: the same step every time (learnable)."""
    generator = torch.Generator().manual_seed(0)
    per_step = MICRO_TRAIN.grad_accum_steps
    rows = MICRO_TRAIN.train_batch_tokens // (per_step * MICRO_TRAIN.train_seq_len)
    tokens = torch.randint(0, MICRO_MODEL.vocab_size, (per_step if repeat else steps * per_step, rows, 17),
                           generator=generator)  # [steps * A, B, T + 1]
    if repeat:
        tokens = tokens.repeat(steps, 1, 1)
    return RecordedBatches([(t[:, :-1], t[:, 1:]) for t in tokens], per_step)


def loss_and_grads(model: GPT, runner, inputs, targets) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = runner(inputs, targets)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- compile


def test_compiled_training_step_matches_eager_with_looping_off_and_on():
    """The compiled part of a training step (forward and backward of the loss), as the trainer compiles it."""
    model = perturbed_model()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    inputs, targets = batches(1).micro_batches(0)[0]
    eager_grads = {}
    for looping in (False, True):
        model.looping_active = looping
        eager_loss, eager_grads[looping] = loss_and_grads(model, model, inputs, targets)
        compiled_loss, compiled_grads = loss_and_grads(model, compiled, inputs, targets)
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5), f"looping {looping}"
        for name, grad in eager_grads[looping].items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"looping {looping}: {name}")
    # the two graphs compute different things: the looped layer runs twice
    looped = "blocks.1.mlp.fc.weight"
    assert not torch.allclose(eager_grads[True][looped], eager_grads[False][looped], rtol=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_run_matches_eager(device):
    """``train.compile: true``: warm-up (looping off, then on), then steps with looping switched on half-way."""
    cfg = dataclasses.replace(MICRO_TRAIN, device=device)
    eager = train(perturbed_model(), dataclasses.replace(cfg, compile=False), batches(4), context(device),
                  progress=False)
    compiled = train(perturbed_model(), dataclasses.replace(cfg, compile=True), batches(4), context(device),
                     progress=False)
    assert [row["looping"] for row in compiled.history] == [0, 0, 1, 1]
    # float32 on the CPU: summation order only (3e-6 measured); bf16 on the GPU: its rounding, through four steps
    assert compiled.losses == pytest.approx(eager.losses, rel=3e-5 if device == "cpu" else 2e-2)
    # Muon's bf16 Newton-Schulz turns those last-bit differences into bf16 roundings (8e-4 measured)
    tolerance = 1e-2 if device == "cpu" else 5e-2
    for name, tensor in eager.ema_state.items():
        error = (compiled.ema_state[name].float() - tensor.float()).norm() / tensor.float().norm()
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_evaluation_matches_eager(device):
    """``evaluate.compile``: the sliding windows' forward (context-only positions cut) compiled fullgraph."""
    model = perturbed_model().to(device)
    model.looping_active = True
    tokens = torch.randint(1, MICRO_MODEL.vocab_size, (16 * 12 + 1,), generator=torch.Generator().manual_seed(1))
    tables = ByteTables(base_bytes=torch.arange(64, dtype=torch.int16) % 4 + 1,
                        has_leading_space=torch.arange(64) % 3 == 0, is_boundary=torch.arange(64) < 2)
    stream = lookup_stream(tokens, tables)
    torch._dynamo.reset()  # no graph of an earlier test reused, no earlier recompiles counted against the limit
    graphs_before = counters["stats"]["unique_graphs"]
    # 45 windows, 14 a batch: the first batch (scoring from position 0), two full ones, a last one of 3
    scores = [eval_sliding(model, stream, seq_len=16, stride=4, batch_seqs=14, device=torch.device(device),
                           compile_model=compile_model) for compile_model in (False, True)]
    rel = 1e-5 if device == "cpu" else 1e-2
    assert scores[1].loss == pytest.approx(scores[0].loss, rel=rel)
    assert scores[1].bpb == pytest.approx(scores[0].bpb, rel=rel)
    # the last batch is padded with windows that score nothing: no graph of its own (half a minute on a GPU)
    assert counters["stats"]["unique_graphs"] - graphs_before == 2


# ---------------------------------------------------------------- bf16


def test_bf16_training_on_the_cpu_follows_the_gpu_dtype_policy():
    """``bf16=True``: the GPU's dtype policy and bf16 autocast, through the trainer, on the CPU."""
    cfg = dataclasses.replace(MICRO_TRAIN, iterations=8, warmup_steps=0, compile=False, device="cpu")
    reference = train(perturbed_model(), cfg, batches(8, repeat=True), context("cpu"), progress=False)
    model = perturbed_model()
    activation_dtypes = set()
    model.blocks[0].mlp.fc.register_forward_hook(lambda m, inp, out: activation_dtypes.add(out.dtype))
    trainer = Trainer(model, cfg, batches(8, repeat=True), context("cpu"), progress=False, bf16=True)
    result = trainer.run()

    assert activation_dtypes == {torch.bfloat16}  # autocast was on
    # docs/DESIGN.md §3: tok_emb stored, updated and EMA-written in bf16; linear weights and control tensors fp32
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}
    assert any(is_control_tensor(name) for name in dtypes) and any(name.endswith("fc.weight") for name in dtypes)
    assert result.ema_state["tok_emb.weight"].dtype == torch.bfloat16
    assert {t.dtype for name, t in result.ema_state.items() if name != "tok_emb.weight"} == {torch.float32}
    embedding = model.tok_emb.weight  # its AdamW moments are bf16 too (the update is computed in bf16)
    (adam,) = [opt for opt in trainer.optimizers.all
               if any(p is embedding for group in opt.param_groups for p in group["params"])]
    assert {adam.state[embedding][key].dtype for key in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}

    # bf16 rounding, not another computation: within a bf16 tolerance of float32 at every step (1.2e-3 measured)
    assert result.losses == pytest.approx(reference.losses, rel=1e-2)
    assert result.losses[-1] < 0.75 * result.losses[0]  # and it learns (the same batch every step: 4.23 -> 2.26)


# ---------------------------------------------------------------- gpu_check


def test_gpu_check_without_cuda_says_so_and_reports_every_check_skipped(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--fineweb", str(tmp_path / "fineweb"),
                           "--out", str(tmp_path / "report")], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device: skipping GPU checks" in proc.stdout.splitlines()
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("tests", "skipped"), ("attention", "skipped"), ("throughput", "skipped"), ("frontier", "skipped"),
        ("pipeline", "skipped")]
    assert "| pipeline | skipped |" in (tmp_path / "report" / "gpu_check.md").read_text()
