"""The training loop: golden trajectory, schedule, looping, warm-up, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.config import ModelConfig, TrainConfig
from pgolf.data.shards import write_shard
from pgolf.distributed import DistContext
from pgolf.model.files import build_model, load_model
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace
from pgolf.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pgolf.train.loop import cast_mixed_precision, lr_scale, train, training_fraction
from tests.conftest import model_config_from_reference, train_config_from_reference, write_manifest
from tests.train.recorded_batches import RecordedBatches

PIPELINE = Workspace.pipeline()  # the stage as DVC runs it

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_MODEL = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                         rope_dims=8, rope_train_seq_len=16, xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1)
TINY_TRAIN = TrainConfig(iterations=6, max_wallclock_seconds=0, warmup_steps=0, train_batch_tokens=4 * 4 * 16,
                         train_seq_len=16, grad_accum_steps=4, muon_momentum_warmup_steps=3, ema_decay=0.9,
                         device="cpu", compile=False, train_log_every=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_batches(steps: int, per_step: int = 4, seed: int = 0) -> RecordedBatches:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (steps * per_step, 4, 17), generator=generator)
    return RecordedBatches([(t[:, :-1], t[:, 1:]) for t in tokens], per_step)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY_MODEL)


def test_training_matches_golden_trajectory(golden_trajectory):
    # both sets: losses within 3e-4, every tensor within 0.06 of its distance travelled
    run = golden_trajectory
    model = GPT(model_config_from_reference(run["config"]))
    model.load_state_dict(run["init_state_dict"])
    cfg = train_config_from_reference(run["config"], device="cpu", compile=False,
                                      grad_accum_steps=run["grad_accum_steps"])
    batches = RecordedBatches([(b[0], b[1]) for b in run["train_batches"]], cfg.grad_accum_steps)
    result = train(model, cfg, batches, CPU, progress=False)
    assert result.steps == cfg.iterations == len(run["train_losses"])
    for step, (ours, golden) in enumerate(zip(result.losses, run["train_losses"], strict=True)):
        assert abs(ours - golden) <= 3e-4, f"step {step}: loss {ours} vs golden {golden}"
    for name, final in run["final_state_dict"].items():
        init = run["init_state_dict"][name].float()
        error = (result.ema_state[name].float() - final.float()).norm() / (final.float() - init).norm()
        assert error <= 0.06, f"{name}: relative error {error:.4f}"


def test_schedule_by_step_and_by_wallclock():
    by_step = TrainConfig(iterations=100, max_wallclock_seconds=0, warmdown_frac=0.5, min_lr=0.0)
    assert training_fraction(25, 999.0, by_step) == 0.25
    assert [lr_scale(f, by_step) for f in (0.0, 0.49, 0.5, 0.75, 1.0)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    timed = TrainConfig(max_wallclock_seconds=600, gptq_reserve_seconds=12, warmdown_frac=0.667, min_lr=0.1)
    assert training_fraction(3, 294.0, timed) == pytest.approx(0.5)
    assert lr_scale(0.99, timed) == pytest.approx(0.1)  # floored at min_lr
    assert lr_scale(0.9, timed) == pytest.approx(0.1 / 0.667)


def test_looping_switches_on_at_the_configured_fraction():
    cfg = dataclasses.replace(TINY_TRAIN, iterations=4, enable_looping_at=0.5)
    result = train(tiny_model(), cfg, random_batches(4), CPU, progress=False)
    assert [row["looping"] for row in result.history] == [0, 0, 1, 1]  # on before step index 2 (2/4 = 0.5)
    assert [row["lr_scale"] for row in result.history][:2] == [1.0, 1.0]
    assert result.history[-1]["lr_scale"] == pytest.approx((1 - 3 / 4) / TINY_TRAIN.warmdown_frac)


def test_wallclock_budget_stops_the_run():
    cfg = dataclasses.replace(TINY_TRAIN, iterations=1000, max_wallclock_seconds=1e-3, gptq_reserve_seconds=0.0)
    result = train(tiny_model(), cfg, random_batches(2), CPU, progress=False)
    assert result.stopped_by_wallclock and result.steps == 1
    assert result.history[-1]["step"] == 1  # the last step is always logged


def test_validation_every_n_steps_and_at_the_end():
    calls = []

    def validate(model):
        calls.append(model.looping_active)
        model.eval()
        return 4.0, 1.5

    cfg = dataclasses.replace(TINY_TRAIN, iterations=5, val_loss_every=2)
    model = tiny_model()
    result = train(model, cfg, random_batches(5), CPU, progress=False, validate=validate)
    assert [row["step"] for row in result.val_history] == [2, 4, 5]
    assert result.val_history[-1] == {"step": 5, "val_loss": 4.0, "val_bpb": 1.5}
    assert model.training
    with pytest.raises(ValueError, match="val_loss_every"):
        train(tiny_model(), cfg, random_batches(5), CPU, progress=False)


def test_ema_follows_the_weights():
    cfg = dataclasses.replace(TINY_TRAIN, iterations=2, ema_decay=0.0)
    model = tiny_model()
    result = train(model, cfg, random_batches(2), CPU, progress=False)
    for name, tensor in model.state_dict().items():  # decay 0: the EMA is the last weights
        assert torch.equal(result.ema_state[name], tensor)


def test_compile_warmup_is_undone():
    plain = train(tiny_model(), TINY_TRAIN, random_batches(6), CPU, progress=False)
    warmed = train(tiny_model(), dataclasses.replace(TINY_TRAIN, warmup_steps=2), random_batches(6), CPU,
                   progress=False)
    assert warmed.losses == plain.losses
    assert all(torch.equal(warmed.ema_state[n], t) for n, t in plain.ema_state.items())


def test_gpu_dtype_policy_keeps_only_the_embedding_in_bf16():
    dtypes = {name: p.dtype for name, p in cast_mixed_precision(tiny_model()).named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}


class Killed(Exception):
    pass


def kill_at(step_to_kill: int):
    def on_step(step: int) -> None:
        if step == step_to_kill:
            raise Killed

    return on_step


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    cfg = dataclasses.replace(TINY_TRAIN, checkpoint_every=2)
    uninterrupted = train(tiny_model(), cfg, random_batches(6), CPU, progress=False)
    with pytest.raises(Killed):
        train(tiny_model(), cfg, random_batches(6), CPU, tmp_path, progress=False, on_step=kill_at(5))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 4
    fresh_model = tiny_model(seed=123)  # other initial weights: everything must come from the checkpoint
    resumed = train(fresh_model, cfg, random_batches(6), CPU, tmp_path, progress=False)
    assert resumed.losses == uninterrupted.losses
    assert resumed.history == [dict(r, elapsed_s=s["elapsed_s"], tokens_per_s=s["tokens_per_s"])
                               for r, s in zip(uninterrupted.history, resumed.history)]
    for name, tensor in uninterrupted.ema_state.items():
        assert torch.equal(resumed.ema_state[name], tensor), name


def test_resume_refuses_changed_settings_and_bad_files(tmp_path):
    cfg = dataclasses.replace(TINY_TRAIN, iterations=2, checkpoint_every=1)
    train(tiny_model(), cfg, random_batches(2), CPU, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"train.matrix_lr: 0.02 -> 0.03"):
        train(tiny_model(), dataclasses.replace(cfg, matrix_lr=0.03), random_batches(2), CPU, tmp_path,
              progress=False)
    with pytest.raises(ValueError, match="recorded batches differ"):
        train(tiny_model(), cfg, random_batches(3), CPU, tmp_path, progress=False)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        train(tiny_model(), cfg, random_batches(2), CPU, tmp_path, progress=False)


def write_dataset(root, vocab_size: int, manifest_vocab: int | None = None):
    dataset = root / "data" / "datasets" / f"fineweb10B_sp{vocab_size}"
    dataset.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    write_shard(dataset / "fineweb_train_000000.bin", torch.randint(0, vocab_size, (5000,), generator=generator))
    write_shard(dataset / "fineweb_val_000000.bin", torch.randint(0, vocab_size, (600,), generator=generator))
    tokenizer = root / "data" / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_bytes(b"stands in for the tokenizer: training reads only its hash from the manifest")
    write_manifest(dataset, vocab_size, tokenizer, manifest_vocab)


def stage_params() -> dict:
    return {"tokenize": {}, "model": dataclasses.asdict(TINY_MODEL),
            "train": dataclasses.asdict(dataclasses.replace(TINY_TRAIN, iterations=3, checkpoint_every=1))}


def test_train_stage_writes_model_metrics_and_plots(tmp_path, monkeypatch):
    from stages import train as stage

    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path, TINY_MODEL.vocab_size)
    stage.run(stage_params(), PIPELINE)
    model = build_model(Path(layout.TRAIN_MODEL))
    assert model.config == TINY_MODEL
    metrics = json.loads(Path(layout.TRAIN_METRICS).read_text())
    assert metrics["steps"] == 3 and metrics["tokens"] == 3 * TINY_TRAIN.train_batch_tokens
    assert metrics["model_params"] == sum(p.numel() for p in model.parameters())
    header = Path(layout.TRAIN_CURVE).read_text().splitlines()[0].split(",")
    assert {"step", "train_loss", "lr_scale", "tokens_per_s", "elapsed_s"} <= set(header)
    assert Path(layout.TRAIN_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert not (Path(layout.TRAIN_CHECKPOINTS) / CHECKPOINT_NAME).exists()  # finished: no stale checkpoint


def test_train_stage_refuses_a_dataset_of_another_vocabulary(tmp_path, monkeypatch):
    from stages import train as stage

    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path, TINY_MODEL.vocab_size, manifest_vocab=1024)
    with pytest.raises(ValueError, match="manifest.json: vocab_size 1024, but the model's vocab_size is 64"):
        stage.run(stage_params(), PIPELINE)
    assert not Path(layout.TRAIN_MODEL).exists()


@pytest.mark.slow
def test_killed_stage_resumes_to_the_same_weights(tmp_path):

    params = stage_params()
    params["train"] |= {"iterations": 40, "checkpoint_every": 2, "train_log_every": 20}
    for name in ("killed", "uninterrupted"):
        (tmp_path / name).mkdir()
        write_dataset(tmp_path / name, TINY_MODEL.vocab_size)
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "stages.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    process = subprocess.Popen(command, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / Path(layout.TRAIN_CHECKPOINTS) / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert checkpoint.exists() and not (killed / Path(layout.TRAIN_MODEL)).exists(), "the run was not killed mid-way"
    resumed = subprocess.run(command, cwd=killed, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoints/train/last.pt at step" in resumed.stdout
    done = subprocess.run(command, cwd=tmp_path / "uninterrupted", env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, expected = load_model(tmp_path / "uninterrupted" / Path(layout.TRAIN_MODEL))
    _, got = load_model(killed / Path(layout.TRAIN_MODEL))
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
