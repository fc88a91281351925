"""Load students, teachers and tokenizers: local folders, hub ids, GGUF files, random init, LoRA, export.

    tokenizer = load_tokenizer(cfg.student, train_texts=...)
    student = load_model(cfg.student, tokenizer, role="student", seed=cfg.seed)
    teacher = load_model(cfg.teacher, teacher_tokenizer, role="teacher")   # frozen: eval mode, no grad

Security defaults: `trust_remote_code` only when the config says so; weights from safetensors only (GGUF
files go through transformers' own GGUF reader).
"""

from __future__ import annotations

import difflib
import inspect
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from dualkd.atomic import replace_dir
from dualkd.data.tokenizers import train_tokenizer
from dualkd.errors import ModelError
from dualkd.lm import config_is_seq2seq, is_seq2seq
from dualkd.outputs import claim, mark
from dualkd.schema import HomePath, StrictModel

# ----------------------------------------------------------------------------------------------- configs


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


# ----------------------------------------------------------------------------------------------- loading



DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _require_local(source: str | None, field: str) -> None:
    """A source written as a local path (`/x`, `./x`, `~/x`, `a/b/c`) must exist: otherwise transformers takes it
    for a hub id and answers with a message about repo ids. `org/name` stays a hub id."""
    if source is None or Path(source).expanduser().exists():
        return
    if source.startswith(("/", ".", "~")) or source.count("/") >= 2 or "\\" in source:
        raise ModelError(f"{field}: folder not found: {source}")


def _known_fields(config_class: type) -> set[str]:
    """Every field a transformers config class accepts: its own parameters, their aliases and the common ones."""
    from transformers import PretrainedConfig

    own = set(inspect.signature(config_class.__init__).parameters)
    common = set(inspect.signature(PretrainedConfig.__init__).parameters) | set(PretrainedConfig().to_dict())
    return (own | common | set(getattr(config_class, "attribute_map", {})) | {"model_type"}) - {"self", "kwargs"}


def check_arch(arch: dict[str, Any], field: str, config_class: type | None = None) -> None:
    """Refuse an unknown `arch.model_type` (naming close matches) and `arch` fields the architecture's config
    class does not have (a typo such as `n_layers` would otherwise be stored and ignored)."""
    from transformers import CONFIG_MAPPING

    if config_class is None:
        model_type = arch.get("model_type")
        if model_type is None:
            return
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ModelError(f"{field}.arch.model_type: unknown model type {model_type!r}; {hint}(transformers knows "
                             f"{len(CONFIG_MAPPING)} types, e.g. gpt2, llama, qwen2, mistral, gemma3_text, marian, t5)")
        config_class = CONFIG_MAPPING[model_type]
    known = _known_fields(config_class)
    for key in arch:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ModelError(f"{field}.arch.{key}: not a field of {config_class.__name__}{hint}")


def load_tokenizer(spec: ModelConfig, train_texts: Callable[[], Iterable[str]] | None = None,
                   field: str = "student") -> Any:
    """The tokenizer named by `spec`, or a new one trained on `train_texts()` when `spec.train_tokenizer` is set.
    `field` names the config section in messages."""
    if spec.train_tokenizer is not None:
        if train_texts is None:
            raise ModelError("train_tokenizer needs training texts")
        return train_tokenizer(train_texts(), spec.train_tokenizer.vocab_size, spec.train_tokenizer.style)
    from transformers import AutoTokenizer

    source = spec.tokenizer_source
    where = f"{field}.tokenizer" if spec.tokenizer else f"{field}.path"
    _require_local(source, where)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    if spec.gguf_file and spec.tokenizer is None:
        kwargs["gguf_file"] = spec.gguf_file
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError ...
        local = "" if source is None or Path(source).expanduser().exists() else \
            f" (and there is no local folder {source!r})"
        raise ModelError(f"{where}: cannot load tokenizer {source!r}{local}: {type(e).__name__}: "
                         f"{_first_line(e)}") from None


def is_encoder_decoder(spec: ModelConfig, field: str = "student") -> bool:
    """Whether `spec` names an encoder-decoder model (Marian, BART, T5), from its config alone."""
    from transformers import AutoConfig

    _require_local(spec.path, f"{field}.path")
    check_arch(spec.arch, field)
    model_type = spec.arch.get("model_type")
    try:
        if spec.path is not None and (spec.init == "pretrained" or model_type is None):
            extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
            config = AutoConfig.from_pretrained(spec.path, revision=spec.revision,
                                                trust_remote_code=spec.trust_remote_code, **extra)
        else:
            config = AutoConfig.for_model(model_type)
    except Exception as e:  # transformers raises many types
        where = spec.path or model_type
        raise ModelError(f"cannot read the model config of {where!r}: {type(e).__name__}: {_first_line(e)}") from None
    return config_is_seq2seq(config)


def load_model(spec: ModelConfig, tokenizer: Any, *, role: str, seed: int = 0, field: str | None = None
               ) -> nn.Module:
    """Load (or randomly initialize) a causal LM or an encoder-decoder model. Teachers come back frozen; students
    get LoRA if configured. `field` names the config section in messages (default: `role`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    field = field or role
    _require_local(spec.path, f"{field}.path")
    _require_local(spec.adapter, f"{field}.adapter")
    check_arch(spec.arch, field)

    dtype = DTYPES[spec.dtype]
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation:
        common["attn_implementation"] = spec.attn_implementation
    try:
        if spec.init == "random":
            # the tokenizer decides the vocabulary size and special ids unless `arch` says otherwise
            fields = {"vocab_size": len(tokenizer)}
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tokenizer, name, None) is not None:
                    fields[name] = getattr(tokenizer, name)
            fields.update(spec.arch)
            if spec.path is not None:
                config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, **common)
                check_arch(spec.arch, field, type(config))
                for k, v in fields.items():
                    if k != "model_type":
                        setattr(config, k, v)
            else:
                config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            if config_is_seq2seq(config) and "decoder_start_token_id" not in spec.arch:
                # Marian/T5 start the decoder with the pad token; configs built from scratch carry other ids
                config.decoder_start_token_id = getattr(tokenizer, "pad_token_id", None) or tokenizer.eos_token_id
            auto = AutoModelForSeq2SeqLM if config_is_seq2seq(config) else AutoModelForCausalLM
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = auto.from_config(config, dtype=None if dtype == "auto" else dtype, **common)
        else:
            kwargs: dict[str, Any] = dict(common, dtype=dtype, revision=spec.revision)
            if spec.gguf_file:
                kwargs["gguf_file"] = spec.gguf_file
            else:
                kwargs["use_safetensors"] = True
            extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
            config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, **common, **extra)
            auto = AutoModelForSeq2SeqLM if config_is_seq2seq(config) else AutoModelForCausalLM
            model = auto.from_pretrained(spec.path, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        where = spec.path or spec.arch.get("model_type")
        raise ModelError(f"{field}: cannot load the {role} from {where!r}: {type(e).__name__}: {_first_line(e)}"
                         ) from None

    rows = model.get_input_embeddings().num_embeddings  # the module's count: ZeRO-3 partitions the weight
    if rows < len(tokenizer):
        raise ModelError(f"{role}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows; they do not belong together")
    if spec.adapter:
        model = _merge_adapter(model, spec.adapter, role)
    if role == "teacher":
        return freeze(model)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, spec.gradient_checkpointing)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: how a teacher is run."""
    model.eval()
    model.requires_grad_(False)
    return model


def apply_lora(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False) -> nn.Module:
    import peft

    task = "SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM"
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type=task)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input under LoRA
    return peft.get_peft_model(model, config)


def _merge_adapter(model: nn.Module, adapter: str, role: str) -> nn.Module:
    import peft

    try:
        return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as e:
        raise ModelError(f"{role}: cannot merge adapter {adapter!r}: {type(e).__name__}: {_first_line(e)}") from None


def is_lora(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def head_rows(model: nn.Module) -> int:
    """Rows of the model's LM head, read from the module (not its weight tensor, which DeepSpeed ZeRO-3
    partitions at load: an empty tensor on every process)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or head.num_embeddings)


def shared_vocab_size(v_student: int, v_teacher: int, tokenizer: Any) -> int:
    """Rows of the two LM heads (`v_student`, `v_teacher` rows: `head_rows`) that KD compares when both
    models use `tokenizer`.

    One family often pads its embedding differently per size (Qwen2: 151,936 vs 152,064 rows for 151,646
    tokens). Rows beyond `len(tokenizer)` are padding in both, so KD uses the first min(V_s, V_t, len(tok)).
    """
    n_tokens = len(tokenizer)
    if min(v_student, v_teacher) < n_tokens:
        raise ModelError(f"vocabulary mismatch: the tokenizer has {n_tokens} tokens but the student head has "
                         f"{v_student} rows and the teacher head {v_teacher}; real tokens would be cut")
    return min(v_student, v_teacher, n_tokens)


def same_vocabulary(tokenizer_a: Any, tokenizer_b: Any) -> bool:
    """True when two tokenizers map every token string to the same id (so one tokenization serves both)."""
    if tokenizer_a is tokenizer_b:
        return True
    return len(tokenizer_a) == len(tokenizer_b) and tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
