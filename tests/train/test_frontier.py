"""The frontier's training (PR #1855) against the golden steps its own code computed, and on packed rows.

``golden_frontier_tiny.pt`` (README "Frontier record"): Polar Express Newton–Schulz with 5, 3 and 7
steps and three steps of the record's Muon (bf16 gradient and momentum), both reproduced bit for
bit; the learning-rate multiplier with MIN_LR and the training fraction, exact. Then the trainer on
packed rows: compiled against eager, and local gradient clipping against global on one rank.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.config import ModelConfig, TrainConfig
from pgolf.data.packing import row_cu_seqlens
from pgolf.data.shards import BOS_ID
from pgolf.model.gpt import GPT
from pgolf.train.loop import lr_scale, train, training_fraction
from pgolf.train.optim import POLAR_EXPRESS_COEFFS, MuonEqR, build_optimizers, muon_momentum_at, newton_schulz
from tests.conftest import SHARED_DIR, _load, _require
from tests.train.recorded_batches import RecordedBatches
from tests.train.test_compile import context, loss_and_grads, perturbed_model
from tests.train.test_loop import one_thread  # noqa: F401  (autouse: one thread, as for the other tiny models)

GOLDEN = SHARED_DIR / "golden" / "golden_frontier_tiny.pt"
# Every frontier option at micro size: looping 1..1, lanes from layer 3, sparse gate, modded SmearGate.
MICRO_FRONTIER = ModelConfig(vocab_size=64, num_layers=4, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                             rope_dims=8, rope_train_seq_len=16, xsa_last_n=4, num_loops=1, loop_start=1, loop_end=1,
                             qk_gain_init=5.0, rope_ntk_scaling=False, parallel_start_layer=3, attn_gate="sparse",
                             attn_gate_scale=0.5, gate_window=12, smear_gate="modded")
MICRO_TRAIN = TrainConfig(iterations=4, max_wallclock_seconds=0, warmup_steps=1, enable_looping_at=0.5,
                          train_batch_tokens=2 * 64, train_seq_len=16, grad_accum_steps=2, loader="packed",
                          muon_momentum_warmup_steps=3, ema_decay=0.9, train_log_every=1, min_lr=0.1,
                          warmdown_frac=0.85, muon_ns_coeffs="polar_express", muon_bf16=True, grad_clip_norm=0.3)


@pytest.fixture(scope="module")
def golden() -> dict:
    return _load(_require(GOLDEN))


def bank_slices(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The record's 3-D bank as the separate matrices pgolf keeps, the 2-D ones as they are."""
    return [matrix for t in tensors for matrix in (t if t.ndim == 3 else [t])]


# ---------------------------------------------------------------- Muon


def test_polar_express_coefficients_are_the_records(golden):
    assert [list(t) for t in POLAR_EXPRESS_COEFFS] == golden["muon"]["pe_coeffs"]


def test_polar_express_newton_schulz_is_the_records_bit_for_bit(golden):
    for case in golden["muon"]["newton_schulz"]:
        for steps in (5, 3, 7):  # 7 steps = 5: the tuples are never repeated
            ours = torch.stack([newton_schulz(m, steps, "polar_express") for m in bank_slices([case["G"]])])
            assert torch.equal(ours, case[f"out_steps{steps}"].reshape(ours.shape)), (tuple(case["G"].shape), steps)


def test_frontier_muon_steps_are_the_records_bit_for_bit(golden):
    ref = golden["muon"]
    params = [torch.nn.Parameter(w.clone()) for w in bank_slices(ref["before"])]
    muon = MuonEqR(params, lr=ref["lr_per_step"][0], momentum=ref["momentum_per_step"][0],
                   backend_steps=ref["backend_steps"], weight_decay=ref["weight_decay"],
                   row_normalize=ref["row_normalize"], ns_coeffs="polar_express", bf16=True)
    for step, (grads, after) in enumerate(zip(ref["grads"], ref["after"], strict=True)):
        for group in muon.param_groups:
            group["lr"], group["momentum"] = ref["lr_per_step"][step], ref["momentum_per_step"][step]
        for p, g in zip(params, bank_slices(grads), strict=True):
            p.grad = g.clone()
        muon.step()
        assert all(torch.equal(p.detach(), a) for p, a in zip(params, bank_slices(after), strict=True)), step
    assert {p.dtype for p in params} == {torch.float32}
    assert {muon.state[p]["momentum_buffer"].dtype for p in params} == {torch.bfloat16}


def test_momentum_warmup_is_the_records(golden):
    cfg = TrainConfig(muon_momentum_warmup_start=0.92, muon_momentum=0.97, muon_momentum_warmup_steps=1500)
    assert [muon_momentum_at(step, cfg) for step in (0, 750, 1500)] == pytest.approx(golden["muon"]["momentum_per_step"])
    assert muon_momentum_at(4000, cfg) == 0.97


def test_schedule_with_min_lr_is_the_records(golden):
    ref = golden["schedule"]
    cfg = TrainConfig(warmdown_frac=ref["warmdown_frac"], min_lr=ref["min_lr"], max_wallclock_seconds=600.0,
                      gptq_reserve_seconds=0.5)
    assert [lr_scale(f, cfg) for f in ref["fracs"]] == ref["lr_mul"]
    assert [training_fraction(r["step"], r["elapsed_ms"] / 1000, cfg) for r in ref["training_frac"]] == \
        [r["frac"] for r in ref["training_frac"]]
    by_step = TrainConfig(max_wallclock_seconds=0.0, iterations=20000)
    assert [training_fraction(r["step"], 0.0, by_step) for r in ref["training_frac_no_wallclock"]] == \
        [r["frac"] for r in ref["training_frac_no_wallclock"]]


def test_frontier_tensors_join_the_control_group():
    model = GPT(MICRO_FRONTIER)
    optimizers = build_optimizers(model, MICRO_TRAIN)
    _, muon, control = optimizers.all
    names = {id(p): name for name, p in model.named_parameters()}
    control_names = {names[id(p)] for p in control.param_groups[0]["params"]}
    assert {"parallel_post_lambdas", "parallel_resid_lambdas", "smear_gate.weight", "smear_lambda",
            "blocks.0.attn.attn_gate_w"} <= control_names
    muon_names = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert muon_names == {n for n in names.values() if n.startswith("blocks.") and n.endswith(".weight")}
    assert muon.param_groups[0]["ns_coeffs"] == "polar_express" and muon.param_groups[0]["bf16"]


# ---------------------------------------------------------------- the trainer on packed rows


def packed_batches(steps: int) -> RecordedBatches:
    """Rows of 64 tokens with documents starting at 0, 20 and 41 (segments of at most 16)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps * MICRO_TRAIN.grad_accum_steps):
        span = torch.randint(2, MICRO_FRONTIER.vocab_size, (65,), generator=generator)
        span[[0, 20, 41]] = BOS_ID
        batches.append((span[None, :-1], span[None, 1:], row_cu_seqlens(span[:-1], MICRO_TRAIN.train_seq_len)))
    return RecordedBatches(batches, MICRO_TRAIN.grad_accum_steps)


def perturbed_frontier(seed: int = 0) -> GPT:
    return perturbed_model(seed, MICRO_FRONTIER)


@pytest.mark.slow  # two fullgraph compiles with backward: about 2 minutes on 2 cores
def test_compiled_training_step_on_packed_rows_matches_eager():
    """The trainer's compiled graph (fullgraph) with cu_seqlens, looping off and on, against eager."""
    model = perturbed_frontier()
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    inputs, targets, cu_seqlens = packed_batches(1).micro_batches(0)[0]

    def step(runner):
        return loss_and_grads(model, lambda x, y: runner(x, y, cu_seqlens=cu_seqlens, max_seqlen=16), inputs, targets)

    for looping in (False, True):
        model.looping_active = looping
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = step(model), step(compiled)
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5), f"looping {looping}"
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"looping {looping}: {name}")


def test_training_on_packed_rows_learns_and_local_clipping_equals_global_on_one_rank():
    cfg = dataclasses.replace(MICRO_TRAIN, iterations=6, warmup_steps=0, compile=False, device="cpu")
    runs = {scope: train(perturbed_frontier(), dataclasses.replace(cfg, grad_clip_scope=scope), packed_batches(6),
                         context("cpu"), progress=False) for scope in ("global", "local")}
    assert runs["local"].losses == runs["global"].losses
    assert all(torch.equal(runs["local"].ema_state[n], t) for n, t in runs["global"].ema_state.items())
    assert [row["looping"] for row in runs["global"].history] == [0, 0, 0, 1, 1, 1]
    assert runs["global"].tokens_per_step == 2 * 64
