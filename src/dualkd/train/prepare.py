"""What a run makes before its parts are built: the training examples (SeqKD: the teacher's outputs, generated
once and saved) and the student's tokenizer (trained once from the data when asked, saved in the run folder).
Both are written by the main process and read back by every process, and by a resumed run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from dualkd.config import RunConfig
from dualkd.data.formats import Example
from dualkd.data.readers import LoadReport, load_examples
from dualkd.models import load_tokenizer
from dualkd.train.seqkd import seqkd_examples


@dataclass
class Prepared:
    train_examples: list[Example]
    train_report: LoadReport
    dev_examples: list[Example] | None
    dev_report: LoadReport | None
    student_tokenizer: Any


def prepare_run(cfg: RunConfig, run_dir: Path, engine: Any) -> Prepared:
    """Load (SeqKD: first generate) the examples and load (or first train) the student's tokenizer."""
    data = cfg.data
    if cfg.source.kind == "seqkd":  # the teacher's outputs replace the references
        train_examples, train_report = seqkd_examples(cfg, run_dir, engine)
    else:
        train_examples, train_report = load_examples(data.train, data.format, data.on_error, data.max_examples,
                                                     data.translation_pair)
    dev_examples, dev_report = (None, None)
    if data.dev is not None:
        dev_examples, dev_report = load_examples(data.dev, data.format, data.on_error, data.dev_max_examples,
                                                 data.translation_pair)
    tokenizer = _student_tokenizer(cfg, run_dir, engine, train_examples)
    return Prepared(train_examples, train_report, dev_examples, dev_report, tokenizer)


def training_texts(examples: list[Example], separate: bool = False) -> Iterable[str]:
    """Raw text of the training data, for training a tokenizer from scratch: prompt + response as one text, or
    as two (`separate`: the two sides of a sentence pair, which no merge should cross)."""
    for ex in examples:
        if ex.messages is not None:
            yield from (m["content"] for m in ex.messages)
        elif separate:
            yield from (ex.prompt or "", ex.response)
        else:
            yield (ex.prompt or "") + ex.response


def _student_tokenizer(cfg: RunConfig, run_dir: Path, engine: Any, examples: list[Example]) -> Any:
    """Load the student's tokenizer; a tokenizer trained from the data is trained once (main process), saved in
    the run directory and read back by every process, and by a resumed run."""
    if cfg.student.train_tokenizer is None:
        return load_tokenizer(cfg.student)
    saved = run_dir / "tokenizer"
    if engine.is_main and not (saved / "tokenizer.json").exists():
        pairs = cfg.data.translation is not None
        tokenizer = load_tokenizer(cfg.student, train_texts=lambda: training_texts(examples, separate=pairs))
        tokenizer.save_pretrained(saved)
    engine.barrier()
    return AutoTokenizer.from_pretrained(saved)
