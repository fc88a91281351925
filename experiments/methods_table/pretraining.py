"""The pretrained-student setting's corpus: unlabeled in-domain text, from which each tokenizer's student is
first trained as a plain LM (loss on every token), before any row fine-tunes it on the 600 labeled examples.

What the papers' students bring (GPT-2 or Qwen pretrained on web text) is knowledge of the language, not of the
task: they have seen English sentences, never Dolly's instruction -> answer pairs. The analogue here is the
benchmark's sentences without their pairing: the answers and the inputs of generated records, shuffled across
records and packed into documents with no instruction and no template. A student pretrained on it knows how
answers and word lists read, and which words exist; which instruction asks for which answer is left to the
fine-tuning. The records are drawn with seeds of their own, and any record equal to one of the given files'
(the teacher's and the students' training sets, the dev and the test set) is dropped, so no labeled example,
dev example or test prompt is in the corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from dualkd.data.synthetic import generate

SEED = 21
"""The generator's seed for the corpus's records (the labeled sets use 3, the dev set 2, the test set 4, the
teacher's training set its recipe's)."""
SEGMENTS_PER_DOCUMENT = 4
"""Sentences per document: about 150 characters, inside the students' 64 tokens."""


def _key(record: dict[str, Any]) -> str:
    return json.dumps([record["prompt"], record["output"]], sort_keys=True)


def outputs(record: dict[str, Any]) -> list[str]:
    """A generated record's valid answers (the first is the one trained on)."""
    return record["output"] if isinstance(record["output"], list) else [record["output"]]


def _segments(record: dict[str, Any], rng: random.Random) -> list[str]:
    """One answer of the record (of its valid answers, at random) and its input, if it has one."""
    found = [line[len("### Input: "):] for line in record["prompt"].splitlines() if line.startswith("### Input: ")]
    return [rng.choice(outputs(record)), *found]


def pretraining_corpus(n_records: int, labeled: list[Path], seed: int = SEED, prompt_documents: bool = False
                       ) -> list[dict[str, str]]:
    """Documents ({"prompt": "", "output": text}: a plain LM's records) from `n_records` generated records
    that equal no record of the `labeled` files (jsonl). `prompt_documents`: also each record's prompt
    (template, instruction and input, without any answer) as a document of its own (tried on dev, not the
    recorded setting: README.md here)."""
    taken = {_key(json.loads(line)) for path in labeled for line in path.read_text().splitlines() if line.strip()}
    rng = random.Random(seed)
    segments = [s for r in generate("instructions", n_records, seed) if _key(r) not in taken
                for s in _segments(r, rng)]
    rng.shuffle(segments)  # no answer stays next to its own input
    docs = [" ".join(segments[i:i + SEGMENTS_PER_DOCUMENT])
            for i in range(0, len(segments) - SEGMENTS_PER_DOCUMENT + 1, SEGMENTS_PER_DOCUMENT)]
    if prompt_documents:
        docs += [r["prompt"] for r in generate("instructions", n_records, seed + 1) if _key(r) not in taken]
        rng.shuffle(docs)
    return [{"prompt": "", "output": d} for d in docs]
