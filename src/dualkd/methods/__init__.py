"""Objectives: one file per method. Register a new one by adding its factory to OBJECTIVES and its config to
ObjectiveConfig."""

from collections.abc import Callable
from typing import Annotated, Any, Union

from pydantic import Field

from dualkd.methods import dskdv2
from dualkd.methods.aligndistil import AlignDistil, AlignDistilConfig
from dualkd.methods.base import Objective, StepNorm
from dualkd.methods.cbmi import CBMI, CBMIConfig
from dualkd.methods.dpo import DPO, DPOConfig
from dualkd.methods.dskd import DSKD, DSKDConfig
from dualkd.methods.dskd_cma import DSKDCMA, DSKDCMAConfig
from dualkd.methods.dskdv2 import DSKDv2Config
from dualkd.methods.gold import GOLD, GOLDConfig
from dualkd.methods.kd import KD, KDConfig, WordKD, WordKDConfig
from dualkd.methods.mined import MinED, MinEDConfig
from dualkd.methods.needs import Needs
from dualkd.methods.sft import SFT, SFTConfig
from dualkd.methods.shared_vocab_kd import SharedVocabKD, SharedVocabKDConfig
from dualkd.methods.tie_kd import TIEKD, TIEKDConfig
from dualkd.methods.uld import ULD, ULDConfig

OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "sft": SFT, "kd": KD, "dskd": DSKD, "dskd_cma": DSKDCMA, "dskdv2": dskdv2.build, "uld": ULD, "mined": MinED,
    "dpo": DPO, "aligndistil": AlignDistil, "tie_kd": TIEKD, "word_kd": WordKD,
    "cbmi": CBMI, "shared_vocab_kd": SharedVocabKD, "gold": GOLD,
}

ObjectiveConfig = Annotated[
    Union[SFTConfig, KDConfig, DSKDConfig, DSKDv2Config, DSKDCMAConfig, ULDConfig, MinEDConfig,  # noqa: UP007
          DPOConfig, AlignDistilConfig, TIEKDConfig, WordKDConfig, CBMIConfig, SharedVocabKDConfig, GOLDConfig],
    Field(discriminator="name"),
]


def build_objective(config: Any) -> Objective:
    """The objective a config names (its factory may choose the class: `dskdv2` with `alignment: cma`)."""
    return OBJECTIVES[config.name](config)


__all__ = ["OBJECTIVES", "Needs", "Objective", "ObjectiveConfig", "StepNorm", "build_objective"]
