"""The typed run config: one place for every field, its type, default and meaning.

YAML files hold values only; `key.sub=value` overrides on the command line are applied before validation;
unknown keys and wrong types fail with a message naming the key and the expected type; the resolved
config is written into the run directory (`config.yaml`).

    from dualkd.config import load_config
    cfg = load_config("configs/tiny-teacher.yaml", ["optimization.lr=1e-3", "objective.name=sft"])
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dualkd.errors import ConfigError
from dualkd.methods import ObjectiveConfig
from dualkd.schema import StrictModel

# ----------------------------------------------------------------------------------------------- models


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

    path: str | None = None
    """Local Hugging Face folder or hub id. With `init: random` it is optional and only supplies the config."""
    tokenizer: str | None = None
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
    adapter: str | None = None
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

    @field_validator("path", "tokenizer", "adapter")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value and value.startswith("~") else value


class TeacherConfig(ModelConfig):
    """A frozen model the student learns from, and where it runs."""

    placement: Literal["auto", "same", "cpu_offload", "sharded"] = "auto"
    """`same`: a whole copy on every process's device. `cpu_offload`: the weights stay in CPU memory and each
    layer is copied to the device as it runs (accelerate's big-model offload; for teachers larger than the
    device's memory; objectives that read the LM head directly cannot use it). `sharded`: split over the
    processes with the student's engine (DeepSpeed ZeRO-3, FSDP2). `auto`: `sharded` under ZeRO-3 (every
    model is partitioned as it loads there), else `same`."""
    cache: str | None = None
    """An offline teacher cache (the folder `dualkd cache-teacher` wrote): the teacher's outputs are read from
    it and no teacher model is loaded (`path`, when given, only names it). It holds the top-k log-probabilities
    of the training and dev responses (and with `--hidden` the hidden states there and the LM head): `kd`
    (top-k), `dskd` and `dskdv2` train from it; objectives that read more are refused before training."""

    def _loads_a_model(self) -> bool:
        return self.cache is None

    @field_validator("cache")
    @classmethod
    def _expand_cache_home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value and value.startswith("~") else value


# ----------------------------------------------------------------------------------------------- data


class DataSource(StrictModel):
    """One dataset: a local jsonl file, a Hugging Face `datasets` source, or a built-in synthetic task.

    A plain string in YAML is read as `path`.
    """

    path: str | None = None
    """Local jsonl file."""
    hf: str | None = None
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

    @field_validator("path", "hf")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value and value.startswith("~") else value

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
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping by global norm (None: off)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision on GPU (via accelerate). `no` trains in the parameters' dtype."""


class GenerationConfig(StrictModel):
    """Generation settings. Defaults are the DSKD/MiniLLM test protocol: sampling at temperature 1 with no top-k
    or top-p, prompts <= 256 and sequences <= 512 tokens, 6-gram blocking."""

    max_length: int = Field(512, ge=2)
    """Prompt + generated tokens."""
    max_prompt_length: int = Field(256, ge=1)
    """Longer prompts are truncated to their first tokens, as in training."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Cap on generated tokens (None: `max_length - max_prompt_length` for decoder-only models, as the
    protocol's prompts were left-padded to 256 of 512; `max_length` for encoder-decoder models)."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0: off)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0: off)."""
    no_repeat_ngram_size: int = Field(6, ge=0)
    """Block repeated n-grams of this size (0: off). 6 on purpose: the DSKD/MiniLLM test scripts sampled with
    `no_repeat_ngram_size=6` (never overridden), so the papers' ROUGE-L numbers were measured with it; set 0 for
    pure sampling."""
    num_beams: int = Field(1, ge=1)
    """Beam search width (1: sampling or greedy; translation recipes use beams)."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generation batch."""


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


class SourceConfig(StrictModel):
    """Where the training batches come from (train/sources.py, train/on_policy.py). The loss is the objective's
    either way; on a student-sampled step the gold CE stays on the dataset responses."""

    kind: Literal["off_policy", "on_policy", "seqkd", "replay"] = "off_policy"
    """`off_policy`: dataset responses. `on_policy`: after `on_policy_after`, each step is replaced by student
    samples for its prompts with probability `student_gen_ratio` (DSKDv2/GKD). `seqkd`: train on teacher
    responses generated ahead of time (`seqkd_data`, made by `dualkd generate` or here before training).
    `replay`: DistiLLM's adaptive off-policy replay buffer of student samples. (An offline teacher cache is
    where the teacher comes from, not a source: `teacher.cache`.)"""
    student_gen_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """on_policy: probability that a step trains on student samples (DSKDv2 `--stu-gen-ratio`: 0.5)."""
    on_policy_after: int = Field(0, ge=0)
    """on_policy: off-policy warm-up before sampling starts, in `on_policy_after_unit`s (DSKDv2: 3 epochs)."""
    on_policy_after_unit: Literal["epochs", "steps"] = "epochs"
    """Unit of `on_policy_after`."""
    temperature: float = Field(1.0, gt=0)
    """Student sampling temperature (DSKDv2 samples like its evaluation: 1.0, no top-p, no top-k)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Student sampling nucleus threshold (1.0: off)."""
    top_k: int = Field(0, ge=0)
    """Student sampling top-k (0: off)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Cap on sampled tokens (None: up to `data.max_length` for prompt + response)."""
    rollout_batch_size: int | None = Field(None, ge=1)
    """Prompts per generate call (None: all of this process's prompts of the step at once)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Sampling engine: Hugging Face `generate` (KV cache), or vLLM (GPU, `pip install vllm`)."""
    vllm_sync_every: int = Field(1, ge=1)
    """vllm: copy the student's weights into the vLLM engine every N optimizer steps."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    """vllm: share of the GPU memory vLLM may take (the rest is the trainer's)."""
    replay_capacity: int = Field(1000, ge=1)
    """replay: sampled examples kept per process (DistiLLM: 1000)."""
    replay_init_threshold: float = Field(0.0, ge=0.0, le=1.0)
    """replay: the starting probability φ of training on student samples (DistiLLM: 0.0)."""
    replay_threshold_step: float = Field(0.1, gt=0.0, le=1.0)
    """replay: how much φ rises when the dev loss got worse by `replay_loss_eps` (DistiLLM: 0.1)."""
    replay_loss_eps: float = Field(0.1, ge=0.0)
    """replay: dev-loss increase that raises φ (DistiLLM: 0.1)."""
    replay_schedule: Literal["decreasing", "constant", "increasing"] = "decreasing"
    """replay: share of φ spent on fresh samples over training: φ(1 - t/T) (DistiLLM's default), φ/2, or φ·t/T;
    the rest of φ reuses the buffer."""
    seqkd_data: str | None = None
    """seqkd: the teacher-generated training set (jsonl from `dualkd generate`). When the file does not exist
    the teacher writes it there before training (default `<output_dir>/seqkd-train.jsonl`)."""
    seqkd_sampling: bool = False
    """seqkd: sample the teacher's outputs with the `generation` settings (temperature, top-p). Off (Kim &
    Rush): the teacher decodes greedily, or with beam search when `generation.num_beams` > 1."""

    @model_validator(mode="before")
    @classmethod
    def _cache_moved_to_teacher(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("kind") == "cache" or "cache_dir" in data):
            raise ValueError("an offline teacher cache is now where the teacher comes from: replace `source.kind: "
                             "cache` and `source.cache_dir: DIR` by `teacher: {cache: DIR}`")
        return data

    @field_validator("seqkd_data")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if value and value.startswith("~") else value


class LoggingConfig(StrictModel):
    """Console, metrics file and TensorBoard."""

    every_steps: int = Field(10, ge=1)
    """Console/TensorBoard log interval (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard event files under `<output_dir>/tensorboard`."""
    progress_bar: Literal["auto", "on", "off"] = "auto"
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
    """The frozen teacher (required by distillation objectives; DPO's reference model; AlignDistil's DPO model)."""
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict)
    """More frozen models some objectives read, by role (AlignDistil: `reverse`, the reverse-DPO model, or
    `reference` for its Theorem-1 variant)."""
    data: DataConfig
    source: SourceConfig = Field(default_factory=SourceConfig)
    """Where batches come from: dataset responses, student samples (on-policy, replay) or teacher outputs."""
    objective: ObjectiveConfig = Field(default_factory=lambda: _default_objective())
    """The training objective; `name` selects it and decides which other keys are allowed."""
    optimization: OptimConfig = Field(default_factory=OptimConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check_combination(self) -> RunConfig:
        if self.teacher is not None:
            if self.teacher.lora is not None:
                raise ValueError("teacher.lora: the teacher is frozen; give a trained adapter as `teacher.adapter`")
            if self.teacher.train_tokenizer is not None:
                raise ValueError("teacher.train_tokenizer: a teacher's tokenizer must come with the teacher")
        for role, spec in self.teachers.items():
            if spec.lora is not None or spec.train_tokenizer is not None:
                raise ValueError(f"teachers.{role}: a frozen model takes neither `lora` nor `train_tokenizer`")
        if self.teacher is not None and self.teacher.cache is not None and self.source.kind != "off_policy":
            raise ValueError(f"teacher.cache holds the teacher's outputs on the dataset responses only; source.kind="
                             f"{self.source.kind} asks the teacher about new sequences: use a live teacher "
                             "(`teacher.path`, no `cache`)")
        if self.source.kind == "seqkd" and self.teacher is None and self.source.seqkd_data is None:
            raise ValueError("source.kind=seqkd: set `source.seqkd_data` (teacher outputs from `dualkd generate`) "
                             "or a `teacher` to generate them with")
        if self.source.kind == "replay" and self.data.dev is None:
            raise ValueError("source.kind=replay adapts to the dev loss: set `data.dev`")
        return self


def _default_objective() -> Any:
    from dualkd.methods.sft import SFTConfig

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
        raise ConfigError(format_validation_error(e, source)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    data = cfg.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- errors


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what was expected, what was given."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors(include_url=False):
        keys, owners = _walk(e["loc"])
        key = ".".join(str(k) for k in keys) or "<top level>"
        kind = e["type"]
        if kind == "extra_forbidden":
            owner = owners[-1] if owners else None
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(keys[-1]), list(owner.model_fields), n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else f"; allowed: {', '.join(owner.model_fields)}"
            lines.append(f"  {key}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"  {key}: required key is missing")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            from dualkd.methods import CONFIGS

            given = e["input"].get("name") if isinstance(e["input"], dict) else None
            problem = "is missing" if given is None else f"unknown objective {given!r}"
            lines.append(f"  {key}.name: {problem}; choose from {sorted(CONFIGS)}")
        elif kind == "value_error":
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            owner = owners[-1] if owners else None
            field = owner.model_fields.get(keys[-1]) if owner is not None else None
            got = e.get("input")
            got_text = "a mapping" if isinstance(got, dict) else f"{got!r} ({type(got).__name__})"
            expected = f"expected {_type_name(field.annotation)}, " if field is not None else ""
            lines.append(f"  {key}: {expected}got {got_text}: {e['msg']}")
    return "\n".join(lines)


def _walk(loc: tuple[Any, ...]) -> tuple[list[Any], list[type[BaseModel] | None]]:
    """Follow a pydantic error location through the config classes.

    Returns the user-facing key path (union tags and validator names removed) and, for each key, the
    config class that owns it (None where the path leaves the typed classes, e.g. inside `arch`).
    """
    from dualkd.methods import CONFIGS

    keys: list[Any] = []
    owners: list[type[BaseModel] | None] = []
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, str) and (part.startswith("function-") or "[" in part):
            continue
        if keys == ["objective"] and part in CONFIGS:
            model = CONFIGS[part]  # the discriminated-union tag: follow that variant
            continue
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        keys.append(part)
        owners.append(model if is_model else None)
        model = _inner_model(model.model_fields[part].annotation) if is_model and part in model.model_fields else None
    return keys, owners


def _inner_model(annotation: Any) -> Any:
    """The config class inside `X | None` or `Annotated[...]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
