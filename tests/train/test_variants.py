"""The variants' training options: QAT that changes the compiled graph, #576's warm-down by iterations, SWA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.config import ConfigError, ModelConfig, TrainConfig
from pgolf.model.gpt import GPT, CastedLinear, FakeQuant
from pgolf.train.loop import Trainer, schedule_scale, train, warmdown_iters_scale
from tests.model.test_variants import noisy
from tests.train.test_loop import CPU, TINY_TRAIN, random_batches

QAT_MODEL = ModelConfig(vocab_size=64, num_layers=2, model_dim=16, embedding_dim=16, num_heads=2, num_kv_heads=1,
                        rope_dims=4, rope_train_seq_len=16, xsa_last_n=2, num_loops=0, bigram_vocab_size=32,
                        bigram_dim=8, smear_gate=True, ve_layers=[1], ve_dim=4)


def noisy_model(cfg: ModelConfig = QAT_MODEL) -> GPT:
    return noisy(cfg).train()


def qat_outputs(backend: str) -> dict[str, torch.Tensor]:
    """The compiled training loss (and a weight's gradient) before and after QAT turns on, and the eager ones."""
    model = noisy_model()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    weight = model.blocks[0].mlp.fc.weight

    def loss_and_grad(runner) -> tuple[torch.Tensor, torch.Tensor]:
        weight.grad = None
        loss = runner(x, y)
        loss.backward()
        return loss.detach(), weight.grad.clone()

    out = {}
    out["compiled_off"], out["grad_compiled_off"] = loss_and_grad(compiled)
    model.set_fake_quant(FakeQuant(clip_range=15, quantile=0.9995))
    out["compiled_on"], out["grad_compiled_on"] = loss_and_grad(compiled)
    out["eager_on"], out["grad_eager_on"] = loss_and_grad(model)
    model.set_fake_quant(None)
    out["eager_off"], out["grad_eager_off"] = loss_and_grad(model)
    return out


def check_qat_changes_the_compiled_graph(out: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(out["compiled_off"], out["eager_off"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["compiled_on"], out["eager_on"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["grad_compiled_on"], out["grad_eager_on"], rtol=1e-4, atol=1e-6)
    # PR #576's switch, folded away at the first trace, would leave compiled_on == compiled_off.
    assert abs(float(out["compiled_on"] - out["eager_off"])) > 1e-4
    assert not torch.allclose(out["grad_compiled_on"], out["grad_eager_off"], rtol=1e-3, atol=1e-6)


def test_qat_switch_changes_the_compiled_graph():
    torch._dynamo.reset()
    check_qat_changes_the_compiled_graph(qat_outputs("aot_eager"))


@pytest.mark.slow
def test_qat_switch_changes_the_inductor_graph():
    # The trainer's own compile (inductor, fullgraph): about two minutes of compiling on a busy 2-core CPU.
    torch._dynamo.reset()
    check_qat_changes_the_compiled_graph(qat_outputs("inductor"))


def test_fake_quant_is_identity_in_gradient_and_grid_valued():
    layer = CastedLinear(32, 8, bias=False)
    layer.fake_quant = FakeQuant(clip_range=15, quantile=0.9995)
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(8, 32))  # straight-through: d/dW of x W^T
    grid = layer.fake_quant(layer.weight)  # [8, 32]
    scale = (torch.quantile(layer.weight.detach().abs(), 0.9995, dim=1) / 15).clamp_min(1 / 15)[:, None]
    codes = grid / scale
    torch.testing.assert_close(codes, codes.round())
    assert codes.min() >= -16 and codes.max() <= 15
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight.T)  # QAT acts in training mode only


def test_trainer_turns_qat_on_below_the_threshold():
    # By step with warmdown_frac 0.5 over 6 steps: scales 1, 1, 1, 1, 2/3, 1/3 -> below 0.5 first at step 5.
    cfg = dataclasses.replace(TINY_TRAIN, warmdown_frac=0.5, late_qat_threshold=0.5)
    model = noisy_model()
    seen = []
    result = train(model, cfg, random_batches(6), CPU, progress=False,
                   on_step=lambda step: seen.append(model.blocks[0].attn.c_q.fake_quant is not None))
    assert result.qat_step == 5
    assert seen == [False] * 5 + [True]


def test_warmdown_by_iterations():
    by_step = dataclasses.replace(TINY_TRAIN, iterations=100, warmdown_iters=40, max_wallclock_seconds=0)
    assert warmdown_iters_scale(59, 0.0, by_step) == 1.0
    assert warmdown_iters_scale(60, 0.0, by_step) == 1.0  # (100 - 60) / 40
    assert warmdown_iters_scale(80, 0.0, by_step) == pytest.approx(0.5)
    timed = dataclasses.replace(by_step, max_wallclock_seconds=112.0, gptq_reserve_seconds=12.0)  # 100 s budget
    # 50 steps in 50 s: 1 s a step, so the warm-down spans 40 s; 50 s remain -> 1; at 80 s, 20 s remain -> 0.5.
    assert warmdown_iters_scale(50, 50.0, timed) == 1.0
    assert warmdown_iters_scale(80, 80.0, timed) == pytest.approx(0.5)
    assert schedule_scale(80, 80.0, timed) == pytest.approx(0.5)
    assert schedule_scale(80, 80.0, dataclasses.replace(timed, warmdown_iters=0)) != pytest.approx(0.5)


def test_swa_averages_the_snapshots_below_the_threshold():
    cfg = dataclasses.replace(TINY_TRAIN, warmdown_frac=0.5, swa_every=1, swa_threshold=0.9, final_weights="swa")
    model = noisy_model()
    snapshots = {}
    result = train(model, cfg, random_batches(6), CPU, progress=False,
                   on_step=lambda step: snapshots.__setitem__(step, {k: v.clone() for k, v in model.state_dict().items()}))
    # lr scales of steps 0..5: 1, 1, 1, 1, 2/3, 1/3: as PR #576, a step whose scale is below the threshold adds
    # the weights it leaves (after steps 5 and 6 here).
    for name, value in result.swa_state.items():
        torch.testing.assert_close(value, (snapshots[5][name] + snapshots[6][name]) / 2)
    assert result.final_state is result.swa_state


def test_final_weights_rule_is_declared():
    with pytest.raises(ConfigError, match="swa_every"):
        TrainConfig(final_weights="swa")
    with pytest.raises(ConfigError, match="final_weights"):
        TrainConfig(final_weights="best_on_validation")


def test_qat_is_restored_on_resume(tmp_path):
    cfg = dataclasses.replace(TINY_TRAIN, warmdown_frac=0.5, late_qat_threshold=0.5, checkpoint_every=1)
    model = noisy_model()
    trainer = Trainer(model, cfg, random_batches(6), CPU, tmp_path, progress=False)
    trainer.run()
    resumed = Trainer(noisy_model(), cfg, random_batches(6), CPU, tmp_path, progress=False)
    assert resumed.resume() and resumed.qat_step == 5
    assert resumed.model.blocks[0].mlp.fc.fake_quant == FakeQuant(15, 0.9995)
