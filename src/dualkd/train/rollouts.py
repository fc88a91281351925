"""Student samples as training examples (on-policy distillation).

A sample is the token ids the student generated for a dataset prompt. It becomes a `TokenizedExample` like
the dataset's own, so that every objective trains on it unchanged:
- student side: the gold prompt tokens + the sampled ids (+ EOS when the student ended its response), with
  character offsets taken from the tokens' bytes (`decode_with_offsets`);
- teacher side, when the teacher reads another tokenizer: the teacher's gold prompt tokens + the sampled text
  tokenized by the teacher tokenizer (the same call the dataset makes for a response), then the objective's
  aligner (ETA or MinED) pairs the positions exactly as at data-building time.

    rollouts = Rollouts(dataset, sampler, student_tokenizer, teacher_tokenizer, aligner)
    made = rollouts.sample([3, 17, 42], seed=1234)     # list[Rollout], one per dataset index
    batch = rollouts.collate(made)                      # a Batch of samples (the loop keeps the CE on the gold data)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dualkd.align.vocab import token_bytes
from dualkd.data.collate import Batch, TokenizedExample
from dualkd.data.dataset import TokenizedDataset, collate_examples
from dualkd.train.samplers import Sample, Sampler


@dataclass
class Rollout:
    """One student sample, tokenized for both models (teacher/pairs only for a teacher with its own tokens)."""

    student: TokenizedExample
    teacher: TokenizedExample | None
    pairs: tuple[np.ndarray, np.ndarray] | None
    index: int
    """The dataset example whose prompt was sampled from."""

    def to_json(self) -> dict[str, Any]:
        side = (lambda x: None if x is None else {"ids": x.ids, "offsets": [list(o) for o in x.offsets],
                                                  "prompt_len": x.prompt_len, "text": x.text,
                                                  "prompt_chars": x.prompt_chars})
        pairs = None if self.pairs is None else [self.pairs[0].tolist(), self.pairs[1].tolist()]
        return {"student": side(self.student), "teacher": side(self.teacher), "pairs": pairs, "index": self.index}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rollout:
        side = (lambda d: None if d is None else TokenizedExample(
            ids=d["ids"], offsets=[tuple(o) for o in d["offsets"]], prompt_len=d["prompt_len"], text=d["text"],
            prompt_chars=d["prompt_chars"]))
        pairs = None if data["pairs"] is None else (np.asarray(data["pairs"][0], dtype=np.int64),
                                                    np.asarray(data["pairs"][1], dtype=np.int64))
        return cls(side(data["student"]), side(data["teacher"]), pairs, data["index"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- bytes -> text


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with `lead` (0: not a valid lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def decode_with_offsets(pieces: list[bytes | None]) -> tuple[str, list[tuple[int, int]]]:
    """The text a sequence of token byte strings spells, and each token's character span in it.

    Valid UTF-8 decodes as usual; a byte that does not start a complete valid character becomes U+FFFD, so a
    text always exists (a random student emits stray bytes). A token's span covers every character its bytes
    touch: tokens that split one character share its span, and ETA never aligns tokens with overlapping
    spans. Tokens without text (special tokens) get an empty span at their position."""
    data = b"".join(p or b"" for p in pieces)
    if data.isascii():  # the common case: one byte is one character
        text = data.decode("ascii")
        spans, pos = [], 0
        for p in pieces:
            n = len(p or b"")
            spans.append((pos, pos + n))
            pos += n
        return text, spans
    chars: list[str] = []
    char_of_byte = [0] * len(data)
    i = 0
    while i < len(data):
        n = _utf8_length(data[i])
        ch = None
        if n and i + n <= len(data):
            try:
                ch = data[i:i + n].decode("utf-8")
            except UnicodeDecodeError:
                ch = None
        if ch is None:
            ch, n = "\ufffd", 1
        char_of_byte[i:i + n] = [len(chars)] * n
        chars.append(ch)
        i += n
    spans, pos = [], 0
    for p in pieces:
        if not p:
            at = char_of_byte[pos] if pos < len(data) else len(chars)
            spans.append((at, at))
            continue
        spans.append((char_of_byte[pos], char_of_byte[pos + len(p) - 1] + 1))
        pos += len(p)
    return "".join(chars), spans


def _prepends_space(tokenizer: Any, pieces: list[bytes | None]) -> bool:
    """SentencePiece-style tokenizers spell a text's first word with a leading `▁` that is not in the text;
    the first sampled token then carries a space the response text must not start with."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and (pieces[ids[0]] or b"").startswith(b" ")


# ----------------------------------------------------------------------------------------------- rollouts


class Rollouts:
    """Turns dataset prompts into student samples tokenized for the objective (see the module docstring)."""

    def __init__(self, dataset: TokenizedDataset, sampler: Sampler, student_tokenizer: Any,
                 teacher_tokenizer: Any | None = None, aligner: Any | None = None, max_length: int = 512,
                 pad_to_multiple_of: int | None = None):
        self.dataset = dataset
        self.sampler = sampler
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.student_bytes = token_bytes(student_tokenizer)
        self.strip_first_space = _prepends_space(student_tokenizer, self.student_bytes)
        self.student_eos = student_tokenizer.eos_token_id
        # the teacher re-tokenizes only when the dataset holds a separate teacher tokenization
        self.teacher_tokenizer = teacher_tokenizer if dataset.teacher is not None else None
        self.aligner = aligner if dataset.teacher is not None else None

    def sample(self, indices: list[int], seed: int, step: int = 0) -> list[Rollout]:
        """One rollout per dataset index: the student samples a response to the example's prompt."""
        gold = [self.dataset.student[i] for i in indices]
        samples = self.sampler([g.ids[: g.prompt_len] for g in gold], seed=seed, step=step)
        return self.from_samples(indices, samples)

    def from_samples(self, indices: list[int], samples: list[Sample]) -> list[Rollout]:
        students, response_texts = [], []
        for i, sample in zip(indices, samples):
            student, text = self._student_example(self.dataset.student[i], sample)
            students.append(student)
            response_texts.append((text, sample.ended))
        if self.teacher_tokenizer is None:
            return [Rollout(s, None, None, i) for s, i in zip(students, indices)]
        assert self.dataset.teacher is not None
        teachers = self._teacher_examples([self.dataset.teacher[i] for i in indices], response_texts)
        pairs = self.aligner(students, teachers) if self.aligner is not None else [None] * len(students)
        return [Rollout(s, t, p, i) for s, t, p, i in zip(students, teachers, pairs, indices)]

    def collate(self, rollouts: list[Rollout]) -> Batch:
        """A batch of rollouts (they have no gold: the loop trains them with `StepNorm.ce_weight` 0)."""
        has_teacher = bool(rollouts) and rollouts[0].teacher is not None
        has_pairs = bool(rollouts) and rollouts[0].pairs is not None
        return collate_examples(
            [r.student for r in rollouts],
            [r.teacher for r in rollouts] if has_teacher else None,  # type: ignore[misc]
            [r.pairs for r in rollouts] if has_pairs else None,  # type: ignore[misc]
            [r.index for r in rollouts], self.dataset.student_pad_id, self.dataset.teacher_pad_id,
            self.pad_to_multiple_of)

    # ------------------------------------------------------------------------------------------- sides
    def _student_example(self, gold: TokenizedExample, sample: Sample) -> tuple[TokenizedExample, str]:
        pieces = [self.student_bytes[t] if t < len(self.student_bytes) else None for t in sample.ids]
        if self.strip_first_space and pieces and pieces[0] and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        text, spans = decode_with_offsets(pieces)
        prompt_text = gold.text[: gold.prompt_chars]
        shift = len(prompt_text)
        ids = gold.ids[: gold.prompt_len] + list(sample.ids)
        offsets = gold.offsets[: gold.prompt_len] + [(s + shift, e + shift) for s, e in spans]
        if sample.ended and self.student_eos is not None:
            ids.append(self.student_eos)
            offsets.append((shift + len(text), shift + len(text)))
        example = TokenizedExample(ids=ids[: self.max_length], offsets=offsets[: self.max_length],
                                   prompt_len=gold.prompt_len, text=prompt_text + text, prompt_chars=shift)
        return example, text

    def _teacher_examples(self, gold: list[TokenizedExample], responses: list[tuple[str, bool]]
                          ) -> list[TokenizedExample]:
        tok = self.teacher_tokenizer
        texts = [t for t, _ in responses]
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        eos = tok.eos_token_id
        out = []
        for k, (g, (text, ended)) in enumerate(zip(gold, responses)):
            prompt_text = g.text[: g.prompt_chars]
            shift = len(prompt_text)
            ids = g.ids[: g.prompt_len] + list(enc["input_ids"][k])
            offsets = g.offsets[: g.prompt_len] + [(s + shift, e + shift) for s, e in enc["offset_mapping"][k]]
            if ended and eos is not None:
                ids.append(eos)
                offsets.append((shift + len(text), shift + len(text)))
            out.append(TokenizedExample(ids=ids[: self.max_length], offsets=offsets[: self.max_length],
                                        prompt_len=g.prompt_len, text=prompt_text + text, prompt_chars=shift))
        return out
