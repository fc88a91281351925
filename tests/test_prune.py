"""Depth pruning (`dualkd prune`): the pruned model computes what the source's kept blocks compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dualkd.cli import main
from dualkd.errors import ConfigError
from dualkd.prune import evenly_spaced, layer_stack, prune_folder, prune_layers
from tests.helpers import make_model_dir


def test_evenly_spaced_keeps_first_and_last() -> None:
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1) == [0]
    with pytest.raises(ConfigError, match="--keep: 8 blocks asked of a model with 7"):
        evenly_spaced(7, 8)


def _skipping_twin(model: nn.Module, layers: list[int]) -> nn.Module:
    """The naive twin: the source model itself with its block list (and per-layer attention types) cut to
    `layers`, no renaming, no new config; right for a forward without a KV cache."""
    _, blocks = layer_stack(model)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    kept = [blocks[i] for i in layers]
    blocks._modules.clear()
    for i, block in enumerate(kept):
        blocks.add_module(str(i), block)
    return model


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_pruned_folder_equals_the_kept_blocks(tmp_path: Path, byte_tokenizer_dir: Path, model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    layers_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    source = make_model_dir(tmp_path / "src", byte_tokenizer_dir, model_type, seed=3, **{layers_key: 5})
    out = prune_folder(source, tmp_path / "pruned", layers=[0, 2, 4])
    info = json.loads((out / "pruned.json").read_text())
    assert info["kept_layers"] == [0, 2, 4] and info["source_layers"] == 5

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.num_hidden_layers == 3
    twin = _skipping_twin(AutoModelForCausalLM.from_pretrained(source).eval(), [0, 2, 4])
    ids = torch.randint(5, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(ids, use_cache=False).logits, twin(ids, use_cache=False).logits, atol=1e-6)
        # greedy decoding with the pruned model's KV cache (indexed by the new block numbers) == the twin's
        # step-by-step recomputation without a cache
        generated = pruned.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids[:1]
        for _ in range(6):
            seq = torch.cat([seq, twin(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_per_layer_config_lists_are_cut(byte_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    vocab = len(AutoTokenizer.from_pretrained(byte_tokenizer_dir))
    types = ["sliding_attention", "full_attention"] * 3
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, layer_types=types,
                              sliding_window=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    pruned = prune_layers(model, [0, 1, 5])
    assert pruned.config.layer_types == ["sliding_attention", "full_attention", "full_attention"]
    twin = _skipping_twin(model, [0, 1, 5])
    ids = torch.randint(5, vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(pruned(ids, use_cache=False).logits, twin(ids, use_cache=False).logits, atol=1e-5)


def test_bad_layers_are_refused(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    source = make_model_dir(tmp_path / "src", byte_tokenizer_dir, "llama", num_hidden_layers=3)
    with pytest.raises(ConfigError, match="increasing block indices in 0..2"):
        prune_folder(source, tmp_path / "out", layers=[2, 1])
    with pytest.raises(ConfigError, match="either --keep K or --layers"):
        prune_folder(source, tmp_path / "out")


def test_cli_prune(tmp_path: Path, byte_tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    source = make_model_dir(tmp_path / "src", byte_tokenizer_dir, "llama", num_hidden_layers=4)
    assert main(["prune", str(source), "--keep", "2", "--out", str(tmp_path / "out")]) == 0
    assert "2 of 4 blocks kept [0, 3]" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()
