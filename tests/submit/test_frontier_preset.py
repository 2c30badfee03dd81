"""presets/frontier.yaml (PR #1855): what it sets, and every stage run on micro sizes of it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.artifact.compress import COMPRESSORS
from pgolf.artifact.load import load_artifact
from pgolf.artifact.tensors import GroupedTensor
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig, TrainConfig, TTTConfig, load_params, section
from pgolf.model.files import load_model
from pgolf.model.gpt import GPT, count_parameters
from pgolf.pipeline import layout
from stages import bundle, calibrate, compress, evaluate, export, prequant, quantize, tokenize, train, ttt
from tests.submit.test_presets import PRESETS, preset

# Every option of the preset at micro.yaml's widths: looping 1..1, lanes from layer 3 of 4; 4 heads, so that
# the attention gates (4 × 12) are in QuantGate's range.
MICRO_MODEL = {"vocab_size": 1024, "num_layers": 4, "model_dim": 32, "embedding_dim": 32, "num_heads": 4,
               "num_kv_heads": 1, "rope_dims": 8, "rope_train_seq_len": 64, "xsa_last_n": 4, "loop_start": 1,
               "loop_end": 1, "parallel_start_layer": 3}
MICRO_TTT = {"seq_len": 64, "lora_rank": 4, "lora_chunk_tokens": 16, "lora_batch_docs": 8, "phase_prefix_docs": 24,
             "phase_chunk_tokens": 256, "batch_seqs": 4, "nproc_per_node": 1, "device": "cpu", "max_val_tokens": 4096}


def micro_frontier() -> dict:
    params = copy.deepcopy(dict(preset("frontier")))
    micro = load_params(PRESETS / "micro.yaml")
    for key in ("tokenize", "evaluate", "export"):
        params[key] = dict(micro[key])
    params["calibrate"] |= {k: micro["calibrate"][k] for k in ("calibration_batches", "calibration_batch_tokens",
                                                               "seq_len", "device")}
    params["compress"] |= {"code_files": micro["compress"]["code_files"]}
    params["model"] |= MICRO_MODEL
    params["train"] |= {k: micro["train"][k] for k in ("iterations", "max_wallclock_seconds", "warmup_steps",
                                                        "train_batch_tokens", "train_seq_len", "grad_accum_steps",
                                                        "muon_momentum_warmup_steps", "nproc_per_node", "device",
                                                        "compile", "train_log_every")}
    params["quantize"] |= {"passthrough_max_numel": 512, "device": "cpu"}  # so the matrices are quantized
    params["ttt"] |= MICRO_TTT
    return params


def test_frontier_preset_sets_the_records_system():
    params = preset("frontier")
    model, cfg, quant, tta = (section(params, s, c) for s, c in (("model", ModelConfig), ("train", TrainConfig),
                                                                 ("quantize", QuantizeConfig), ("ttt", TTTConfig)))
    # the record's data: CaseOps text, its tokenizer and shards with the byte sidecar (docs/BYTES.md)
    assert params["tokenize"]["text_transform"] == "caseops"
    assert params["tokenize"]["shards_path"].endswith("fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")
    # the record's export (docs/ARTIFACT.md)
    assert (quant.attn_clip_sigmas, quant.mlp_clip_sigmas, quant.embed_bits, quant.embed_clip_sigmas) == \
        (13.0, 11.5, 7, 14.0)
    assert (quant.gate_int8, quant.gate_rule) == (True, "attn_gate_w")
    assert (quant.lqer_mode, quant.lqer_rank, quant.lqer_max_tensors, quant.lqer_group) == ("asym", 4, 3, 64)
    assert section(params, "compress", CompressConfig).compressor == "pergroup"
    assert count_parameters(GPT(model)) == 35_945_671  # the record's logged model_params
    assert (model.loop_start, model.loop_end, model.num_loops, cfg.enable_looping_at) == (3, 5, 2, 0.35)
    assert (model.parallel_start_layer, model.attn_gate, model.smear_gate, model.rope_ntk_scaling) == \
        (8, "sparse", "modded", False)
    assert (cfg.loader, cfg.train_batch_tokens // cfg.grad_accum_steps, cfg.train_seq_len) == ("packed", 98_304, 2048)
    assert (cfg.muon_ns_coeffs, cfg.muon_bf16, cfg.grad_clip_scope, cfg.min_lr) == ("polar_express", True, "local", 0.1)
    # PR #1855: the nine greedy overrides
    assert (quant.mlp_clip_sigmas, quant.embed_clip_sigmas, cfg.warmdown_frac, cfg.beta2, tta.lora_beta2,
            tta.lora_weight_decay, tta.lora_rank, model.attn_gate_scale, tta.phase_prefix_docs) == \
        (11.5, 14.0, 0.85, 0.99, 0.99, 0.5, 80, 0.5, 2500)
    # docs/TTT.md: the adapter scale α/r = 1.8, warm-start A, the record's phase rule and packed rows
    assert (tta.lora_alpha / tta.lora_rank, tta.lora_warm_start_a, tta.lora_draws, tta.lora_beta1) == \
        (1.8, True, "record", 0.0)
    assert (tta.method, tta.phase_count, tta.phase_rule, tta.phase_rows, tta.phase_seq_len or tta.seq_len) == \
        ("phased", 3, "shortest", "packed", 2048)


@pytest.mark.slow
def test_frontier_preset_runs_every_stage_on_micro_sizes(tmp_path, monkeypatch):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(micro_frontier(), sort_keys=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runs = [(tokenize, []), (train, []), (prequant, []), (calibrate, []), (bundle, []),
            (quantize, []), (compress, []), (evaluate, []), (ttt, []), (export, [])]
    for stage, extra in runs:
        assert stage.main(["--params", str(params_file), *extra]) == 0, stage.__name__
    cfg, state = load_model(layout.TRAIN_MODEL)
    assert cfg.smear_gate == "modded" and {"smear_lambda", "parallel_post_lambdas", "blocks.3.attn.attn_gate_w"} <= set(state)
    assert all(torch.isfinite(t).all() for t in state.values())
    report = json.loads(Path(layout.QUANTIZE_REPORT).read_text())
    methods = {row["name"]: row["method"] for row in report["tensors"]}
    assert methods["blocks.0.mlp.fc.weight"] == "gptq int6" and "int8" in methods["blocks.0.attn.attn_gate_w"]
    assert methods["skip_gates"] == "fp16"  # QuantGate as the record has it
    assert sum(row["lqer_rank"] == 4 for row in report["tensors"]) == 3
    artifact = Path(layout.COMPRESS_ARTIFACT).read_bytes()
    assert artifact[:4] == b"PGAZ" and artifact[5] == COMPRESSORS["pergroup"]
    assert any(isinstance(t, GroupedTensor) for t in load_artifact(artifact).tensors.values())  # LQER asym
    assert "apt-get install lrzip" in (Path(layout.EXPORT_DIR) / "README.md").read_text()  # what the folder needs
    for metrics in (layout.PREQUANT_METRICS, layout.EVALUATE_METRICS, layout.TTT_METRICS):
        values = json.loads(Path(metrics).read_text())
        assert not any(math.isnan(v) for v in values.values() if isinstance(v, float)), metrics
    tested = json.loads(Path(layout.TTT_METRICS).read_text())
    assert tested["method"] == "phased" and len(tested["phases"]) == 3
