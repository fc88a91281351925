"""Loading tokenizers and models: local folders, hub ids, GGUF files, random init, merged adapters.

Security defaults: `trust_remote_code` only when the config says so; weights from safetensors only (GGUF
files go through transformers' own GGUF reader).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualkd.data.tokenizers import train_tokenizer
from dualkd.errors import ModelError, first_line
from dualkd.lm import config_is_seq2seq
from dualkd.models.config import DTYPES, ModelConfig
from dualkd.models.lora import apply_lora, merge_adapter


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
                         f"{first_line(e)}") from None


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
        raise ModelError(f"cannot read the model config of {where!r}: {type(e).__name__}: {first_line(e)}") from None
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
        raise ModelError(f"{field}: cannot load the {role} from {where!r}: {type(e).__name__}: {first_line(e)}"
                         ) from None

    rows = model.get_input_embeddings().num_embeddings  # the module's count: ZeRO-3 partitions the weight
    if rows < len(tokenizer):
        raise ModelError(f"{role}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows; they do not belong together")
    if spec.adapter:
        model = merge_adapter(model, spec.adapter, role)
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



def load_folder(path: str | Path, dtype: str = "float32", field: str = "model") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a saved Hugging Face folder, the model frozen (eval mode, no gradients): what
    generation, evaluation and pruning read. `load_model` with the folder as model and tokenizer; `field`
    names the folder in messages."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ModelError(f"{folder}: no safetensors weights" + (f" (found {', '.join(found)})" if found else "")
                         + "; dualkd loads weights from safetensors only. Convert them with transformers: "
                           "AutoModel.from_pretrained(folder).save_pretrained(folder) in a trusted session")
    spec = ModelConfig(path=str(folder), dtype=dtype)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(spec, field=field)
    return freeze(load_model(spec, tokenizer, role="model", field=field)), tokenizer
