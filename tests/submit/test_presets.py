"""The PR #576 and PR #1218 presets: what they set, and every stage run on micro sizes of each."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from pgolf.config import ModelConfig, QuantizeConfig, TrainConfig, load_params, section
from pgolf.pipeline import layout
from stages import bundle, calibrate, compress, evaluate, quantize, tokenize, train
from tests.conftest import REPO_ROOT

PRESETS = REPO_ROOT / "presets"
STAGES = [tokenize, train, calibrate, bundle, quantize, compress, evaluate]
# Micro sizes: the architecture and every option of the preset, at micro.yaml's widths and lengths.
MICRO_MODEL = {"vocab_size": 1024, "num_layers": 4, "model_dim": 32, "embedding_dim": 32, "num_heads": 2,
               "rope_dims": 8, "xsa_last_n": 4, "ve_layers": [2, 3], "ve_dim": 16}
MICRO_KV_HEADS = {"pr576": 2, "pr1218": 1}  # full MHA / GQA, as the presets
MICRO_ROPE_REFERENCE = {"pr576": 32, "pr1218": 64}  # 1024 / 2048 against their 2048 rows: NTK-scaled / not


def preset(name: str) -> dict:
    return load_params(PRESETS / f"{name}.yaml")


def preset_model_config(name: str) -> ModelConfig:
    return section(preset(name), "model", ModelConfig)


def micro_params(name: str) -> dict:
    params = copy.deepcopy(dict(preset(name)))
    micro = load_params(PRESETS / "micro.yaml")
    for key in ("tokenize", "calibrate", "compress", "evaluate"):
        params[key] = dict(micro[key])
    params["model"] |= MICRO_MODEL | {"num_kv_heads": MICRO_KV_HEADS[name],
                                      "rope_train_seq_len": MICRO_ROPE_REFERENCE[name]}
    if params["model"]["bigram_vocab_size"]:
        params["model"] |= {"bigram_vocab_size": 64, "bigram_dim": 16}
    train_sizes = {k: micro["train"][k] for k in ("iterations", "max_wallclock_seconds", "warmup_steps",
                                                  "train_batch_tokens", "train_seq_len", "grad_accum_steps",
                                                  "muon_momentum_warmup_steps", "nproc_per_node", "device",
                                                  "compile", "train_log_every")}
    params["train"] |= train_sizes
    if params["train"]["warmdown_iters"]:
        # lr scales of the 6 steps: 1, 1, 1, 0.75, 0.5, 0.25: QAT (below 0.5) from step 5, SWA after steps 4, 5, 6.
        params["train"] |= {"warmdown_iters": 4, "swa_every": 1, "swa_threshold": 0.8}
    params["quantize"] |= {"passthrough_max_numel": 512, "device": "cpu"}  # so the tables and matrices are quantized
    return params


def test_pr576_preset_sets_the_prs_system():
    params = preset("pr576")
    model, cfg, quant = (section(params, s, c) for s, c in (("model", ModelConfig), ("train", TrainConfig),
                                                            ("quantize", QuantizeConfig)))
    assert (model.vocab_size, model.num_kv_heads, model.mlp_mult, model.mlp_activation) == (1024, 8, 3.5, "relu2")
    assert (model.bigram_vocab_size, model.smear_gate, model.ve_layers, model.skip_gates_enabled) == (8192, True, [9, 10], False)
    assert (model.qk_gain_init, model.rope_train_seq_len, model.num_loops, model.scaled_proj_init) == (1.5, 1024, 0, True)
    assert (cfg.muon_row_normalize, cfg.matrix_lr, cfg.muon_wd, cfg.embed_wd, cfg.adam_wd) == (False, 0.025, 0.04, 0.04, 0.04)
    assert (cfg.warmdown_iters, cfg.late_qat_threshold, cfg.swa_every, cfg.loader) == (3500, 0.5, 50, "sequential")
    assert (quant.matrix_bits, quant.scale_search, quant.gptq_column_order, quant.prune_fraction) == \
        (5, "row_percentiles", "ascending", 0.02)
    assert params["tokenize"]["shards_path"].endswith("sp1024")


def test_pr1218_preset_sets_the_prs_system():
    params = preset("pr1218")
    model, cfg, quant = (section(params, s, c) for s, c in (("model", ModelConfig), ("train", TrainConfig),
                                                            ("quantize", QuantizeConfig)))
    assert (model.vocab_size, model.num_kv_heads, model.num_loops, model.ve_layers, model.bigram_vocab_size) == \
        (4096, 4, 0, [9, 10], 0)
    assert (cfg.muon_row_normalize, cfg.loader, cfg.gptq_reserve_seconds) == (False, "coprime", 10.0)
    assert (quant.matrix_bits, quant.scale_search, quant.table_clip_quantile) == (6, "matrix_percentiles", 0.9999984)
    assert params["tokenize"]["shards_path"].endswith("sp4096")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pr576", "pr1218"])
def test_preset_runs_every_stage_on_micro_sizes(name, tmp_path, monkeypatch):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(micro_params(name), sort_keys=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for stage in STAGES:
        assert stage.main(["--params", str(params_file)]) == 0, stage.__name__
    metrics = json.loads(Path(layout.EVALUATE_METRICS).read_text())
    report = json.loads(Path(layout.QUANTIZE_REPORT).read_text())
    methods = {row["name"]: row["method"] for row in report["tensors"]}
    bits = 5 if name == "pr576" else 6
    assert methods["tok_emb.weight"] == "round int8" and methods["ve_shared.embed.weight"] == "round int8"
    assert methods["blocks.0.mlp.fc.weight"] == f"gptq int{bits}"
    assert all(value == value for value in metrics.values() if isinstance(value, float))  # no NaN
    trained = json.loads(Path(layout.TRAIN_METRICS).read_text())
    if name == "pr576":
        assert (trained["qat_step"], trained["swa_snapshots"]) == (5, 3)
    else:
        assert "qat_step" not in trained and "swa_snapshots" not in trained
