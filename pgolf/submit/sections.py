"""The sections an exported script carries (``RunConfigs``), how they are baked into it and read back.

The runner reads seven config sections; the bundler bakes their output keys into the script as JSON
(:func:`script_params`: all of them, or with ``compress.bake_params: changed`` only the values that
differ from the config classes' defaults), the runner builds its sections from them
(``RunConfigs.from_baked``, which fills in every key left out from the shipped config), and export
reads every key back the same way (:func:`expand_baked`). Only ``RunConfigs`` ships: the functions
here serve the pipeline's side.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from pgolf.config import (
    CalibrateConfig,
    CompressConfig,
    EvaluateConfig,
    ModelConfig,
    QuantizeConfig,
    TrainConfig,
    TTTConfig,
    from_dict,
    output_keys,
    section,
    to_dict,
)


@dataclass(frozen=True)
class RunConfigs:
    """Every section the runner reads: the params an exported script carries."""

    model: ModelConfig
    train: TrainConfig
    calibrate: CalibrateConfig
    quantize: QuantizeConfig
    compress: CompressConfig
    evaluate: EvaluateConfig
    ttt: TTTConfig

    def baked(self) -> dict[str, dict[str, Any]]:
        """The keys that shape the outputs, by section (run settings keep their defaults); TTT switched off bakes its
        switch alone, since its other keys then change nothing (and every byte of the script counts)."""
        baked = {name: {key: to_dict(getattr(self, name))[key] for key in output_keys(config)}
                 for name, config in self.sections().items()}
        return baked if self.ttt.enabled else baked | {"ttt": {"enabled": False}}

    @classmethod
    def from_baked(cls, params: dict[str, dict[str, Any]]) -> RunConfigs:
        return cls(**{name: from_dict(config, params[name], f"baked params: {name}")
                      for name, config in cls.sections().items()})

    @classmethod
    def sections(cls) -> dict[str, type]:
        """Each section's name and config class, as the fields above declare them (not ``pgolf.config.SECTIONS``,
        which would ship every section's class, the runner's or not)."""
        return typing.get_type_hints(cls)

    @classmethod
    def section_names(cls) -> list[str]:
        return list(cls.sections())


def run_configs(params: dict[str, dict[str, Any]]) -> RunConfigs:
    """The runner's sections of a params file (``load_params``), as the bundle stage bakes them."""
    return RunConfigs(**{name: section(params, name, config) for name, config in RunConfigs.sections().items()})


def script_params(configs: RunConfigs) -> dict[str, dict[str, Any]]:
    """The params a script of ``configs`` carries: every output key (``configs.baked()``), or with
    ``compress.bake_params: changed`` only the values that differ from the config classes' defaults, which the
    runner's ``RunConfigs.from_baked`` fills in from the shipped config (a function, not a method: a class ships
    whole, and the script never writes itself)."""
    baked = configs.baked()
    if configs.compress.bake_params == "all":
        return baked
    defaults = {name: to_dict(config()) for name, config in configs.sections().items()}
    return {name: {key: value for key, value in keys.items() if value != defaults[name][key]}
            for name, keys in baked.items()}


def expand_baked(params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every output key of the params a script carries, those it leaves to the defaults filled in as its runner fills
    them: ``configs.baked()`` of the configs it was made from."""
    return RunConfigs.from_baked(params).baked()
