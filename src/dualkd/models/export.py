"""Writing a trained model as a folder that plain transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from dualkd.atomic import replace_dir
from dualkd.models.lora import is_lora
from dualkd.outputs import claim, mark


def export_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a folder that plain transformers loads: save_pretrained (safetensors) + tokenizer, atomically.
    An existing folder is replaced only if it is an earlier export, empty, or `overwrite` (outputs.py).

    A LoRA student is written merged (a plain model), with its adapter alone in `adapter/`. Merging
    changes the module in place, so call this on a LoRA model only when training is over.
    """
    out = claim(out_dir, "model", overwrite=overwrite)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if is_lora(model):
        model.save_pretrained(tmp / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True, state_dict=_attribute_state_dict(model))
    tokenizer.save_pretrained(tmp)
    mark(tmp, "model")
    replace_dir(tmp, out)
    return out


def _attribute_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """For a model inside an FSDP2-sharded module (gathered by the caller): `attribute_state_dict`, because
    its `state_dict()` hooks hand out the shards (transformers would then gather them on the writing process
    alone, and wait forever). None (the model's own `state_dict()`) for every other model."""
    return attribute_state_dict(model) if any(isinstance(m, FSDPModule) for m in model.modules()) else None


def attribute_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` read from the module attributes themselves, without state-dict hooks: under FSDP2
    the attributes hold the gathered tensors while the caller holds them gathered, the hooks the shards."""
    state: dict[str, Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        lead = f"{prefix}." if prefix else ""
        state.update({lead + n: p for n, p in sub._parameters.items() if p is not None})
        state.update({lead + n: b for n, b in sub._buffers.items()
                      if b is not None and n not in sub._non_persistent_buffers_set})
    return state

