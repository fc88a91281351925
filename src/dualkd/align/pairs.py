"""Aligners: which student positions pair with which teacher positions, for whole tokenized examples.

An aligner works on the response part of two tokenizations of one example and returns *label positions*
(position t predicts sequence token t + 1), the positions whose hidden states and logits the objectives
compare. It runs when the dataset is built (off-policy data) or when a batch is made (on-policy), on CPU.

- `ExactAligner`: ETA on character offsets (align/offsets.py) relative to the start of the response, so that
  chat templates that render the prompt differently still align the response text; the two EOS tokens
  are paired when both sequences keep theirs.
- `MinEDAligner`: DTW over the response tokens' texts with edit-distance costs (align/mined.py); a student
  position is paired when the path gives it exactly one teacher token.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Protocol

import numpy as np

from dualkd.align.mined import mined_alignment, token_texts
from dualkd.align.offsets import exact_alignment_many
from dualkd.data.collate import TokenizedExample

Pairs = tuple[np.ndarray, np.ndarray]  # (student label positions, teacher label positions), int64


class Aligner(Protocol):
    def __call__(self, students: list[TokenizedExample], teachers: list[TokenizedExample]) -> list[Pairs]: ...


def _response_offsets(examples: list[TokenizedExample]) -> list[np.ndarray]:
    """Every example's response offsets relative to the response start, from one NumPy conversion: [n_i, 2]."""
    lengths = [len(x.offsets) - x.prompt_len for x in examples]
    pairs = chain.from_iterable(x.offsets[x.prompt_len:] for x in examples)  # (start, end) of every token
    flat = np.fromiter(chain.from_iterable(pairs), dtype=np.int64, count=2 * sum(lengths)).reshape(-1, 2)
    flat -= np.repeat(np.array([x.prompt_chars for x in examples], dtype=np.int64), lengths)[:, None]
    return np.split(flat, np.cumsum(lengths)[:-1])


def _ends_with_eos(x: TokenizedExample, eos: int | None) -> bool:
    return eos is not None and len(x.ids) > x.prompt_len and x.ids[-1] == eos


class ExactAligner:
    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any):
        self.student_eos = student_tokenizer.eos_token_id
        self.teacher_eos = teacher_tokenizer.eos_token_id

    def __call__(self, students: list[TokenizedExample], teachers: list[TokenizedExample]) -> list[Pairs]:
        aligned = exact_alignment_many(_response_offsets(students), _response_offsets(teachers))
        out = []
        for s, t, (si, ti) in zip(students, teachers, aligned):
            s_pos, t_pos = si + s.prompt_len - 1, ti + t.prompt_len - 1
            if _ends_with_eos(s, self.student_eos) and _ends_with_eos(t, self.teacher_eos):
                s_pos = np.concatenate((s_pos, [len(s.ids) - 2]))
                t_pos = np.concatenate((t_pos, [len(t.ids) - 2]))
            out.append((s_pos, t_pos))
        return out


class MinEDAligner:
    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any):
        self.student_texts = token_texts(student_tokenizer)
        self.teacher_texts = token_texts(teacher_tokenizer)

    def __call__(self, students: list[TokenizedExample], teachers: list[TokenizedExample]) -> list[Pairs]:
        s_texts = [[self.student_texts[i] for i in s.ids[s.prompt_len:]] for s in students]
        t_texts = [[self.teacher_texts[i] for i in t.ids[t.prompt_len:]] for t in teachers]
        out = []
        for s, t, partner in zip(students, teachers, mined_alignment(s_texts, t_texts)):
            keep = np.flatnonzero(partner.numpy() >= 0)
            out.append((keep + s.prompt_len - 1, partner.numpy()[keep] + t.prompt_len - 1))
        return out
