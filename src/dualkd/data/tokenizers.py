"""Train a BPE tokenizer on a corpus (for models trained from scratch, tests and the demo).

    tok = train_tokenizer(texts, vocab_size=1024, style="byte_level")   # GPT-2-like, spaces as Ġ
    tok = train_tokenizer(texts, vocab_size=700, style="metaspace")     # SentencePiece-like, spaces as ▁
    texts = corpus_texts(["train.jsonl"], fields=["de", "en"])          # a shared tokenizer for both sides

The result is a transformers fast tokenizer with EOS/BOS/PAD tokens and a small chat template, so it works
with every data format, gives character offsets, and round-trips through save_pretrained/AutoTokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dualkd.data.config import DataSource
from dualkd.data.readers import iter_raw_records, load_examples
from dualkd.errors import DataError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, style: Literal["byte_level", "metaspace"] = "byte_level",
    show_progress: bool = False,
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
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=show_progress
    )
    tok.train_from_iterator(texts, trainer)
    if style == "metaspace":
        tok = _byte_pieces_as_ordinary_tokens(tok)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_pieces_as_ordinary_tokens(tok: Tokenizer) -> Tokenizer:
    """The trainer puts the `<0xNN>` byte pieces into the vocabulary (where byte fallback finds them) as special
    tokens; as special tokens, `decode(..., skip_special_tokens=True)` would drop every character the
    tokenizer saw no merge for ('Ü 東京' -> ' 京'). Keep them in the vocabulary, not among the added tokens."""
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not _BYTE_PIECE.fullmatch(t["content"])]
    return Tokenizer.from_str(json.dumps(spec))


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def corpus_texts(paths: Sequence[str | Path], fields: Sequence[str] | None = None,
                 max_examples: int | None = None) -> list[str]:
    """Texts of jsonl files for tokenizer training: the named string fields of each record (e.g. both sides of
    a parallel corpus), or, without `fields`, each example's prompt and responses in any supported format."""
    texts: list[str] = []
    for path in paths:
        source = DataSource(path=str(path))
        if fields:
            for n, (where, obj) in enumerate(iter_raw_records(source)):
                if max_examples is not None and n >= max_examples:
                    break
                if isinstance(obj, Exception):
                    raise obj
                for f in fields:
                    value = obj.get(f) if isinstance(obj, dict) else None
                    if not isinstance(value, str):
                        raise DataError(f"{where}: field '{f}' is missing or not a string")
                    texts.append(value)
        else:
            examples, _ = load_examples(source, max_examples=max_examples)
            for ex in examples:
                if ex.messages is not None:
                    texts.extend(turn["content"] for turn in ex.messages)
                else:
                    texts.extend([ex.prompt or "", *ex.references])
    return texts
