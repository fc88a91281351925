"""Tokenize validated examples for the student (and, when it reads different tokens, the teacher).

Tokenization happens once, before training: every error (a prompt that leaves no room for a response, a
chat template that cannot be masked) is found before the first step. Prompt and response are tokenized
separately, as in DSKD/MiniLLM, with character offsets into `prompt + response`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dualkd.data.collate import Batch, TokenizedExample, pad_batch, pad_seq2seq, stack_alignment
from dualkd.data.config import DataConfig, DataSource
from dualkd.data.formats import Example, render
from dualkd.data.readers import LoadReport, Truncation, load_examples
from dualkd.errors import DataError, ModelError
from dualkd.progress import ProgressLines


@dataclass
class TruncationRules:
    max_length: int
    max_prompt_length: int | None
    prompt_truncation: str = "keep_start"

    @classmethod
    def from_config(cls, cfg: DataConfig) -> TruncationRules:
        return cls(cfg.max_length, cfg.max_prompt_length, cfg.prompt_truncation)


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    return int(pid)


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens this tokenizer puts before any text by default (BOS for Llama/Gemma; none for GPT-2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    if n > 0 and with_special[n:n + len(without)] == without:
        return list(with_special[:n])
    return []


def tokenize_examples(
    examples: list[Example], tokenizer: Any, rules: TruncationRules, cut: Truncation | None = None
) -> list[TokenizedExample | DataError]:
    """One TokenizedExample per example, or the DataError that explains why it cannot be used; `cut` counts
    what truncation removed."""
    cut = cut if cut is not None else Truncation()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; responses must end with one")
    prefix = leading_special_ids(tokenizer)
    rendered: list[tuple[str, str] | DataError] = []
    for ex in examples:
        try:
            rendered.append(render(ex, tokenizer))
        except DataError as e:
            rendered.append(e)
    # text records: literal text, special-token strings in the data are NOT parsed as special tokens;
    # chat records: the template's special tokens must be parsed.
    encoded: dict[int, tuple[Any, Any]] = {}
    for is_chat in (False, True):
        idx = [i for i, r in enumerate(rendered) if not isinstance(r, DataError)
               and (examples[i].messages is not None) == is_chat]
        if not idx:
            continue
        prompts = [rendered[i][0] for i in idx]  # type: ignore[index]
        responses = [rendered[i][1] for i in idx]  # type: ignore[index]
        p = _encode(tokenizer, prompts, split_special=not is_chat)
        r = _encode(tokenizer, responses, split_special=not is_chat)
        for k, i in enumerate(idx):
            encoded[i] = ((p["input_ids"][k], p["offset_mapping"][k]), (r["input_ids"][k], r["offset_mapping"][k]))

    out: list[TokenizedExample | DataError] = []
    for i, ex in enumerate(examples):
        if isinstance(rendered[i], DataError):
            out.append(rendered[i])  # type: ignore[arg-type]
            continue
        prompt, response = rendered[i]  # type: ignore[misc]
        (p_ids, p_off), (r_ids, r_off) = encoded[i]
        is_chat = ex.messages is not None
        p_ids, p_off = list(p_ids), [tuple(o) for o in p_off]
        if not is_chat and prefix:
            p_ids, p_off = prefix + p_ids, [(0, 0)] * len(prefix) + p_off
        if not p_ids:
            bos = tokenizer.bos_token_id
            if bos is None:
                out.append(DataError(f"{ex.where}: field 'prompt' is empty and the tokenizer has no BOS token to "
                                     "start the sequence with"))
                continue
            p_ids, p_off = [bos], [(0, 0)]
        full_prompt = len(p_ids)
        p_ids, p_off = _truncate_prompt(p_ids, p_off, len(prefix) if not is_chat else 0, rules)
        if len(p_ids) < full_prompt:
            cut.prompts += 1
            cue = _last_line(prompt)
            if cue and max((end for _, end in p_off), default=0) < prompt.rstrip().rfind(cue) + len(cue):
                cut.cues += 1
                cut.cue_example = cut.cue_example or cue
        shift = len(prompt)
        r_ids, r_off = list(r_ids), [(s + shift, e + shift) for s, e in r_off]
        if not (is_chat and eos in r_ids):
            r_ids.append(eos)
            r_off.append((shift + len(response), shift + len(response)))
        if len(p_ids) >= rules.max_length:
            field = "messages" if is_chat else "prompt"
            out.append(DataError(
                f"{ex.where}: field '{field}': the prompt is {len(p_ids)} tokens and leaves no room for a response "
                f"within data.max_length={rules.max_length} (set data.max_prompt_length to truncate it)"))
            continue
        if len(p_ids) + len(r_ids) > rules.max_length:
            cut.sequences += 1
        ids = (p_ids + r_ids)[: rules.max_length]
        offsets = (p_off + r_off)[: rules.max_length]
        out.append(TokenizedExample(ids=ids, offsets=offsets, prompt_len=len(p_ids), text=prompt + response,
                                    prompt_chars=len(prompt)))
    return out


def seq2seq_source_ids(tokenizer: Any, texts: list[str], max_length: int | None) -> list[list[int]]:
    """Encoder inputs of an encoder-decoder model: the text with the tokenizer's own special tokens (Marian and
    T5 end a source with </s>), cut to `max_length`. Training and generation both encode sources this way."""
    out = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [list(ids[:max_length]) if max_length else list(ids) for ids in out]


def tokenize_seq2seq(examples: list[Example], tokenizer: Any, rules: TruncationRules,
                     cut: Truncation | None = None) -> list[TokenizedExample | DataError]:
    """Source + target token ids of encoder-decoder examples: `ids` = source ids then target ids (+ EOS),
    `prompt_len` = the source length. The source is cut to `max_prompt_length`, the target to `max_length`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; targets must end with one")
    out: list[TokenizedExample | DataError] = []
    usable = [ex for ex in examples if ex.messages is None]
    whole_sources = seq2seq_source_ids(tokenizer, [ex.prompt or "" for ex in usable], None)  # uncut: counted
    targets = tokenizer(text_target=[ex.response for ex in usable], add_special_tokens=True)["input_ids"]
    k = 0
    for ex in examples:
        if ex.messages is not None:
            out.append(DataError(f"{ex.where}: field 'messages': an encoder-decoder model reads prompt/response or "
                                 "sentence-pair records, not chats"))
            continue
        whole, target = whole_sources[k], list(targets[k])
        source = whole[: rules.max_prompt_length] if rules.max_prompt_length else whole
        k += 1
        if not target or target[-1] != eos:
            target.append(eos)
        if not source:
            out.append(DataError(f"{ex.where}: field 'prompt': the source sentence is empty"))
            continue
        if cut is not None:
            cut.prompts += int(len(source) < len(whole))
            cut.sequences += int(len(target) > rules.max_length)
        target = target[: rules.max_length]
        out.append(TokenizedExample(ids=source + target, offsets=[(-1, -1)] * (len(source) + len(target)),
                                    prompt_len=len(source), text=ex.response, prompt_chars=0))
    return out


def _encode(tokenizer: Any, texts: list[str], split_special: bool) -> Any:
    try:
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                         split_special_tokens=split_special)
    except NotImplementedError:
        raise ModelError(
            f"tokenizer {tokenizer.name_or_path!r} cannot return character offsets (a slow tokenizer); "
            "dualkd needs a fast (Rust) tokenizer"
        ) from None


def _last_line(prompt: str) -> str:
    """The prompt's last non-empty line (`### Response:`, a chat template's `<|assistant|>`)."""
    lines = [line for line in prompt.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _truncate_prompt(
    ids: list[int], offsets: list[tuple[int, int]], n_prefix: int, rules: TruncationRules
) -> tuple[list[int], list[tuple[int, int]]]:
    limit = rules.max_prompt_length
    if limit is None or len(ids) <= limit:
        return ids, offsets
    if rules.prompt_truncation == "keep_start":
        return ids[:limit], offsets[:limit]
    keep = max(limit - n_prefix, 0)  # keep_end: leading specials stay, then the last tokens
    return ids[:n_prefix] + ids[len(ids) - keep:], offsets[:n_prefix] + offsets[len(offsets) - keep:]


class TokenizedDataset:
    """Examples tokenized for the student and optionally the teacher; `collate(indices)` pads a batch."""

    def __init__(
        self,
        examples: list[Example],
        student: list[TokenizedExample],
        teacher: list[TokenizedExample] | None,
        student_pad_id: int,
        teacher_pad_id: int | None = None,
        pad_to_multiple_of: int | None = None,
        alignments: list[tuple[np.ndarray, np.ndarray]] | None = None,
        seq2seq: bool = False,
    ):
        self.seq2seq = seq2seq
        """Encoder-decoder examples: `ids` = source then target (`prompt_len` = source length)."""
        self.alignments = alignments
        self.examples = examples
        self.student = student
        self.teacher = teacher
        self.student_pad_id = student_pad_id
        self.teacher_pad_id = teacher_pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.lengths = [
            max(len(s.ids), len(teacher[i].ids) if teacher is not None else 0) - 1 for i, s in enumerate(student)
        ]

    def __len__(self) -> int:
        return len(self.student)

    def collate(self, indices: list[int]) -> Batch:
        return collate_examples(
            [self.student[i] for i in indices],
            [self.teacher[i] for i in indices] if self.teacher is not None else None,
            [self.alignments[i] for i in indices] if self.alignments is not None else None,
            indices, self.student_pad_id, self.teacher_pad_id, self.pad_to_multiple_of, self.seq2seq)

    @property
    def teacher_view(self) -> list[TokenizedExample]:
        """The tokens the teacher reads for each example."""
        return self.teacher if self.teacher is not None else self.student


def collate_examples(
    student: list[TokenizedExample],
    teacher: list[TokenizedExample] | None,
    alignments: list[tuple[np.ndarray, np.ndarray]] | None,
    indices: list[int],
    student_pad_id: int,
    teacher_pad_id: int | None,
    pad_to_multiple_of: int | None = None,
    seq2seq: bool = False,
) -> Batch:
    """Pad tokenized examples (dataset ones or student samples) into a Batch."""
    teacher_batch = None
    if teacher is not None:
        assert teacher_pad_id is not None
        teacher_batch = pad_batch(teacher, teacher_pad_id, pad_to_multiple_of)
    pad = pad_seq2seq if seq2seq else pad_batch
    return Batch(student=pad(student, student_pad_id, pad_to_multiple_of), teacher=teacher_batch,
                 indices=list(indices), alignment=stack_alignment(alignments) if alignments is not None else None)


TOKENIZE_CHUNK = 1024
"""Examples per tokenizer call. One call over a whole set holds every encoding (with offsets) at once: Dolly's
11,435 training examples with the GPT-2 tokenizer raised the peak RSS by 554 MiB in one call, 264 MiB in
chunks of 1,024 (4,096: 341 MiB; 256: 247 MiB), at the same speed."""


def _in_chunks(tokenize: Any, examples: list[Example], tokenizer: Any, rules: TruncationRules, cut: Truncation,
               label: str) -> list[TokenizedExample | DataError]:
    lines = ProgressLines(len(examples), label, None)
    out: list[TokenizedExample | DataError] = []
    for start in range(0, len(examples), TOKENIZE_CHUNK):
        part = examples[start:start + TOKENIZE_CHUNK]
        out += tokenize(part, tokenizer, rules, cut)
        lines.advance(len(part))
    return out


def make_dataset(
    examples: list[Example],
    report: LoadReport,
    cfg: DataConfig,
    student_tokenizer: Any,
    teacher_tokenizer: Any | None = None,
    aligner: Any | None = None,
    seq2seq: bool = False,
) -> TokenizedDataset:
    """Tokenize loaded examples. `teacher_tokenizer` is given only when the teacher reads different tokens than
    the student; `aligner` (align/pairs.py) then pairs their positions once, here. Examples that cannot be used
    raise, or are skipped and added to `report` (`on_error: skip`)."""
    rules = TruncationRules.from_config(cfg)
    if seq2seq and teacher_tokenizer is not None:
        raise ModelError("encoder-decoder distillation needs one tokenizer for student and teacher")
    tokenize = tokenize_seq2seq if seq2seq else tokenize_examples
    report.truncated["student"] = Truncation()
    per_model = [_in_chunks(tokenize, examples, student_tokenizer, rules, report.truncated["student"],
                            f"tokenizing {report.source}")]
    if teacher_tokenizer is not None:
        report.truncated["teacher"] = Truncation()
        per_model.append(_in_chunks(tokenize_examples, examples, teacher_tokenizer, rules, report.truncated["teacher"],
                                    f"tokenizing {report.source} for the teacher"))
    keep: list[int] = []
    for i in range(len(examples)):
        errors = [side[i] for side in per_model if isinstance(side[i], DataError)]
        if not errors:
            keep.append(i)
        elif cfg.on_error == "skip":
            report.skipped.append(str(errors[0]))
        else:
            raise errors[0]
    if not keep:
        raise DataError(f"{report.source}: no usable examples ({len(report.skipped)} skipped; first: "
                        f"{report.skipped[0]})")
    report.kept = len(keep)
    student = [per_model[0][i] for i in keep]
    teacher = [per_model[1][i] for i in keep] if teacher_tokenizer is not None else None
    alignments = None
    if aligner is not None:
        if teacher is None:
            raise ValueError("an aligner needs the teacher's own tokenization")
        alignments = aligner(student, teacher)
    return TokenizedDataset(
        examples=[examples[i] for i in keep],
        student=student,  # type: ignore[arg-type]
        teacher=teacher,  # type: ignore[arg-type]
        student_pad_id=pad_id(student_tokenizer),
        teacher_pad_id=pad_id(teacher_tokenizer) if teacher_tokenizer is not None else None,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        alignments=alignments,
        seq2seq=seq2seq,
    )


def build_dataset(
    source: DataSource,
    cfg: DataConfig,
    student_tokenizer: Any,
    teacher_tokenizer: Any | None = None,
    max_examples: int | None = None,
) -> tuple[TokenizedDataset, LoadReport]:
    """Read, validate and tokenize one source (see `make_dataset`)."""
    examples, report = load_examples(source, cfg.format, cfg.on_error, max_examples)
    return make_dataset(examples, report, cfg, student_tokenizer, teacher_tokenizer), report


def with_teacher_view(dataset: TokenizedDataset, cfg: DataConfig, teacher_tokenizer: Any, aligner: Any | None,
                      label: str) -> TokenizedDataset:
    """The same examples in the same order, the student's tokens kept, with `teacher_tokenizer`'s tokens as
    the teacher view (paired with the student's by `aligner` where given): one of several teachers' views
    (teachers/several.py). Every teacher must read every example the student kept, so an example this
    tokenizer cannot use is refused (whatever `on_error` says) with its reason."""
    if dataset.seq2seq:
        raise ModelError("encoder-decoder distillation needs one tokenizer for student and teacher")
    rules = TruncationRules.from_config(cfg)
    teacher = _in_chunks(tokenize_examples, dataset.examples, teacher_tokenizer, rules, Truncation(), label)
    errors = [t for t in teacher if isinstance(t, DataError)]
    if errors:
        raise DataError(f"{errors[0]} ({len(errors)} example(s) the student's tokenizer kept but this teacher's "
                        "cannot use; several teachers must read the same examples)")
    views: list[TokenizedExample] = teacher  # type: ignore[assignment]
    return TokenizedDataset(
        examples=dataset.examples, student=dataset.student, teacher=views, student_pad_id=dataset.student_pad_id,
        teacher_pad_id=pad_id(teacher_tokenizer), pad_to_multiple_of=dataset.pad_to_multiple_of,
        alignments=aligner(dataset.student, views) if aligner is not None else None)
