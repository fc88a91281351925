"""Where a model and its tokenizer come from: the `student`/`teacher` config sections' shared fields."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from dualkd.schema import HomePath, StrictModel


class TokenizerTrainConfig(StrictModel):
    """Train a BPE tokenizer on the training texts (for models trained from scratch)."""

    vocab_size: int = Field(1024, ge=64)
    """Target vocabulary size, special tokens included."""
    style: Literal["byte_level", "metaspace"] = "byte_level"
    """`byte_level`: GPT-2-style byte BPE (Ġ for spaces); `metaspace`: SentencePiece-style (▁ for spaces)."""


class LoraConfig(StrictModel):
    """Trainable LoRA adapters on the student (peft)."""

    r: int = Field(8, ge=1)
    """Adapter rank."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer except the LM head)."""


class ModelConfig(StrictModel):
    """Where a model and its tokenizer come from, and how to load them."""

    path: HomePath | None = None
    """Local Hugging Face folder or hub id. With `init: random` it is optional and only supplies the config."""
    tokenizer: HomePath | None = None
    """Tokenizer folder or hub id; defaults to `path`."""
    train_tokenizer: TokenizerTrainConfig | None = None
    """Train a new tokenizer on the training data instead of loading one (`init: random` only)."""
    gguf_file: str | None = None
    """A GGUF file inside `path`, loaded (dequantized) through transformers' GGUF loader."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`pretrained` loads weights from `path`; `random` builds a fresh model from `arch` (and `path`'s config)."""
    arch: dict[str, Any] = Field(default_factory=dict)
    """Model config fields for `init: random` (must include `model_type` when there is no `path`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype at load; `auto` keeps the checkpoint's dtype."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off by default: it executes arbitrary Python."""
    attn_implementation: str | None = None
    """transformers attention backend (`eager`, `sdpa`, `flash_attention_2`); None lets transformers choose."""
    adapter: HomePath | None = None
    """A trained peft adapter folder, merged into the weights at load (e.g. a LoRA-SFT teacher)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (student only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (student only)."""

    def _loads_a_model(self) -> bool:
        """False where the outputs come from elsewhere (a teacher cache): then no path or tokenizer is needed."""
        return True

    @model_validator(mode="after")
    def _check_sources(self) -> ModelConfig:
        if not self._loads_a_model():
            return self
        if self.init == "pretrained" and self.path is None:
            raise ValueError("`path` is required unless `init: random`")
        if self.init == "random" and self.path is None and "model_type" not in self.arch:
            raise ValueError("`init: random` needs `arch.model_type` (or a `path` to take the config from)")
        if self.train_tokenizer is not None:
            if self.init != "random":
                raise ValueError("`train_tokenizer` only makes sense with `init: random`")
            if self.tokenizer is not None:
                raise ValueError("set either `tokenizer` or `train_tokenizer`, not both")
        elif self.tokenizer is None and self.path is None:
            raise ValueError("no tokenizer: set `tokenizer`, `path` or `train_tokenizer`")
        return self

    @property
    def tokenizer_source(self) -> str | None:
        return self.tokenizer or self.path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
"""Parameter dtypes by their config name (`ModelConfig.dtype`)."""
