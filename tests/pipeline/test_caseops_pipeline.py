"""The micro preset on CaseOps text (``tokenize.text_transform: caseops``), every stage end to end.

Each stage runs through ``pgolf.cli.main`` in a temporary working directory
(``run_micro_stages`` of tests/test_reliability.py), then the exported ``train_gpt.py`` runs in a
folder holding only the challenge's data layout. Every score must divide by the byte sidecar's bytes, and the validation
byte total is compared with the plain micro preset's on the same documents.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm

from pgolf.artifact.load import artifact_model
from pgolf.config import TTTConfig
from pgolf.data.accounting import load_validation_stream, lookup_stream
from pgolf.data.corpus import embedded_documents
from pgolf.data.tokenizer import byte_tables
from pgolf.eval.ttt import run_ttt
from tests.test_reliability import DATASET, STAGES, TOKENIZER, run_micro_stages

pytestmark = pytest.mark.slow



def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "out" / stage / "metrics.json").read_text())


@pytest.fixture(scope="module")
def caseops_run(tmp_path_factory) -> Path:
    """The micro preset with CaseOps text, every stage (TTT on, export too), in a fresh working directory."""
    changes = {"text_transform: none": "text_transform: caseops", "  enabled: false": "  enabled: true"}
    return run_micro_stages(tmp_path_factory.mktemp("caseops-micro"), [*STAGES, ["ttt"], ["export"]], changes)


@pytest.fixture(scope="module")
def plain_tokenized(tmp_path_factory) -> Path:
    """The plain micro preset's tokenize stage: the same documents, the lookup-table rule."""
    return run_micro_stages(tmp_path_factory.mktemp("plain-micro"), [["tokenize"]])


def manifest(root: Path) -> dict:
    return json.loads((root / DATASET / "manifest.json").read_text())


def test_every_stage_scores_with_the_sidecars_bytes(caseops_run):
    info = manifest(caseops_run)
    assert info["text_transform"] == "caseops" and info["sidecar"]["files"] == ["fineweb_val_bytes_000000.bin"]
    evaluated, prequant, ttt = (metrics(caseops_run, stage) for stage in ("evaluate", "prequant", "ttt"))
    seq_len = 64  # evaluate.eval_seq_len = ttt.seq_len of the preset
    stream = load_validation_stream(caseops_run / DATASET, caseops_run / TOKENIZER, 1024, seq_len, 4096)
    assert stream.rule == "byte sidecar"
    assert evaluated["val_bytes"] == prequant["val_bytes"] == stream.total_bytes()
    assert set(evaluated["quantization_tax"]) == {"val_bpb", "sliding_val_bpb"}  # same bytes: the tax is made
    whole = load_validation_stream(caseops_run / DATASET, caseops_run / TOKENIZER, 1024, seq_len)
    assert ttt["enabled"] and ttt["bytes"] == whole.total_bytes() and ttt["tokens"] == whole.tokens.numel() - 1
    # the pitfall the sidecar avoids: this tokenizer's lookup tables count marker bytes and would inflate the total
    tables = lookup_stream(stream.tokens, byte_tables(caseops_run / TOKENIZER, 1024))
    assert tables.total_bytes() > stream.total_bytes()
    assert (caseops_run / "out" / "export" / "submission.json").is_file()


@pytest.mark.parametrize("method", ["sgd_all", "adamw_tail", "lora_doc", "phased"])
def test_every_ttt_method_counts_the_sidecars_bytes(caseops_run, method):
    stream = load_validation_stream(caseops_run / DATASET, caseops_run / TOKENIZER, 1024, 64, 1025)
    model = artifact_model(caseops_run / "out" / "compress" / "artifact.ptz", "cpu")
    model.looping_active = True
    cfg = TTTConfig(enabled=True, method=method, seq_len=64, stride=32, chunk_tokens=256, epochs=1, batch_seqs=4,
                    lora_rank=2, lora_chunk_tokens=32, lora_batch_docs=4, phase_prefix_docs=4, phase_count=1,
                    phase_chunk_tokens=256, device="cpu", compile=False)
    result = run_ttt(model, stream, cfg, stream.tokens.device)
    assert result.bytes == stream.total_bytes() and result.tokens == stream.tokens.numel() - 1


def test_the_exported_script_scores_with_the_sidecar(caseops_run, tmp_path):
    """The challenge's data layout plus the sidecar: the script's scores and bytes are the pipeline's."""
    (tmp_path / "data" / "tokenizers").mkdir(parents=True)
    shutil.copytree(caseops_run / DATASET, tmp_path / DATASET)
    (tmp_path / DATASET / "manifest.json").unlink()  # the challenge's layout: shards, sidecar, tokenizer only
    shutil.copy(caseops_run / TOKENIZER, tmp_path / TOKENIZER)
    shutil.copy(caseops_run / "out" / "export" / "train_gpt.py", tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_STAGE", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["val_bytes"] == metrics(caseops_run, "evaluate")["val_bytes"]
    assert final["quantized"] == metrics(caseops_run, "evaluate")["quantized"]
    for sidecar in (tmp_path / DATASET).glob("fineweb_val_bytes_*.bin"):
        sidecar.unlink()  # without it the script refuses rather than count the lookup tables' bytes
    done = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2
    assert re.search(r"fineweb_val_bytes_000000.bin: byte sidecar not found, but .* holds CaseOps markers",
                     done.stderr)


def normalised(text: str) -> str:
    """What SentencePiece's nmt_nfkc normaliser keeps of a text: NFKC, whitespace runs as one space, ends stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def test_the_validation_byte_total_differs_from_the_plain_presets_by_what_the_normaliser_drops(
        caseops_run, plain_tokenized):
    """Same 100 validation documents. The sidecar counts their original bytes (less whitespace at their ends, which
    no piece covers: none here); the plain lookup tables count the normalised text, whose whitespace runs the
    normaliser collapsed (docs/BYTES.md). The difference is exactly that, document by document."""
    caseops, plain = manifest(caseops_run)["byte_check"], manifest(plain_tokenized)["byte_check"]
    texts = list(itertools.islice(embedded_documents(), caseops["documents"]))
    assert caseops["documents"] == plain["documents"] == 100
    assert caseops["val_bytes"] == sum(len(t.encode("utf-8")) for t in texts) - caseops["uncovered_bytes"]
    assert caseops["uncovered_bytes"] == sum(len(t.encode("utf-8")) - len(t.strip().encode("utf-8")) for t in texts)
    assert plain["val_bytes"] == sum(len(normalised(t).encode("utf-8")) for t in texts)
    dropped = sum(len(t.strip().encode("utf-8")) - len(normalised(t).encode("utf-8")) for t in texts)
    assert caseops["val_bytes"] - plain["val_bytes"] == dropped > 0
    sp = spm.SentencePieceProcessor(model_file=str(plain_tokenized / TOKENIZER))
    assert all(sp.normalize(t).replace("\u2581", " ") == normalised(t) for t in texts)  # the normaliser's own word

