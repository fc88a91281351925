"""Test sets: a jsonl file in any format the data loaders read, a translation file of language pairs, or the
named suite of the DSKD/MiniLLM instruction-following protocol.

    sets, missing = resolve_test_sets(suite="dolly-protocol", data_dir="data")
    sets, _ = resolve_test_sets(paths=["my_test.jsonl"])
    sets, _ = resolve_test_sets(paths=["mt/multi30k_en_de/test_2016_flickr.jsonl"], translation=("de", "en"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dualkd.data.config import DataSource
from dualkd.data.formats import Example
from dualkd.data.readers import load_examples
from dualkd.errors import DataError


@dataclass(frozen=True)
class TestSet:
    name: str
    path: str
    examples: list[Example]
    metrics: tuple[str, ...]


# name -> (file under the data directory, line cap): the official DSKD code's GPT-2 evaluation script (run_eval.sh)
DOLLY_PROTOCOL: dict[str, tuple[str, int | None]] = {
    "dolly": ("dolly/test.jsonl", None),
    "self_inst": ("self_inst/test.jsonl", None),
    "vicuna": ("vicuna/test.jsonl", None),
    "sinst": ("sinst/test.jsonl", None),
    "uinst": ("uinst/test.jsonl", 10_000),  # UnNI: the papers read the first 10,000 lines
}
SUITES = {"dolly-protocol": DOLLY_PROTOCOL}
INSTRUCTION_METRICS = ("rougeL", "exact_match")
TRANSLATION_METRICS = ("bleu", "chrf")


def read_translation_pairs(path: Path, source: str, target: str, max_examples: int | None = None) -> list[Example]:
    """`{"de": ..., "en": ...}` lines as examples whose prompt is the source sentence and reference the target."""
    examples, _ = load_examples(DataSource(path=str(path)), max_examples=max_examples, translation=(source, target))
    return examples


def resolve_test_sets(paths: Sequence[str | Path] = (), suite: str | None = None, data_dir: str | Path | None = None,
                      translation: tuple[str, str] | None = None, max_examples: int | None = None
                      ) -> tuple[list[TestSet], dict[str, str]]:
    """The test sets to evaluate and, for a suite, {name: why it is missing} for sets whose file is absent."""
    sets: list[TestSet] = []
    missing: dict[str, str] = {}
    if suite is not None:
        if suite not in SUITES:
            raise DataError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
        if data_dir is None:
            raise DataError(f"suite {suite!r} needs --data-dir (the folder holding dolly/, self_inst/, ...)")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-dir {root}: not a directory")
        for name, (rel, cap) in SUITES[suite].items():
            path = root / rel
            if not path.exists():
                missing[name] = f"{path} not found"
                continue
            limit = cap if max_examples is None else min(cap or max_examples, max_examples)
            examples, _ = load_examples(DataSource(path=str(path)), max_examples=limit)
            sets.append(TestSet(name, str(path), examples, INSTRUCTION_METRICS))
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise DataError(f"test file {path} not found")
        name = path.stem if path.stem not in ("test", "valid") else path.parent.name
        if translation is not None:
            examples = read_translation_pairs(path, *translation, max_examples=max_examples)
            sets.append(TestSet(name, str(path), examples, TRANSLATION_METRICS))
        else:
            examples, _ = load_examples(DataSource(path=str(path)), max_examples=max_examples)
            sets.append(TestSet(name, str(path), examples, INSTRUCTION_METRICS))
    if not sets:
        raise DataError("no test set to evaluate: give test files, or --suite with a --data-dir that holds them"
                        + (f" (missing: {'; '.join(missing.values())})" if missing else ""))
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise DataError(f"two test sets share a name: {names}; rename a file")
    return sets, missing
