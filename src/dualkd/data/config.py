"""The data sections of a run config: where examples come from (`DataSource`) and how they are read,
truncated and batched (`DataConfig`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dualkd.schema import HomePath, StrictModel


class DataSource(StrictModel):
    """One dataset: a local jsonl file, a Hugging Face `datasets` source, or a built-in synthetic task.

    A plain string in YAML is read as `path`.
    """

    path: HomePath | None = None
    """Local jsonl file."""
    hf: HomePath | None = None
    """Hugging Face dataset name or local dataset folder (needs the network for hub names)."""
    hf_config: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Dataset split (for `hf`)."""
    synthetic: Literal["copy", "sort", "arithmetic", "associate", "mixed", "instructions"] | None = None
    """A generated toy task set, for smoke tests and the demo (no files needed)."""
    num_examples: int = Field(2000, ge=1)
    """How many synthetic examples to generate."""
    seed: int = 0
    """Seed of the synthetic generator (use different seeds for train and dev)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        given = [k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of `path`, `hf`, `synthetic` (got {given or 'none'})")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.hf is not None:
            return f"hf:{self.hf}" + (f"/{self.hf_config}" if self.hf_config else "") + f"[{self.split}]"
        return f"synthetic:{self.synthetic}(n={self.num_examples}, seed={self.seed})"


class DataConfig(StrictModel):
    """Training/dev data, formats, truncation and batching."""

    train: DataSource
    """Training data."""
    dev: DataSource | None = None
    """Validation data for the periodic dev loss (and best-checkpoint selection)."""
    format: Literal["auto", "prompt_output", "alpaca", "messages", "preference"] = "auto"
    """Record format. `auto` picks per record: `chosen` -> preference pair, `messages` -> chat, `prompt` ->
    prompt/output, `instruction` -> Alpaca. Preference pairs train `dpo` on both responses and every other
    objective on the chosen one (AlignDistil off-policy)."""
    translation: str | None = Field(None, pattern=r"^[^:\s]+:[^:\s]+$")
    """Sentence pairs `SOURCE:TARGET` (e.g. `de:en` for {"de": ..., "en": ...} lines): the source is the prompt,
    the target the response. An encoder-decoder student reads the source with its encoder (then
    `max_prompt_length` caps the source and `max_length` the target)."""
    max_length: int = Field(512, ge=2)
    """Maximum tokens of prompt + response + EOS; longer sequences are cut at the end (as in DSKD/MiniLLM)."""
    max_prompt_length: int | None = Field(256, ge=1)
    """Prompts longer than this are truncated (None: never). The papers keep the first tokens."""
    prompt_truncation: Literal["keep_start", "keep_end"] = "keep_start"
    """Which end of an over-long prompt to keep. `keep_start` is the papers' behaviour; `keep_end` keeps the
    part next to the response (e.g. the `### Response:` marker)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records stop the run (`raise`) or are skipped, counted, printed and logged (`skip`)."""
    bucket_by_length: bool = True
    """Group examples of similar length into batches (less padding); the order stays seeded and reproducible."""
    pad_to_multiple_of: int | None = Field(None, ge=1)
    """Round each batch's padded length up to a multiple (e.g. 8 for tensor cores)."""
    max_examples: int | None = Field(None, ge=1)
    """Use only the first N training examples (quick runs)."""
    dev_max_examples: int | None = Field(None, ge=1)
    """Use only the first N dev examples."""

    @model_validator(mode="after")
    def _prompt_leaves_room(self) -> DataConfig:
        # sentence pairs may go to an encoder-decoder model, where the two limits apply to different sequences
        if self.translation is None and self.max_prompt_length is not None \
                and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}) to leave room for a response")
        return self

    @property
    def translation_pair(self) -> tuple[str, str] | None:
        if self.translation is None:
            return None
        source, target = self.translation.split(":")
        return source, target
