"""Depth pruning: keep some of a decoder's blocks and write the smaller model as a Hugging Face folder.

The starting point of a prune-and-distill run (Minitron: Sreenivas et al. 2024, arXiv 2408.11796; Muralidharan
et al. 2024, arXiv 2407.14679): a model with most of its blocks removed keeps its embeddings, head and the
surviving blocks' weights but starts broken, and a teacher then has much to teach it.

    dualkd prune ~/.cache/dualkd-real/smollm2-135m-instruct --keep 6 --out runs/smollm2-135m-6l

`--keep K` keeps K evenly spaced blocks, always the first and the last (the ones depth-pruning studies find
least removable); `--layers 0,5,11` names them. The pruned model is built from its own config (the source's
with the layer count, and any per-layer list such as Gemma-3's `layer_types`, cut to the kept blocks) and
loaded strictly from the source's renamed weights, so every block knows its new index (the KV cache is
indexed by it) and nothing is left uninitialized. `pruned.json` in the folder records the source and the
kept blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualkd.atomic import write_text_atomic
from dualkd.errors import ConfigError, ModelError
from dualkd.models import export_model, load_folder
from dualkd.outputs import claim

# per-layer lists of a config (one entry per block) that are cut with the blocks
PER_LAYER_FIELDS = ("layer_types",)


def evenly_spaced(num_layers: int, keep: int) -> list[int]:
    """`keep` block indices spread over `num_layers`, the first and the last included: 30, 6 -> 0 6 12 17 23 29."""
    if not 1 <= keep <= num_layers:
        raise ConfigError(f"--keep: {keep} blocks asked of a model with {num_layers}; choose 1..{num_layers}")
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of blocks: the one `ModuleList` holding `config.num_hidden_layers` modules (Llama's
    `model.layers`, GPT-2's `transformer.h`, Gemma-3's `model.layers`)."""
    n = model.config.num_hidden_layers
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(stacks) != 1:
        found = ", ".join(name for name, _ in stacks) or "none"
        raise ModelError(f"cannot tell which module list holds the {n} blocks of this "
                         f"{type(model).__name__} (candidates: {found}); only decoder-only models are pruned")
    return stacks[0]


def pruned_config(config: Any, layers: list[int]) -> Any:
    """A copy of `config` with `len(layers)` blocks and its per-layer lists cut to them."""
    new = config.__class__.from_dict(config.to_dict())
    new.num_hidden_layers = len(layers)
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(new, name, [values[i] for i in layers])
    return new


def prune_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """A new model of the same class holding only `layers` (source indices, increasing) of `model`'s blocks."""
    n = model.config.num_hidden_layers
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= n:
        raise ConfigError(f"--layers: {layers} must be increasing block indices in 0..{n - 1}")
    prefix, _ = layer_stack(model)
    new_index = {old: new for new, old in enumerate(layers)}
    block = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        m = block.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{key[m.end():]}"] = value
    dtype = next(model.parameters()).dtype
    pruned = type(model)(pruned_config(model.config, layers)).to(dtype)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    # tied heads are one tensor under two names: a source that lists only one of them still fills both
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(pruned.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ModelError(f"pruning left weights unmatched: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.eval()


def prune_folder(source: str | Path, out: str | Path, keep: int | None = None,
                 layers: list[int] | None = None, overwrite: bool = False) -> Path:
    """Load a causal LM folder (safetensors), keep `layers` (or `keep` evenly spaced blocks) and write the pruned
    model with the source's tokenizer to `out`; returns `out`. `out` must be new, empty or an earlier pruned
    model, unless `overwrite`; never the source or a folder holding it (outputs.py)."""
    if (keep is None) == (layers is None):
        raise ConfigError("prune: give either --keep K or --layers I,J,...")
    source = Path(source).expanduser()
    if not (source / "config.json").is_file():
        raise ModelError(f"prune: {source} is not a model folder (no config.json)")
    claim(out, "model", overwrite=overwrite, source=source)  # before minutes of loading
    model, tokenizer = load_folder(source, dtype="auto", field="prune")
    n = model.config.num_hidden_layers
    chosen = evenly_spaced(n, keep) if keep is not None else list(layers or [])
    pruned = prune_layers(model, chosen)
    out = export_model(pruned, tokenizer, out, overwrite=True)  # claimed above
    params = sum(p.numel() for p in pruned.parameters())
    write_text_atomic(out / "pruned.json", json.dumps(
        {"source": str(source), "source_layers": n, "kept_layers": chosen, "parameters": params}, indent=2))
    return out
