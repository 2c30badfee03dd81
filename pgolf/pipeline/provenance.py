"""What every stage records before it starts: code, versions, config, hardware.

A stage prints one line of it (commit, versions, device) and writes the whole
record (with the resolved configuration, the run fingerprint's environment: CUDA,
cuDNN, GPUs, attention kernels; and, added by the stage as it ends, its clocks and
data fingerprint) to a file beside its metrics, so a number in a metrics file can
always be traced back to how it was made without the log drowning in it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when the work tree differs."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict[str, str]:
    import numpy
    import torch

    from pgolf import __version__

    return {
        "pgolf": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def environment() -> dict[str, Any]:
    """The run fingerprint's environment (``pgolf.fingerprint``) of this machine's best device and process count."""
    import torch

    from pgolf.fingerprint import environment as fingerprint_environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return fingerprint_environment(device, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's, else one process


def provenance(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage,
        "git_commit": git_commit(),
        "versions": versions(),
        "hardware": hardware(),
        "environment": environment(),
        "config": config,
    }


def summary_line(record: dict[str, Any]) -> str:
    """Commit, versions and hardware of a provenance record, on one line."""
    v, hw = record["versions"], record["hardware"]
    where = ", ".join(hw["gpus"]) if hw.get("gpus") else f"cpu x{hw['cpu_count']} ({hw['torch_threads']} threads)"
    return (f"commit {record['git_commit'][:12]}{'+dirty' if record['git_commit'].endswith('+dirty') else ''} | "
            f"pgolf {v['pgolf']} torch {v['torch']} python {v['python']} | {where}")


def log_provenance(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """Print the one-line summary of ``stage``'s provenance and return the whole record."""
    record = provenance(stage, config)
    print(f"[pgolf {stage}] {summary_line(record)}", flush=True)
    return record
