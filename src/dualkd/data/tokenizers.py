"""Train a BPE tokenizer on a corpus (for models trained from scratch, tests and the demo).

    tok = train_tokenizer(texts, vocab_size=1024, style="byte_level")   # GPT-2-like, spaces as Ġ
    tok = train_tokenizer(texts, vocab_size=700, style="metaspace")     # SentencePiece-like, spaces as ▁

The result is a transformers fast tokenizer with EOS/BOS/PAD tokens and a small chat template, so it works
with every data format, gives character offsets, and round-trips through save_pretrained/AutoTokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, style: Literal["byte_level", "metaspace"] = "byte_level"
) -> PreTrainedTokenizerFast:
    specials = [EOS, PAD, *CHAT_SPECIALS]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=style == "metaspace"))
    if style == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                     prepend_scheme="first")])
        # byte-fallback pieces so that any character can be encoded, as in SentencePiece models
        alphabet = []
        specials = specials + [f"<0x{b:02X}>" for b in range(256)]
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast
