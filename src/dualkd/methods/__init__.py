"""Objectives: one file per method. Register a new one by adding it to OBJECTIVES and ObjectiveConfig."""

from typing import Annotated, Union

from pydantic import Field

from dualkd.methods.base import Objective, StepNorm
from dualkd.methods.kd import KD, KDConfig
from dualkd.methods.sft import SFT, SFTConfig

OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "kd": KD}

ObjectiveConfig = Annotated[Union[SFTConfig, KDConfig], Field(discriminator="name")]  # noqa: UP007


def build_objective(config) -> Objective:
    return OBJECTIVES[config.name](config)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "StepNorm", "build_objective"]
