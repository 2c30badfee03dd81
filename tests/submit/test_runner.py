"""The runner's calibration check: Hessians collected past train.gptq_reserve_seconds mean training data read past
the training budget, and the exported script says so in a warning line and in final_metrics.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pgolf.config import TrainConfig
from pgolf.submit.runner import reserve_check, reserve_warning
from tests.submit.test_seeds import exported_script, micro_data  # noqa: F401 (micro_data: a fixture)


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
