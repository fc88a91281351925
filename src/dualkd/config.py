"""The typed run config, assembled from the components' own configs (each beside its code: the models' in
models/config.py, the data's in data/config.py, generation's in generate.py, the sources' in train/sources.py, each
objective's in its methods/ file).

YAML files hold values only; `key.sub=value` overrides on the command line are applied before validation;
unknown keys and wrong types fail with a message naming the key and the expected type; the resolved
config is written into the run directory (`config.yaml`).

    from dualkd.config import load_config
    cfg = load_config("configs/tiny-teacher.yaml", ["optimization.lr=1e-3", "objective.name=sft"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from dualkd.data.config import DataConfig, DataSource
from dualkd.errors import ConfigError
from dualkd.generate import GenerationConfig
from dualkd.methods import ObjectiveConfig
from dualkd.methods.sft import SFTConfig
from dualkd.models import LoraConfig, ModelConfig, TokenizerTrainConfig
from dualkd.schema import AutoOnOff, StrictModel, format_validation_error
from dualkd.teachers.kinds import TeacherConfig
from dualkd.train.sources import (
    OffPolicyConfig,
    OnPolicyConfig,
    ReplayConfig,
    SeqKDConfig,
    SourceConfig,
    source_defaults,
)

# ----------------------------------------------------------------------------------------------- training


class OptimConfig(StrictModel):
    """Optimizer, schedule and batch shape. The global batch is micro_batch_size x grad_accum x processes."""

    lr: float = Field(5e-4, gt=0)
    """Peak learning rate of the student (objectives may add groups with their own, e.g. projectors)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay; never applied to biases and norm weights (1-D parameters)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup, down to `min_lr`."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (optimizer steps)."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a fraction of all steps (used when `warmup_steps` is 0)."""
    min_lr: float = Field(1e-7, ge=0)
    """Learning rate at the end of the schedule (DSKD: CosineAnnealingLR to 1e-7)."""
    epochs: int = Field(1, ge=1)
    """Passes over the training data."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides `epochs` for the schedule length)."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per forward pass per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step. The loss is normalized by the response tokens of the whole
    global batch, so 8x1 and 2x4 give the same update."""
    micro_batch_tokens: int | None = Field(None, ge=1)
    """Token budget per forward pass (None: `micro_batch_size` examples per pass). Each process's examples of a
    step (`micro_batch_size` x `grad_accum`, length-sorted) are cut into passes of at most this many padded
    tokens (examples x longest): short examples go in fewer, fuller passes, long ones in smaller. The examples
    of a step, hence the update, do not change; every process runs as many passes as the busiest one (sharded
    engines gather parameters in each)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping by global norm (None: off)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision on GPU (via accelerate). `no` trains in the parameters' dtype."""


class EvalConfig(StrictModel):
    """Periodic evaluation during training."""

    every_steps: int | None = Field(None, ge=1)
    """Dev loss every N optimizer steps (None: at the end of every epoch)."""
    batch_size: int | None = Field(None, ge=1)
    """Dev micro-batch size (None: the training micro-batch size)."""
    select_by: Literal["loss", "rougeL"] = "loss"
    """What picks the `best/` model: the objective's dev loss (lower is better), or ROUGE-L of responses
    sampled from the dev prompts (higher is better; the DSKD scripts' selection). Sampling uses the run's
    `generation` settings capped to the data lengths, without n-gram blocking (as those scripts did)."""
    rouge_examples: int | None = Field(None, ge=1)
    """Dev examples sampled for ROUGE-L (None: all dev examples)."""
    rouge_repeats: int = Field(3, ge=1)
    """Samples per dev prompt for ROUGE-L (the DSKD scripts: 3), averaged; seeds are fixed across evaluations."""


class LoggingConfig(StrictModel):
    """Console, metrics file and TensorBoard."""

    every_steps: int = Field(10, ge=1)
    """Console/TensorBoard log interval (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under `<output_dir>/tensorboard`."""
    progress_bar: AutoOnOff = "auto"
    """Rich progress bar with ETA (`auto`: only on a terminal)."""


class CheckpointConfig(StrictModel):
    """Checkpoints for exact resume."""

    every_steps: int | None = Field(500, ge=1)
    """Save every N optimizer steps (None: only at the end of each epoch)."""
    keep_last: int = Field(2, ge=1)
    """How many recent checkpoints to keep (the best one is kept on top of these)."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest dev loss, and export it as a model folder in `best/`."""
    resume: bool | Literal["auto"] = False
    """Resume from the latest complete checkpoint in `output_dir` (same as `dualkd train --resume`); `auto`:
    resume when one exists, start otherwise (requeued jobs)."""


# ----------------------------------------------------------------------------------------------- run


class RunConfig(StrictModel):
    """Everything one training run needs."""

    output_dir: str = "runs/run"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/ (and best/)."""
    seed: int = 10
    """Seed for initialization, data order and dropout (DSKD's scripts use 10)."""
    student: ModelConfig
    """The model being trained."""
    teacher: TeacherConfig | None = None
    """The frozen teacher (required by distillation objectives; DPO's reference model; AlignDistil's DPO model):
    a live model, an offline cache or a server (`kind`: teachers/spec.py)."""
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict)
    """More frozen models some objectives read, by role (AlignDistil: `reverse`, the reverse-DPO model, or
    `reference` for its Theorem-1 variant), each a teacher section of its own."""
    data: DataConfig
    source: SourceConfig = Field(default_factory=OffPolicyConfig)
    """Where batches come from: dataset responses, student samples (on-policy, replay) or teacher outputs."""
    objective: ObjectiveConfig = Field(default_factory=lambda: _default_objective())
    """The training objective; `name` selects it and decides which other keys are allowed."""
    optimization: OptimConfig = Field(default_factory=OptimConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" in data:
            data = {**data, "source": source_defaults(data["source"])}
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> RunConfig:
        if self.teacher is not None and not self.teacher.scores_new_sequences and self.source.kind != "off_policy":
            raise ValueError(f"teacher.kind={self.teacher.kind} {self.teacher.dataset_only}; "
                             f"source.kind={self.source.kind} asks the teacher about new sequences: use a live "
                             "teacher (`teacher.path`, no `cache`) or a server")
        if isinstance(self.source, SeqKDConfig) and self.teacher is None and self.source.seqkd_data is None:
            raise ValueError("source.kind=seqkd: set `source.seqkd_data` (teacher outputs from `dualkd generate`) "
                             "or a `teacher` to generate them with")
        if self.source.kind == "replay" and self.data.dev is None:
            raise ValueError("source.kind=replay adapts to the dev loss: set `data.dev`")
        return self


def _default_objective() -> Any:
    return SFTConfig()


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or start empty), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "<overrides>")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, bools, lists, null)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected `key.sub=value`")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in ("train", "dev"):  # `data.train=file.jsonl` then `data.train.x=`
            child = {"path": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, RunConfig)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    data = cfg.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


__all__ = ["CheckpointConfig", "DataConfig", "DataSource", "EvalConfig", "GenerationConfig", "LoggingConfig",
           "LoraConfig", "ModelConfig", "OffPolicyConfig", "OnPolicyConfig", "OptimConfig", "ReplayConfig",
           "RunConfig", "SeqKDConfig", "SourceConfig", "TeacherConfig",
           "TokenizerTrainConfig", "apply_override", "load_config", "save_config", "validate_config"]
