"""How two models' vocabularies relate: LM head rows, the rows KD compares, one tokenization for both."""

from __future__ import annotations

from typing import Any

from torch import nn

from dualkd.errors import ModelError


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

