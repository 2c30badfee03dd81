"""Phase clocks: each phase is a log line with its budget and a JSON entry; the process's age counts from its start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pgolf.clocks import EVALUATION, PHASES, TRAINING, Clocks, clock_line


def test_a_phase_is_logged_with_its_budget_and_kept():
    lines: list[str] = []
    clocks = Clocks(lines.append)
    with clocks.phase("evaluation_phase"):
        with clocks.phase("decompression"):
            pass
        clocks.record("ttt", 2.5)
    assert list(clocks.seconds) == ["decompression", "ttt", "evaluation_phase"]  # in the order they ended
    assert lines[1] == "clock:ttt 2.500s budget:evaluation"
    assert lines[0].startswith("clock:decompression ") and lines[2].endswith("s budget:evaluation")
    assert clocks.seconds["evaluation_phase"] >= clocks.seconds["decompression"]
    assert clock_line("data_checks", 1.0) == "clock:data_checks 1.000s budget:none"


def test_a_phase_that_raises_is_not_recorded_and_a_repeated_one_adds_up():
    clocks = Clocks(lambda line: None)
    with pytest.raises(ValueError), clocks.phase("quantization"):
        raise ValueError("no Hessians")
    assert clocks.seconds == {}
    clocks.record("eval_plain", 1.0)
    clocks.record("eval_plain", 0.5)
    assert clocks.seconds == {"eval_plain": 1.5}


def test_only_declared_phases_are_clocks():
    with pytest.raises(KeyError, match="'warmup' is not a phase of pgolf.clocks.PHASES"):
        Clocks(lambda line: None).record("warmup", 1.0)
    assert {budget for budget, _ in PHASES.values()} == {TRAINING, EVALUATION, None}
    assert PHASES["calibration"][0] == TRAINING and PHASES["ttt"][0] == EVALUATION  # the disputed ones


def test_training_splits_into_the_loop_and_the_rest():
    clocks = Clocks(lambda line: None)
    clocks.record_training(wall_s=10.0, loop_s=7.5)
    assert clocks.seconds == {"training_loop": 7.5, "training_setup": 2.5}
    resumed = Clocks(lambda line: None)
    resumed.record_training(wall_s=3.0, loop_s=7.5)  # the loop's clock counts the processes before the resume
    assert resumed.seconds == {"training_loop": 7.5}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process's start time comes from /proc")
def test_the_whole_process_counts_from_the_process_start():
    """A process that sleeps 0.6 s before it imports pgolf is at least 0.6 s old when it asks."""
    code = ("import time; time.sleep(0.6); from pgolf.clocks import Clocks; clocks = Clocks(lambda line: None); "
            "clocks.record_process('whole_process'); print(clocks.seconds['whole_process'])")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.6 <= age < 60
