"""Objectives: one file per method (its config class, a subclass of `ObjectiveSpec`, and its `Objective`), and
one line per method in `METHODS` below."""

from typing import Any

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
from dualkd.methods.multi_teacher import MultiTeacher, MultiTeacherConfig
from dualkd.methods.needs import Needs
from dualkd.methods.sft import SFT, SFTConfig
from dualkd.methods.shared_vocab_kd import SharedVocabKD, SharedVocabKDConfig
from dualkd.methods.spec import METHODS, ObjectiveSpec
from dualkd.methods.tie_kd import TIEKD, TIEKDConfig
from dualkd.methods.uld import ULD, ULDConfig
from dualkd.methods.xtoken import XToken, XTokenConfig
from dualkd.schema import of_kind

METHODS.update({  # name: (its config class, the factory that builds it from its config): one line per method
    "sft": (SFTConfig, SFT),
    "kd": (KDConfig, KD),
    "word_kd": (WordKDConfig, WordKD),
    "dskd": (DSKDConfig, DSKD),
    "dskd_cma": (DSKDCMAConfig, DSKDCMA),
    "dskdv2": (DSKDv2Config, dskdv2.build),
    "uld": (ULDConfig, ULD),
    "mined": (MinEDConfig, MinED),
    "gold": (GOLDConfig, GOLD),
    "shared_vocab_kd": (SharedVocabKDConfig, SharedVocabKD),
    "xtoken": (XTokenConfig, XToken),
    "dpo": (DPOConfig, DPO),
    "aligndistil": (AlignDistilConfig, AlignDistil),
    "tie_kd": (TIEKDConfig, TIEKD),
    "cbmi": (CBMIConfig, CBMI),
    "multi_teacher": (MultiTeacherConfig, MultiTeacher),
})
ObjectiveConfig = of_kind(ObjectiveSpec)
"""The `objective` section, validated into the config class its `name` chooses."""


def build_objective(config: Any) -> Objective:
    """The objective a config names (its factory may choose the class: `dskdv2` with `alignment: cma`)."""
    return METHODS[config.name][1](config)


__all__ = ["METHODS", "Needs", "Objective", "ObjectiveConfig", "ObjectiveSpec", "StepNorm", "build_objective"]
