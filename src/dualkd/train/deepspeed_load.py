"""DeepSpeed checkpoints read without running code.

DeepSpeed reads its checkpoint files (`deepspeed/state/*.pt`: the module, each process's optimizer partition)
through its checkpoint engine, with `torch.load(weights_only=False)`: plain pickle, which runs whatever code
a planted file names. The SHA-256 manifest dualkd writes beside them (train/checkpoint.py) catches damage,
not an attacker: whoever can write the files can write the manifest. So while DeepSpeed loads, its
checkpoint engine is made to load weights-only (tensors, containers, numbers, strings), with the few
DeepSpeed classes its checkpoints hold allowed by name (found with `torch.serialization.
get_unsafe_globals_in_checkpoint` on ZeRO-2 and ZeRO-3 checkpoints, fp32 and fp16). Anything else refuses the
resume with the file and the object named.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch

from dualkd.errors import DualKDError

# what torch's weights-only unpickler names when it refuses ("unsupported GLOBAL posix.system whose ...")
_REFUSED = re.compile(r"[Uu]nsupported (?:GLOBAL|global|operand)[^\n]*?(?=\.(?:\s|$)| whose| was)")


def _allowed() -> list[Any]:
    """DeepSpeed's own plain-data classes that its checkpoints hold (rebuilt field by field, no code run)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """For the duration, `engine` (a DeepSpeedEngine) reads checkpoint files weights-only (module docstring)."""
    checkpoints = engine.checkpoint_engine
    original = checkpoints.load
    allowed = _allowed()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                found = _REFUSED.search(str(e))
                what = found.group(0) if found else type(e).__name__
                raise DualKDError(f"{path}: this DeepSpeed checkpoint file holds something other than tensors and "
                                  f"DeepSpeed's state ({what}); loading it could run code, so the resume is "
                                  "refused") from None

    checkpoints.load = load
    try:
        yield
    finally:
        checkpoints.load = original
