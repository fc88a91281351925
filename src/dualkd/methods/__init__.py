"""Objectives: one file per method. Register a new one by adding it to OBJECTIVES and ObjectiveConfig."""

from typing import Annotated, Union

from pydantic import Field

from dualkd.methods.aligndistil import AlignDistil, AlignDistilConfig
from dualkd.methods.base import Objective, StepNorm
from dualkd.methods.cbmi import CBMI, CBMIConfig
from dualkd.methods.dpo import DPO, DPOConfig
from dualkd.methods.dskd import DSKD, DSKDConfig
from dualkd.methods.dskd_cma import DSKDCMA, DSKDCMAConfig
from dualkd.methods.dskdv2 import DSKDv2, DSKDv2Config
from dualkd.methods.kd import KD, KDConfig, WordKD, WordKDConfig
from dualkd.methods.mined import MinED, MinEDConfig
from dualkd.methods.sft import SFT, SFTConfig
from dualkd.methods.tie_kd import TIEKD, TIEKDConfig
from dualkd.methods.uld import ULD, ULDConfig

OBJECTIVES: dict[str, type[Objective]] = {
    "sft": SFT, "kd": KD, "dskd": DSKD, "dskd_cma": DSKDCMA, "dskdv2": DSKDv2, "uld": ULD, "mined": MinED,
    "dpo": DPO, "aligndistil": AlignDistil, "tie_kd": TIEKD, "word_kd": WordKD,
    "cbmi": CBMI,
}

ObjectiveConfig = Annotated[
    Union[SFTConfig, KDConfig, DSKDConfig, DSKDv2Config, DSKDCMAConfig, ULDConfig, MinEDConfig,  # noqa: UP007
          DPOConfig, AlignDistilConfig, TIEKDConfig, WordKDConfig, CBMIConfig],
    Field(discriminator="name"),
]


def build_objective(config) -> Objective:
    if isinstance(config, DSKDv2Config) and config.alignment == "cma":
        return DSKDCMA(config.as_cma())  # DSKDv2's CMA variant lives with v1's CMA in dskd_cma.py
    return OBJECTIVES[config.name](config)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "StepNorm", "build_objective"]
