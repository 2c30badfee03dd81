"""The sections a script carries: baked whole or by their changed values, and read back as every key."""

from __future__ import annotations

import json

import pytest

from pgolf.config import SECTIONS, to_dict
from pgolf.submit.bundle import script_json
from pgolf.submit.sections import expand_baked, script_params
from tests.submit.test_bundle import preset_configs


def as_json(params: dict) -> dict:
    return json.loads(script_json(params))


def test_all_bakes_every_output_key_and_changed_only_what_differs_from_the_defaults():
    configs = preset_configs("frontier")
    assert script_params(configs) == configs.baked()
    changed = script_params(preset_configs("frontier", "compress.bake_params=changed"))
    assert changed["train"]["loader"] == "packed" and changed["compress"]["bake_params"] == "changed"
    for name, keys in changed.items():
        defaults = to_dict(SECTIONS[name]())
        assert all(value != defaults[key] for key, value in keys.items()), name


@pytest.mark.parametrize("preset", ["record", "frontier", "micro"])
@pytest.mark.parametrize("bake", ["all", "changed"])
def test_what_a_script_carries_reads_back_as_every_key_it_was_made_from(preset, bake):
    configs = preset_configs(preset, f"compress.bake_params={bake}")
    assert as_json(expand_baked(as_json(script_params(configs)))) == as_json(configs.baked())


def test_ttt_switched_off_bakes_its_switch_alone_or_nothing():
    """TTT's other keys change nothing while it is off, so a script carries none of them."""
    assert preset_configs("record", "ttt.lora_rank=64").baked()["ttt"] == {"enabled": False}
    assert script_params(preset_configs("record", "ttt.lora_rank=64", "compress.bake_params=changed"))["ttt"] == {}
