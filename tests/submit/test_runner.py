"""The runner's calibration check: Hessians collected past train.gptq_reserve_seconds mean training data read past
the training budget, and the exported script says so in a warning line and in final_metrics.json; and its input
checks: bad data is one line naming the file before the first training step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pgolf.config import TrainConfig
from pgolf.data.shards import read_shard, write_shard
from pgolf.submit.runner import check_inputs, reserve_check, reserve_warning
from tests.conftest import ASSETS_DIR
from tests.submit.test_seeds import exported_script, micro_data  # noqa: F401 (micro_data: a fixture)

DATASET = Path("data/datasets/fineweb10B_sp1024")
TOKENIZER = Path("data/tokenizers/fineweb_1024_bpe.model")


def test_calibration_within_the_reserve_reads_training_data_within_the_cap():
    check = reserve_check(TrainConfig(max_wallclock_seconds=600.0, gptq_reserve_seconds=12.0), 587.9, 11.3)
    assert not check["overran"] and not check["past_wallclock"]
    assert check["training_data_read_until_s"] == pytest.approx(599.2)


def test_calibration_past_the_reserve_is_a_warning_naming_both_limits():
    check = reserve_check(TrainConfig(max_wallclock_seconds=600.0, gptq_reserve_seconds=12.0), 588.1, 14.2)
    assert check["overran"] and check["past_wallclock"]
    assert reserve_warning(check) == (
        "WARNING: calibration overran the reserve: it read training data for 14.200 s after the loop, more than "
        "train.gptq_reserve_seconds=12 s; training data was read until 602.300 s on the training clock, past "
        "train.max_wallclock_seconds=600 s")
    by_steps = reserve_check(TrainConfig(max_wallclock_seconds=0.0, gptq_reserve_seconds=1.0), 30.0, 2.0)
    assert by_steps["overran"] and not by_steps["past_wallclock"]
    assert reserve_warning(by_steps).endswith("until 32.000 s on the training clock, with no wallclock cap set")


@pytest.mark.slow
def test_the_exported_script_warns_when_calibration_overran_the_reserve(micro_data, tmp_path):  # noqa: F811
    """The micro preset with no reserve at all: any calibration overruns it."""
    script = exported_script(tmp_path, train={"gptq_reserve_seconds": 0.0})
    shutil.copytree(micro_data, tmp_path / "data")
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_STAGE", "PYTHONPATH")}
    result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    check = final["calibration_reserve"]
    assert check["overran"] and check["calibration_s"] == final["clocks"]["calibration"] > 0
    assert reserve_warning(check) in result.stdout.splitlines()


# ---------------------------------------------------------------- every input checked before the first step


def id_beyond_the_vocabulary(shard: Path) -> Callable[[Path], None]:
    """Set token 100 of ``shard`` (relative to the run's folder) to 1024, the micro vocabulary's size."""
    def spoil(folder: Path) -> None:
        tokens = np.array(read_shard(folder / shard))
        tokens[100] = 1024
        write_shard(folder / shard, tokens)
    return spoil


def declared_caseops(folder: Path) -> None:
    manifest = folder / DATASET / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"text_transform": "none"', '"text_transform": "caseops"'))


def short_sidecar(folder: Path) -> None:
    write_shard(folder / DATASET / "fineweb_val_bytes_000000.bin", np.zeros(10, dtype=np.uint16))


BAD_INPUTS = {
    "tokenizer missing": (lambda folder: (folder / TOKENIZER).unlink(), f"{TOKENIZER}: tokenizer model not found"),
    "tokenizer of another vocabulary": (
        lambda folder: shutil.copy(ASSETS_DIR / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                                   folder / TOKENIZER),
        f"{TOKENIZER}: tokenizer has 8192 pieces but vocab_size is 1024"),
    "training id beyond the vocabulary": (
        id_beyond_the_vocabulary(DATASET / "fineweb_train_000001.bin"),
        f"{DATASET}/fineweb_train_000001.bin: token id 1024 at position 100 is not below vocab_size 1024"),
    "validation id beyond the vocabulary": (
        id_beyond_the_vocabulary(DATASET / "fineweb_val_000000.bin"),
        f"{DATASET}/fineweb_val_000000.bin: token id 1024 at position 100 is not below vocab_size 1024"),
    "no training shards": (
        lambda folder: [path.unlink() for path in (folder / DATASET).glob("fineweb_train_*.bin")],
        f"{DATASET}: no fineweb_train_*.bin shards"),
    "CaseOps text without its byte sidecar": (
        declared_caseops,
        f"{DATASET}/fineweb_val_bytes_000000.bin: byte sidecar not found, but {DATASET}/manifest.json declares"),
    "a byte sidecar shorter than its shard": (
        short_sidecar, f"{DATASET}/fineweb_val_bytes_000000.bin: 10 byte counts for the"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_the_exported_script_checks_every_input_before_the_first_step(micro_data, tmp_path, case):  # noqa: F811
    """The micro preset's train_gpt.py in a folder with nothing but the data, one input spoiled: exit 2 and one
    line naming the file, before any training (no step logged, no model written)."""
    spoil, expected = BAD_INPUTS[case]
    exported_script(tmp_path)
    shutil.copytree(micro_data, tmp_path / "data")
    spoil(tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_STAGE", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"train_gpt.py: error: {expected}"), result.stderr
    assert "train_time" not in result.stdout and "step " not in result.stdout
    assert not (tmp_path / "final_model.pt").exists()


def test_the_input_checks_pass_the_challenges_data(micro_data):  # noqa: F811
    check_inputs(micro_data / "datasets" / "fineweb10B_sp1024", micro_data / "tokenizers" / "fineweb_1024_bpe.model",
                 1024)
