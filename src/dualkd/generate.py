"""Batched, KV-cached generation, a core service (evaluation, on-policy sampling, SeqKD, preference data):
the papers' sampling protocol, greedy, or beam search.

    model, tokenizer = load_for_generation("runs/kd/final")
    texts = generate_responses(model, tokenizer, examples, GenerationConfig(), seed=10)

Prompts are tokenized exactly as in training (data/dataset.py: leading BOS where the tokenizer adds one,
chat templates, prompt truncation to `max_prompt_length` keeping the start), left-padded, and decoded with
Hugging Face `generate` (KV cache). Batches are built from prompts of similar length, in a fixed order, so a
seed fixes the samples. Decoder-only models get `max_length - max_prompt_length` new tokens at most (512 - 256
= 256 under the protocol, as MiniLLM/DSKD, whose prompts were left-padded to 256); encoder-decoder models read
the prompt as the source sentence.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from dualkd.atomic import atomic_open
from dualkd.data.dataset import TruncationRules, pad_id, seq2seq_source_ids, tokenize_examples
from dualkd.data.formats import Example
from dualkd.errors import DataError, ModelError
from dualkd.lm import is_seq2seq
from dualkd.models import load_folder
from dualkd.progress import ProgressLines
from dualkd.schema import StrictModel


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



def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, or a run directory (its `best/` model if training kept one, else `final/`)."""
    path = Path(path).expanduser()
    for candidate in (path, path / "best", path / "final"):
        if (candidate / "config.json").exists():
            return candidate
    raise ModelError(f"{path}: no model here (expected a folder with config.json, or a run directory with "
                     "best/ or final/)")


def load_for_generation(path: str | Path, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a local folder or run directory (its `best/` or `final/` model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars: ours say what is being done
    folder = resolve_model_dir(path)
    model, tokenizer = load_folder(folder, dtype, field=str(folder))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer


def prompt_ids(examples: list[Example], tokenizer: Any, settings: GenerationConfig) -> list[list[int]]:
    """The prompt tokens of decoder-only examples, exactly as training tokenizes them (truncation included)."""
    rules = TruncationRules(max_length=settings.max_length, max_prompt_length=settings.max_prompt_length)
    out = []
    for tok in tokenize_examples(examples, tokenizer, rules):
        if isinstance(tok, DataError):
            raise tok
        out.append(tok.ids[: tok.prompt_len])
    return out


def _progress(total: int, label: str, show: bool | None) -> Progress:
    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True,
                        disable=not (console.is_terminal if show is None else show))
    progress.add_task(label, total=total)
    return progress


@contextmanager
def _padding_warning_off() -> Iterator[None]:
    """Mute transformers' "We strongly recommend passing in an `attention_mask`" for one `generate` call."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def sampling_state(model: nn.Module, seed: int | None, device: torch.device) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration, on a forked RNG seeded with `seed`: the
    model's train/eval flags and the caller's RNG streams are exactly as before afterwards, so a training
    run that samples (on-policy) draws the same dropout masks as one that does not."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def model_positions(model: nn.Module) -> int | None:
    """How many positions the model's (decoder's) position embeddings cover (None: no fixed limit known)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_target_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_capped_notes: set[tuple[int, int]] = set()


def fit_to_positions(settings: GenerationConfig, model: nn.Module, longest_prompt: int, encoder_decoder: bool
                     ) -> GenerationConfig:
    """`settings` with max_length (and max_new_tokens) capped at the model's positions, said once per
    (limit, asked) pair; a prompt that alone fills the positions is refused before generating."""
    limit = model_positions(model)
    if limit is None:
        return settings
    if not encoder_decoder and longest_prompt >= limit:
        raise ModelError(f"a prompt of {longest_prompt} tokens fills the model's {limit} positions and leaves no "
                         f"room to generate: set generation.max_prompt_length (now {settings.max_prompt_length}) "
                         f"below {limit}")
    changes: dict[str, int] = {}
    if settings.max_length > limit:
        changes["max_length"] = limit
    if settings.max_new_tokens is not None and settings.max_new_tokens > limit:
        changes["max_new_tokens"] = limit
    if not encoder_decoder and settings.max_prompt_length >= min(limit, settings.max_length):
        changes["max_prompt_length"] = min(limit, settings.max_length) // 2
    if not changes:
        return settings
    if (limit, settings.max_length) not in _capped_notes:
        _capped_notes.add((limit, settings.max_length))
        print(f"[dualkd] note: the model has {limit} positions; generation capped at "
              + ", ".join(f"{k} {v}" for k, v in changes.items()), file=sys.stderr, flush=True)
    return settings.model_copy(update=changes)


def sample_token_ids(model: nn.Module, prompts: list[list[int]], settings: GenerationConfig, pad_id: int,
                     eos_id: int | None, seed: int | None = None, label: str = "generating",
                     progress: bool | None = False, keep_eos: bool = False) -> list[list[int]]:
    """Continuations of token-id prompts (in order), cut before EOS (`keep_eos`: just after it), with Hugging
    Face `generate` in batches of similar prompt length (KV cache; decoder prompts left-padded, encoder
    sources right-padded). Under FSDP or DeepSpeed ZeRO-3, `generate` gathers the sharded parameters itself
    (`synced_gpus`): every process must then call this with the same number of prompts."""
    if not prompts:
        return []
    encoder_decoder = is_seq2seq(model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # similar lengths share a batch
    settings = fit_to_positions(settings, model, max(len(p) for p in prompts), encoder_decoder)
    new_tokens = settings.max_new_tokens or (
        settings.max_length if encoder_decoder else settings.max_length - settings.max_prompt_length)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                "top_k": settings.top_k} if settings.do_sample else {"do_sample": False, "temperature": None,
                                                                         "top_p": None, "top_k": None}
    outputs: list[list[int]] = [[] for _ in prompts]
    lines = ProgressLines(len(prompts), label, progress)
    with sampling_state(model, seed, device), _progress(len(prompts), label, progress) as bar:
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                if encoder_decoder:  # the encoder reads right-padded sources
                    ids[row, : len(p)], mask[row, : len(p)] = torch.tensor(p), 1
                else:  # the decoder continues left-padded prompts
                    ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
            budget = new_tokens if encoder_decoder else min(new_tokens, settings.max_length - width)
            with _padding_warning_off():  # the mask is given; transformers' decoding steps still warn
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=budget, num_beams=settings.num_beams,
                                     no_repeat_ngram_size=settings.no_repeat_ngram_size, pad_token_id=pad_id,
                                     eos_token_id=eos_id, **sampling)
            continuation = gen if encoder_decoder else gen[:, width:]
            for row, i in enumerate(idx):
                tokens = continuation[row].tolist()
                if encoder_decoder and tokens and tokens[0] == model.config.decoder_start_token_id:
                    tokens = tokens[1:]
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id) + int(keep_eos)]
                outputs[i] = tokens
            bar.advance(bar.task_ids[0], len(idx))
            lines.advance(len(idx))
    return outputs


def generate_responses(model: Any, tokenizer: Any, examples: list[Example], settings: GenerationConfig,
                       seed: int | None = None, label: str = "generating", progress: bool | None = None
                       ) -> list[str]:
    """One response text per example (in order), cut at EOS, special tokens removed."""
    if is_seq2seq(model):
        # a source sentence is encoded the way seq2seq models are trained on it: with the tokenizer's own
        # special tokens (Marian/T5 end it with </s>)
        prompts = seq2seq_source_ids(tokenizer, [ex.prompt or "" for ex in examples], settings.max_prompt_length)
    else:
        prompts = prompt_ids(examples, tokenizer, settings)
    ids = sample_token_ids(model, prompts, settings, pad_id(tokenizer),
                           tokenizer.eos_token_id, seed=seed, label=label, progress=progress)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids]


def write_generated_dataset(examples: list[Example], texts: list[str], path: str | Path) -> tuple[int, int]:
    """Write the generations as a training set (SeqKD: a teacher's outputs replace the references): text records
    as `prompt`/`output` (the original references kept under `references`), chat records as `messages` with the
    generated final turn. Empty generations are left out. Returns (written, left out)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = empty = 0
    with atomic_open(out) as f:
        for ex, text in zip(examples, texts):
            if not text.strip():
                empty += 1
                continue
            if ex.messages is not None:
                record = {"messages": [*ex.messages[:-1], {"role": "assistant", "content": text}]}
            else:
                record = {"prompt": ex.prompt, "output": text, "references": list(ex.references)}
            f.write(json.dumps({**record, "source": ex.where}, ensure_ascii=False) + "\n")
            written += 1
    return written, empty
