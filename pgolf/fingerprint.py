"""What a run read and ran on, for its log and its submission.json: the data and the environment.

Reviewers of the challenge accepted or rejected runs by the fingerprints in their logs
(``val_tokens: 47851520``, ``train_shards: 80``): a run on other data, another tokenizer or
another byte count is another experiment. :func:`data_fingerprint` identifies the data a run
read: the sha256 of pgolf's dataset manifest (the tokenize stage's) and of the challenge
repository's manifest, for published data the repository, the revision and every file's
hash as ``pgolf download`` recorded and checked them (``DOWNLOAD_RECORD``), the documents'
sha256 where they are known, the train shards, the validation tokens and bytes, the
tokenizer's sha256 and the byte-accounting rule; the validation files (and their byte
sidecar) and the tokenizer are hashed as the run reads them, and compared with the
published hashes. :func:`environment` names Python, torch, CUDA, cuDNN, the GPUs, the
attention kernels the model dispatches to with their versions, and what the artifact's
coder runs, system binaries included. :func:`log_lines` prints both as ``key: value`` lines.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pgolf import __version__
from pgolf.data.accounting import ValidationStream
from pgolf.data.shards import DOWNLOAD_RECORD, MANIFEST_NAME, SIDECAR, file_sha256, read_header, shard_files
from pgolf.model import gpt

KERNEL_NAMES = {"flash_attn_interface": "FlashAttention-3", "flash_attn": "flash-attn"}
# What each artifact coder runs, so that the version its bytes depend on is on record: a Python distribution,
# the standard library, pgolf's own code, or a system binary (its `--version` line). A coder that runs a
# binary (lrzip) is listed as ("binary", "lrzip").
CODERS = {"brotli": ("distribution", "brotli"), "zstd": ("distribution", "zstandard"), "lzma": ("stdlib", "lzma"),
          "ans": ("pgolf", "pgolf.artifact.ans")}


def data_fingerprint(dataset_dir: Path, tokenizer: Path, stream: ValidationStream) -> dict[str, Any]:
    """The identity of the dataset, its splits as read, the tokenizer and the bytes the scores divide by."""
    train = shard_files(dataset_dir, "train")
    scored = [*shard_files(dataset_dir, "val"), *shard_files(dataset_dir, SIDECAR)]
    identity = dataset_identity(dataset_dir)
    val_hashes = {path.name: file_sha256(path) for path in scored}
    published = (identity["published"] or {}).get("files", {})
    listed = {Path(name).name: entry.get("sha256") for name, entry in published.items()}
    return {
        "dataset": dataset_dir.name, **identity,
        "val_files_match_published": all(listed.get(name) == digest for name, digest in val_hashes.items())
        if published else None,
        "train_shards": len(train), "train_shard_tokens": sum(read_header(path) for path in train),
        "val_tokens": stream.tokens.numel() - 1, "val_bytes": stream.total_bytes(),
        "val_files_sha256": val_hashes,
        "tokenizer": tokenizer.name, "tokenizer_sha256": file_sha256(tokenizer),
        "byte_accounting": stream.rule,
    }


def dataset_identity(dataset_dir: Path) -> dict[str, Any]:
    """Where the shards come from: pgolf's manifest, the repository's manifest and download, the documents.

    Published shards sit in ``DEST/datasets/NAME/`` beside ``DEST/manifest.json`` (the
    repository's) and ``DEST/download.json``; a pipeline dataset made from them names their
    folder in its manifest (``input.shards_path``).
    """
    identity: dict[str, Any] = {"manifest_sha256": None, "repository_manifest_sha256": None, "docs_sha256": None,
                                "published": None}
    source = dataset_dir
    own = dataset_dir / MANIFEST_NAME
    if own.is_file():
        identity["manifest_sha256"] = file_sha256(own)
        given = json.loads(own.read_text(encoding="utf-8")).get("input", {})
        if isinstance(given.get("sha256"), str):  # made from a documents file: its sha256
            identity["docs_sha256"] = given["sha256"]
        if given.get("shards_path") and Path(given["shards_path"]).is_dir():
            source = Path(given["shards_path"])
    root = source.parent.parent
    repository = root / MANIFEST_NAME
    if repository.is_file():
        identity["repository_manifest_sha256"] = file_sha256(repository)
        docs = json.loads(repository.read_text(encoding="utf-8")).get("docs_meta") or {}
        identity["docs_sha256"] = identity["docs_sha256"] or docs.get("docs_sha256")
    record = root / DOWNLOAD_RECORD
    if record.is_file():
        identity["published"] = json.loads(record.read_text(encoding="utf-8")).get(source.name)
    return identity


def environment(device: torch.device, world_size: int, compressor: str | None = None) -> dict[str, Any]:
    """Software and hardware: versions, the GPUs (model and count), attention kernels, the artifact's coder."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "pgolf": __version__, "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device.type, "processes": world_size,
    }
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "gpu_count": world_size,
                 "gpus_visible": torch.cuda.device_count()}
    else:
        info |= {"gpu": None, "gpu_count": 0, "cpu": platform.machine(), "cpu_count": os.cpu_count()}
    info["attention"] = attention_kernels(device)
    info["system_binaries"] = {}
    if compressor is not None:
        info["coder"], info["system_binaries"] = coder_fingerprint(compressor)
    return info


def attention_kernels(device: torch.device) -> dict[str, str]:
    """The kernels the model's attention dispatches to on ``device`` for 16-bit inputs, with versions."""
    sdpa = f"sdpa (torch {torch.__version__})"
    if device.type != "cuda":
        return {"causal": sdpa, "packed": f"{sdpa} with a document mask"}
    backends = [name for name, enabled in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                           ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                           ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                           ("math", torch.backends.cuda.math_sdp_enabled())) if enabled]
    causal = kernel(gpt.FLASH_MODULE) if gpt.FLASH_MODULE else f"{sdpa[:-1]}; backends {', '.join(backends)})"
    packed = f"{kernel('flash_attn_interface')} varlen" if gpt.FLASH_VARLEN is not None \
        else f"flex_attention (torch {torch.__version__})"
    return {"causal": causal, "packed": packed}


def kernel(module: str) -> str:
    """A flash-attention module by name and the version of the distribution that installed it."""
    return f"{KERNEL_NAMES[module]} ({module} {module_version(module)})"


def module_version(module: str) -> str:
    """The version of the installed distribution that provides ``module`` ("unknown" when none says)."""
    for dist in metadata.packages_distributions().get(module, []):
        return f"{dist} {metadata.version(dist)}"
    return "unknown"


def coder_fingerprint(compressor: str) -> tuple[str, dict[str, str]]:
    """What ``compressor`` runs, with its version, and the system binaries among it."""
    if compressor not in CODERS:
        raise ValueError(f"compress.compressor={compressor}: pgolf.fingerprint.CODERS does not say what code it "
                         "runs (a library, or a system binary whose version goes into the run's fingerprint)")
    kind, name = CODERS[compressor]
    if kind == "binary":
        version = binary_version(name)
        return f"{compressor}: {version}", {name: version}
    if kind == "distribution":
        return f"{compressor}: {name} {metadata.version(name)}", {}
    if kind == "stdlib":
        return f"{compressor}: {name} (Python {platform.python_version()})", {}
    return f"{compressor}: {name} (pgolf {__version__})", {}


def binary_version(name: str) -> str:
    """``PATH: first line of NAME --version`` of a system binary; an error naming it when it is not installed."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name}: the system binary the artifact's coder runs is not installed")
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return f"{path}: {lines[0] if lines else 'no version printed'}"


def log_lines(data: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """The fingerprint as log lines (``train_shards: 80``, ``val_tokens: N`` as the records print them)."""
    published = data["published"]
    source = "not recorded (no download.json beside the data)" if published is None else \
        f"{published['repo_id']}@{published['revision']} ({len(published['files'])} files)"
    gpus = f"{env['gpu_count']}x{env['gpu']}" if env["gpu"] else f"none (cpu {env['cpu']}, {env['cpu_count']} cores)"
    return [
        f"dataset: {data['dataset']} manifest_sha256: {data['manifest_sha256']} docs_sha256: {data['docs_sha256']}",
        f"published: {source} repository_manifest_sha256: {data['repository_manifest_sha256']} "
        f"val_files_match_published: {data['val_files_match_published']}",
        f"train_shards: {data['train_shards']}",
        f"val_tokens: {data['val_tokens']}",
        "val_files_sha256: " + " ".join(f"{name}={digest[:16]}" for name, digest in data["val_files_sha256"].items()),
        f"tokenizer_sha256: {data['tokenizer_sha256']} ({data['tokenizer']})",
        f"byte_accounting: {data['byte_accounting']} val_bytes: {data['val_bytes']}",
        f"versions: python {env['python']} pgolf {env['pgolf']} torch {env['torch']} cuda {env['cuda']} "
        f"cudnn {env['cudnn']}",
        f"gpus: {gpus}",
        "attention: " + " ".join(f"{use}={name}" for use, name in env["attention"].items()),
        f"coder: {env.get('coder')} system_binaries: "
        + (", ".join(f"{name} ({version})" for name, version in env["system_binaries"].items()) or "none"),
    ]
