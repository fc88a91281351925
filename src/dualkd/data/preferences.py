"""Preference pairs for DPO: each prompt with a chosen and a rejected response, tokenized like any example.

    dataset = make_preference_dataset(examples, report, data_cfg, tokenizer)   # examples with `rejected`
    batch = dataset.collate([0, 5])   # student rows: chosen 0, chosen 5, rejected 0, rejected 5 (2 pairs)

`build_preference_set` makes a preference set from an instruction set offline: the reference response is
`chosen`, a sample from a given (weaker) model is `rejected` (`dualkd preference build`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dualkd.atomic import atomic_open
from dualkd.data.collate import Batch, TokenizedExample, pad_batch
from dualkd.data.config import DataConfig
from dualkd.data.dataset import TruncationRules, pad_id, tokenize_examples
from dualkd.data.formats import Example
from dualkd.data.readers import LoadReport
from dualkd.errors import DataError
from dualkd.generate import GenerationConfig, generate_responses


class PreferenceDataset:
    """Tokenized (chosen, rejected) pairs; `collate` stacks the chosen rows first, then the rejected ones."""

    def __init__(self, examples: list[Example], chosen: list[TokenizedExample], rejected: list[TokenizedExample],
                 student_pad_id: int, pad_to_multiple_of: int | None = None):
        self.examples = examples
        self.chosen, self.rejected = chosen, rejected
        self.student = chosen  # what generation-based evaluation reads (prompts, references)
        self.teacher = None
        self.alignments = None
        self.student_pad_id, self.teacher_pad_id = student_pad_id, None
        self.pad_to_multiple_of = pad_to_multiple_of
        self.lengths = [max(len(c.ids), len(r.ids)) - 1 for c, r in zip(chosen, rejected)]

    def __len__(self) -> int:
        return len(self.chosen)

    def collate(self, indices: list[int]) -> Batch:
        """Rows [0, P) hold the chosen responses of the P pairs, rows [P, 2P) their rejected ones (`pairs_of`)."""
        rows = [self.chosen[i] for i in indices] + [self.rejected[i] for i in indices]
        return Batch(student=pad_batch(rows, self.student_pad_id, self.pad_to_multiple_of), teacher=None,
                     indices=list(indices))


def make_preference_dataset(examples: list[Example], report: LoadReport, cfg: DataConfig, tokenizer: Any
                            ) -> PreferenceDataset:
    """Tokenize both sides of each pair; a pair is usable only when both sides are (same rules as any data)."""
    not_pairs = [ex.where for ex in examples if ex.rejected is None]
    if not_pairs:
        raise DataError(f"{not_pairs[0]}: objective `dpo` needs preference records (`prompt`, `chosen`, "
                        f"`rejected`); {len(not_pairs)} record(s) have no rejected response")
    rules = TruncationRules.from_config(cfg)
    chosen = tokenize_examples(examples, tokenizer, rules)
    rejected = tokenize_examples([ex.rejected_example for ex in examples], tokenizer, rules)
    keep = []
    for i in range(len(examples)):
        error = next((x for x in (chosen[i], rejected[i]) if isinstance(x, DataError)), None)
        if error is None:
            keep.append(i)
        elif cfg.on_error == "skip":
            report.skipped.append(str(error))
        else:
            raise error
    if not keep:
        raise DataError(f"{report.source}: no usable preference pairs")
    report.kept = len(keep)
    return PreferenceDataset([examples[i] for i in keep], [chosen[i] for i in keep],  # type: ignore[misc]
                             [rejected[i] for i in keep], pad_id(tokenizer), cfg.pad_to_multiple_of)


def build_preference_set(examples: list[Example], model: Any, tokenizer: Any, settings: GenerationConfig,
                         out: str | Path, seed: int = 0, progress: bool | None = None) -> tuple[int, int]:
    """Write `prompt`/`chosen`/`rejected` lines: the reference response is chosen, the model's sample for the same
    prompt is rejected. Pairs whose sample is empty or equal to the reference are left out.
    Returns (written, left out)."""
    samples = generate_responses(model, tokenizer, examples, settings, seed=seed, label="rejected responses",
                                 progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = dropped = 0
    with atomic_open(out) as f:
        for ex, sample in zip(examples, samples):
            if not sample.strip() or sample.strip() == ex.response.strip():
                dropped += 1
                continue
            if ex.messages is not None:
                history = list(ex.messages[:-1])
                record = {"chosen": history + [ex.messages[-1]],
                          "rejected": history + [{"role": "assistant", "content": sample}]}
            else:
                record = {"prompt": ex.prompt, "chosen": ex.response, "rejected": sample}
            f.write(json.dumps({**record, "source": ex.where}, ensure_ascii=False) + "\n")
            written += 1
    return written, dropped


def pairs_of(batch: Batch) -> int:
    """The number of preference pairs P of a batch made by `PreferenceDataset.collate` (2P rows)."""
    rows = batch.student.input_ids.shape[0]
    if rows != 2 * len(batch.indices):
        raise DataError(f"not a preference batch: {rows} rows for {len(batch.indices)} examples (expected chosen "
                        "and rejected rows of each pair; the data must be preference pairs)")
    return len(batch.indices)
