"""`dualkd likelihood`: a model's cross-entropy on reference responses, per token and in bits per byte.

    result = response_likelihood(model, tokenizer, examples)   # {"ce_per_token": ..., "bits_per_byte": ...}

CE per token = Σ −ln p(token) over every response token and the EOS, ÷ their count: the loop's dev CE, but
it depends on the tokenizer (a tokenizer with longer pieces has fewer, harder tokens). Bits per byte =
the same sum ÷ (ln 2 × the UTF-8 bytes of the response texts): the cost of the same text under any
tokenizer, so students and teachers with different vocabularies compare on one scale (the EOS's cost is
counted; it has no bytes of its own). Sequences are never cut: an example longer than the model's positions
is refused by name, so every model is scored on every byte of the same responses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dualkd.data.collate import pad_batch
from dualkd.data.dataset import TruncationRules, pad_id, tokenize_examples
from dualkd.data.formats import Example
from dualkd.errors import DataError
from dualkd.lm import response_logprobs
from dualkd.progress import ProgressLines


def response_likelihood(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8,
                        progress: bool | None = None) -> dict[str, float]:
    """CE per response token (nats), bits per byte and the counts behind them, over `examples`."""
    positions = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    tokenized = tokenize_examples(list(examples), tokenizer, TruncationRules(positions + 1, None))
    for ex, item in zip(examples, tokenized):
        if isinstance(item, DataError):
            if "leaves no room for a response" in str(item):  # the data's message names training's setting
                raise DataError(f"{ex.where}: the prompt alone is longer than the model's {positions} positions; "
                                "likelihoods are computed on whole examples (this command truncates nothing)")
            raise item
        if len(item.ids) > positions:
            raise DataError(f"{ex.where}: {len(item.ids)} tokens, more than the model's {positions} positions; "
                            "likelihoods are computed on whole responses")
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].ids))  # similar lengths batch together
    nats = 0.0
    tokens = 0
    device = next(model.parameters()).device
    bar = ProgressLines(len(order), "likelihood (examples)", progress)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            items = [tokenized[i] for i in order[start:start + batch_size]]
            batch = pad_batch(items, pad_id(tokenizer)).to(device)
            nats -= float(response_logprobs(model, batch).double().sum())
            tokens += batch.num_loss_tokens
            bar.advance(len(items))
    n_bytes = sum(len(item.text[item.prompt_chars:].encode("utf-8")) for item in tokenized)
    return {"ce_per_token": nats / max(tokens, 1), "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
            "response_tokens": tokens, "response_bytes": n_bytes, "examples": len(tokenized)}
