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


def _taken(labeled: list[Path]) -> set[str]:
    return {_key(json.loads(line)) for path in labeled for line in path.read_text().splitlines() if line.strip()}


def outputs(record: dict[str, Any]) -> list[str]:
    """A generated record's valid answers (the first is the one trained on)."""
    return record["output"] if isinstance(record["output"], list) else [record["output"]]


def _segments(record: dict[str, Any], rng: random.Random, inputs: bool = True) -> list[str]:
    """One answer of the record (of its valid answers, at random) and, with `inputs`, its input if it has one."""
    found = [line[len("### Input: "):] for line in record["prompt"].splitlines() if line.startswith("### Input: ")]
    return [rng.choice(outputs(record)), *(found if inputs else [])]


def pretraining_corpus(n_records: int, labeled: list[Path], seed: int = SEED, prompt_documents: bool = False,
                       segments_per_document: int = SEGMENTS_PER_DOCUMENT, inputs: bool = True,
                       paired: bool = False, repeats: int = 0) -> list[dict[str, str]]:
    """Documents ({"prompt": "", "output": text}: a plain LM's records) from `n_records` generated records
    that equal no record of the `labeled` files (jsonl): `segments_per_document` shuffled segments each (a
    record's answer and, with `inputs`, its input), then `repeats` of them again, verbatim (text recurs, as
    names and phrases recur in natural text: what teaches a language model to copy from its context).
    `paired`: one record per document instead, its input (if any) on a line before its answer, without the
    instruction or the template (half a label: the answer follows the words it is made of, but nothing says
    which task made it). `prompt_documents`: also each record's prompt (template, instruction and input,
    without any answer) as a document of its own. The variants were compared on dev (pretraining_search.py;
    the recorded setting, `bench.PRETRAIN_CORPUS`, and why: README.md here)."""
    taken = _taken(labeled)
    rng = random.Random(seed)
    records = [r for r in generate("instructions", n_records, seed) if _key(r) not in taken]
    if paired:
        return [{"prompt": "", "output": "\n".join(reversed(_segments(r, rng)))} for r in records]
    segments = [s for r in records for s in _segments(r, rng, inputs)]
    rng.shuffle(segments)  # no answer stays next to its own input
    k = segments_per_document
    groups = [segments[i:i + k] for i in range(0, len(segments) - k + 1, k)]
    docs = [" ".join(g + rng.sample(g, repeats)) for g in groups]
    if prompt_documents:
        docs += [r["prompt"] for r in generate("instructions", n_records, seed + 1) if _key(r) not in taken]
        rng.shuffle(docs)
    return [{"prompt": "", "output": d} for d in docs]
