"""Read records from a jsonl file, a Hugging Face `datasets` source or a synthetic task.

Every problem is a DataError that names the file and line (or dataset row) and the field. With
`on_error="skip"` bad records are skipped and counted in a `LoadReport`; nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualkd.data import synthetic
from dualkd.data.config import DataSource
from dualkd.data.formats import Example, Format, parse_record
from dualkd.errors import DataError


@dataclass
class Truncation:
    """What tokenization cut, for one tokenizer."""

    prompts: int = 0
    """Prompts longer than data.max_prompt_length, cut to it."""
    sequences: int = 0
    """prompt + response longer than data.max_length: the response's end was cut."""
    cues: int = 0
    """Cut prompts that lost their last line: the template's answer cue (`### Response:`, `<|assistant|>`)."""
    cue_example: str = ""

    def __bool__(self) -> bool:
        return bool(self.prompts or self.sequences)

    def summary(self, examples: int) -> str:
        parts = [f"{n} of {examples} {what}" for n, what in ((self.prompts, "prompts cut to data.max_prompt_length"),
                                                             (self.sequences, "sequences cut to data.max_length"))
                 if n]
        return "; ".join(parts)


@dataclass
class LoadReport:
    """What was read, what was skipped (with `on_error: skip`) and what tokenization cut."""

    source: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # one error message per skipped record
    truncated: dict[str, Truncation] = field(default_factory=dict)  # per tokenizer: "student", "teacher"

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} examples"
        if not self.skipped:
            return text
        reasons = Counter(msg.split(": ", 1)[-1].split(":")[0] for msg in self.skipped)
        top = ", ".join(f"{n}x {r}" for r, n in reasons.most_common(3))
        return f"{text}, SKIPPED {len(self.skipped)} bad records ({top}); first: {self.skipped[0]}"

    def warnings(self) -> list[str]:
        """What the user must hear about the data even when nothing was skipped."""
        out = []
        for who, cut in self.truncated.items():
            if cut.cues:
                out.append(f"{self.source}: {cut.cues} of {self.kept} {who} prompts lost their last line to "
                           f"truncation (e.g. {cut.cue_example!r}), the cue after which the answer starts; "
                           "raise data.max_prompt_length or set data.prompt_truncation: keep_end")
        return out


def iter_raw_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    """Yield (where, decoded JSON object). Decoding errors are raised as DataError carrying `where`."""
    if source.path is not None:
        yield from _iter_jsonl(Path(source.path))
    elif source.hf is not None:
        yield from _iter_hf(source)
    else:
        assert source.synthetic is not None
        for i, record in enumerate(synthetic.generate(source.synthetic, source.num_examples, source.seed)):
            yield f"{source.describe()}#{i}", record


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice in one object is an error (json.loads keeps the last silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def decode_line(text: str, where: str) -> Any:
    """One JSON record, or the DataError that says what is wrong with it (column, duplicate key, depth)."""
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as e:
        end = " (the end of the line: a truncated record?)" if e.pos >= len(text.rstrip()) else ""
        return DataError(f"{where}: invalid JSON at column {e.colno}{end}: {e.msg}")
    except _DuplicateKey as e:
        return DataError(f"{where}: field '{e.args[0]}' appears twice in one object (which one is meant?)")
    except RecursionError:
        return DataError(f"{where}: invalid JSON: nested too deeply to read")
    except ValueError as e:  # Python's limit on integer digits (4,300)
        return DataError(f"{where}: invalid JSON: {str(e).split(';')[0]}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):  # written by some Windows editors: not data
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) hold no record
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"{where}: undecodable bytes: invalid UTF-8 at byte offset {e.start} of the line"
                yield where, DataError(msg)
                continue
            yield where, decode_line(text.rstrip("\r\n"), where)  # without the newline, an error stays on its line


def _iter_hf(source: DataSource) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("the `datasets` package is needed for `hf` data sources") from e
    name = source.hf
    assert name is not None
    try:
        local = Path(name)
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(name, source.hf_config, split=source.split)
    except Exception as e:  # datasets raises many types (network, missing split, ...)
        raise DataError(f"{source.describe()}: cannot load the dataset: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{source.describe()} row {i}", row


def load_examples(
    source: DataSource, fmt: Format = "auto", on_error: str = "raise", max_examples: int | None = None,
    translation: tuple[str, str] | None = None,
) -> tuple[list[Example], LoadReport]:
    """Parse and validate every record of a source (sentence pairs with `translation` = (source, target))."""
    report = LoadReport(source=source.describe())
    examples: list[Example] = []
    for where, obj in iter_raw_records(source):
        if max_examples is not None and len(examples) >= max_examples:
            break
        try:
            if isinstance(obj, DataError):
                raise obj
            examples.append(parse_record(obj, where, fmt, translation))
        except DataError as e:
            if on_error != "skip":
                raise
            report.skipped.append(str(e))
    report.kept = len(examples)
    if not examples:
        raise DataError(f"{source.describe()}: no usable examples" + (
            f" ({len(report.skipped)} skipped; first: {report.skipped[0]})" if report.skipped else ""))
    return examples, report
