"""LoRA: trainable adapters on a student (peft), and a trained adapter merged into a model at load."""

from __future__ import annotations

from torch import nn

from dualkd.errors import ModelError, first_line
from dualkd.lm import is_seq2seq
from dualkd.models.config import LoraConfig


def apply_lora(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False) -> nn.Module:
    import peft

    task = "SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM"
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type=task)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input under LoRA
    return peft.get_peft_model(model, config)


def merge_adapter(model: nn.Module, adapter: str, role: str) -> nn.Module:
    import peft

    try:
        return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as e:
        raise ModelError(f"{role}: cannot merge adapter {adapter!r}: {type(e).__name__}: {first_line(e)}") from None


def is_lora(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)
