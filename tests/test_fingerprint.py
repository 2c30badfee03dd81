"""Run fingerprints: the data a run read (published or made by the pipeline) and the environment it ran in."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import fingerprint
from pgolf.data.accounting import load_validation_stream
from pgolf.data.download import record_download
from pgolf.data.shards import MANIFEST_NAME, file_sha256, read_header, write_shard
from pgolf.fingerprint import coder_fingerprint, data_fingerprint, environment, log_lines
from tests.conftest import write_manifest

ASSETS = Path(__file__).resolve().parent / "assets"
DATASET = "fineweb10B_sp1024"
REVISION = "c0ffee" * 6 + "abcd"
DOCS_SHA256 = "d0" * 32


def shards(dataset: Path) -> None:
    """One validation and three training shards of random documents (BOS-separated)."""
    rng = np.random.default_rng(0)
    dataset.mkdir(parents=True)
    for split, count in (("val", 1), ("train", 3)):
        for index in range(count):
            docs = [np.concatenate([[1], rng.integers(2, 1024, 200)]) for _ in range(4)]
            write_shard(dataset / f"fineweb_{split}_{index:06d}.bin", np.concatenate(docs))


@pytest.fixture
def published(tmp_path) -> Path:
    """DEST as `pgolf download` leaves it: shards, tokenizer, the repository's manifest and download.json."""
    dest = tmp_path / "downloads"
    shards(dest / "datasets" / DATASET)
    (dest / "tokenizers").mkdir()
    shutil.copy(ASSETS / "fineweb_1024_bpe.model", dest / "tokenizers")
    (dest / MANIFEST_NAME).write_text(json.dumps({"datasets": [{"name": DATASET}],
                                                  "docs_meta": {"docs_sha256": DOCS_SHA256}}))
    files = sorted((dest / "datasets" / DATASET).glob("*.bin")) + [dest / "tokenizers" / "fineweb_1024_bpe.model"]
    record_download(dest, DATASET, {"repo_id": "org/parameter-golf", "revision": REVISION, "variant": "sp1024",
                                    "remote_root": "datasets", "files": {
                                        str(p.relative_to(dest)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                                        for p in files}})
    return dest


def read(dataset: Path, tokenizer: Path) -> dict:
    return data_fingerprint(dataset, tokenizer, load_validation_stream(dataset, tokenizer, 1024, 64))


def test_published_data_is_named_by_repository_revision_and_hashes(published):
    dataset, tokenizer = published / "datasets" / DATASET, published / "tokenizers" / "fineweb_1024_bpe.model"
    data = read(dataset, tokenizer)
    stream = load_validation_stream(dataset, tokenizer, 1024, 64)
    assert data["published"]["repo_id"] == "org/parameter-golf" and data["published"]["revision"] == REVISION
    assert data["published"]["files"][f"datasets/{DATASET}/fineweb_train_000002.bin"]["sha256"] == file_sha256(
        dataset / "fineweb_train_000002.bin")
    assert data["val_files_match_published"] is True
    assert data["repository_manifest_sha256"] == file_sha256(published / MANIFEST_NAME)
    assert data["docs_sha256"] == DOCS_SHA256 and data["manifest_sha256"] is None  # no pgolf manifest here
    assert data["train_shards"] == 3
    assert data["train_shard_tokens"] == sum(read_header(p) for p in dataset.glob("fineweb_train_*.bin"))
    assert data["val_tokens"] == stream.tokens.numel() - 1 and data["val_bytes"] == stream.total_bytes()
    assert data["val_files_sha256"] == {"fineweb_val_000000.bin": file_sha256(dataset / "fineweb_val_000000.bin")}
    assert data["tokenizer_sha256"] == file_sha256(tokenizer) and data["byte_accounting"] == "lookup tables"

    lines = log_lines(data, environment(torch.device("cpu"), 1))
    assert "train_shards: 3" in lines and f"val_tokens: {data['val_tokens']}" in lines  # as the records print them
    assert any(line.startswith(f"published: org/parameter-golf@{REVISION} (5 files)") for line in lines)


def test_validation_data_changed_since_the_download_is_flagged(published):
    dataset = published / "datasets" / DATASET
    tokens = np.fromfile(dataset / "fineweb_val_000000.bin", dtype="<u2")[512:].copy()  # past the 1024-byte header
    tokens[-1] = 2 if tokens[-1] != 2 else 3  # one token of the last document
    write_shard(dataset / "fineweb_val_000000.bin", tokens)
    assert read(dataset, published / "tokenizers" / "fineweb_1024_bpe.model")["val_files_match_published"] is False


def test_a_pipeline_dataset_names_its_documents_and_its_published_source(published, tmp_path):
    tokenizer = ASSETS / "fineweb_1024_bpe.model"
    made = tmp_path / "data" / "datasets" / DATASET  # the tokenize stage's, from a documents file
    shards(made)
    write_manifest(made, 1024, tokenizer)
    manifest = json.loads((made / MANIFEST_NAME).read_text()) | {"input": {"sha256": "ab" * 32, "documents": 12}}
    (made / MANIFEST_NAME).write_text(json.dumps(manifest))
    data = read(made, tokenizer)
    assert data["docs_sha256"] == "ab" * 32 and data["manifest_sha256"] == file_sha256(made / MANIFEST_NAME)
    assert data["published"] is None and data["val_files_match_published"] is None

    manifest["input"] = {"shards_path": str(published / "datasets" / DATASET), "sha256": {}}  # imported shards
    (made / MANIFEST_NAME).write_text(json.dumps(manifest))
    data = read(made, tokenizer)
    assert data["published"]["revision"] == REVISION and data["docs_sha256"] == DOCS_SHA256


def test_the_environment_names_versions_kernels_and_the_coder():
    env = environment(torch.device("cpu"), 2, "brotli")
    assert (env["python"], env["torch"], env["cuda"]) == (platform.python_version(), torch.__version__,
                                                          torch.version.cuda)
    assert env["processes"] == 2 and env["gpu"] is None and env["gpu_count"] == 0
    assert env["attention"]["causal"] == f"sdpa (torch {torch.__version__})"  # what the CPU dispatches to
    assert env["coder"] == f"brotli: brotli {metadata.version('brotli')}" and env["system_binaries"] == {}
    assert coder_fingerprint("zstd")[0] == f"zstd: zstandard {metadata.version('zstandard')}"
    with pytest.raises(ValueError, match="compress.compressor=lrzip: pgolf.fingerprint.CODERS does not say"):
        coder_fingerprint("lrzip")


def test_a_coder_that_runs_a_system_binary_records_its_version(monkeypatch):
    binary = Path(sys.executable)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setitem(fingerprint.CODERS, "brotli", ("binary", binary.name))
    coder, binaries = coder_fingerprint("brotli")
    found = shutil.which(binary.name)
    assert binaries == {binary.name: f"{found}: Python {platform.python_version()}"} and coder.startswith("brotli: ")
    monkeypatch.setitem(fingerprint.CODERS, "brotli", ("binary", "no-such-coder-binary"))
    with pytest.raises(FileNotFoundError, match="no-such-coder-binary: the system binary the artifact's coder runs"):
        coder_fingerprint("brotli")
