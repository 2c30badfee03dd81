"""The parameter reference is generated from pgolf/config.py: docs/PARAMS.md is its current output."""

from __future__ import annotations

import dataclasses

from pgolf import config
from pgolf.pipeline import reference


def test_docs_params_is_the_generated_reference():
    """Regenerate with `python -m pgolf.pipeline.reference --write` when this fails."""
    assert reference.REFERENCE_FILE.read_text(encoding="utf-8") == reference.reference()


def test_every_key_of_every_section_is_in_the_reference_and_says_what_it_is():
    text = reference.reference()
    for name, cls in config.SECTIONS.items():
        comments = reference.field_comments(cls)
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in text
            assert comments.get(field.name), f"{name}.{field.name}: no comment in pgolf/config.py says what it is"


def test_run_settings_are_marked():
    rows = [line for line in reference.section_table("train", config.TrainConfig).splitlines()
            if line.startswith("| `train_log_every`")]
    assert rows and "re-runs nothing" in rows[0]
