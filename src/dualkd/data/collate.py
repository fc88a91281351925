"""Tokenized examples and their padding into batches.

Conventions (used by every objective):
- a sequence is prompt + response (+ EOS), `L` tokens; the model reads the first `T = L - 1` of them and
  predicts `labels[t] = ids[t + 1]`;
- `loss_mask[t]` is True where `labels[t]` is a response token (or the EOS): boolean, never -100;
- `offsets[t]` is the character span of sequence token `t` in `texts[b]` (prompt + response), for all `L`
  tokens; added special tokens (BOS, EOS) have empty spans; padding is (-1, -1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor


@dataclass
class TokenizedExample:
    ids: list[int]
    """prompt + response (+ EOS), after truncation: L tokens."""
    offsets: list[tuple[int, int]]
    """Character span of each token in `text`."""
    prompt_len: int
    """How many of `ids` belong to the prompt."""
    text: str
    """prompt text + response text."""
    prompt_chars: int
    """len(prompt text): where the response starts in `text`."""


@dataclass
class ModelBatch:
    """One model's view of a batch, right-padded to the longest sequence."""

    input_ids: Tensor  # [B, T] long
    attention_mask: Tensor  # [B, T] long
    labels: Tensor  # [B, T] long, next token (0 where there is none)
    loss_mask: Tensor  # [B, T] bool, True on response tokens and EOS
    offsets: Tensor  # [B, T + 1, 2] long, char spans of all sequence tokens; -1 on padding
    prompt_lengths: Tensor  # [B] long
    texts: list[str]
    prompt_chars: list[int]

    def to(self, device: torch.device | str) -> ModelBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return replace(self, **moved)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def num_input_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Alignment:
    """Pairs of label positions, student side and teacher side, over a batch: pair k is
    (batch_index[k], student_pos[k]) <-> (batch_index[k], teacher_pos[k])."""

    batch_index: Tensor  # [P] long
    student_pos: Tensor  # [P] long
    teacher_pos: Tensor  # [P] long

    def to(self, device: torch.device | str) -> Alignment:
        return Alignment(*(t.to(device, non_blocking=True) for t in (self.batch_index, self.student_pos,
                                                                      self.teacher_pos)))

    def __len__(self) -> int:
        return int(self.batch_index.numel())


@dataclass
class Batch:
    """What the loop hands an objective: the student's tokens and, for cross-tokenizer objectives, the teacher's."""

    student: ModelBatch
    teacher: ModelBatch | None
    """None when the teacher reads the student's tokens (same tokenizer)."""
    indices: list[int]
    """Dataset indices of the examples (for logging and sources that need them). A preference batch
    (data/preferences.py) has one index per pair and two rows per index: the chosen responses, then the
    rejected ones."""
    alignment: Alignment | None = None
    """Student/teacher position pairs, for objectives that align two tokenizations (ETA, MinED)."""

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, student=self.student.to(device),
                       teacher=self.teacher.to(device) if self.teacher is not None else None,
                       alignment=self.alignment.to(device) if self.alignment is not None else None)

    @property
    def teacher_view(self) -> ModelBatch:
        """The tokens the teacher reads."""
        return self.teacher if self.teacher is not None else self.student


def stack_alignment(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Alignment:
    """Per-example (student positions, teacher positions) -> one Alignment over the batch."""
    index = [np.full(len(s), b, dtype=np.int64) for b, (s, _) in enumerate(pairs)]
    cat = (lambda xs: torch.from_numpy(np.concatenate(xs)).long() if xs else torch.zeros(0, dtype=torch.long))
    return Alignment(cat(index), cat([s for s, _ in pairs]), cat([t for _, t in pairs]))


def pad_batch(items: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int | None = None) -> ModelBatch:
    """Right-pad to the longest sequence in `items` (dynamic padding). The rows are built as Python lists and
    made into one tensor per field (per-example tensor writes cost ~3 ms a batch of 32, as much as a tiny model's
    step)."""
    seq_len = max(len(x.ids) for x in items)
    T = seq_len - 1
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, attention_mask, labels, loss_mask, offsets = [], [], [], [], []
    for x in items:
        n = len(x.ids) - 1  # input positions of this example
        pad = T - n
        input_ids.append(x.ids[:-1] + [pad_id] * pad)
        attention_mask.append([1] * n + [0] * pad)
        labels.append(x.ids[1:] + [0] * pad)
        # label t is ids[t + 1]: a response token iff t + 1 >= prompt_len
        start = min(max(x.prompt_len - 1, 0), n)
        loss_mask.append([False] * start + [True] * (n - start) + [False] * pad)
        offsets.append(list(x.offsets) + [(-1, -1)] * pad)
    return ModelBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        attention_mask=torch.tensor(attention_mask, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        loss_mask=torch.tensor(loss_mask, dtype=torch.bool),
        offsets=torch.tensor(offsets, dtype=torch.long),  # [B, T + 1, 2]
        prompt_lengths=torch.tensor([x.prompt_len for x in items], dtype=torch.long),
        texts=[x.text for x in items],
        prompt_chars=[x.prompt_chars for x in items],
    )


def pad_seq2seq(items: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int | None = None) -> ModelBatch:
    """Encoder-decoder examples (`ids` = source + target, `prompt_len` = source length): the sources right-padded
    as `input_ids` [B, S]; the targets as `labels` [B, T] with `loss_mask` on every target token (the model
    builds its decoder inputs by shifting the labels right behind its start token). Offsets are -1: character
    alignment is not used for translation."""
    S = max(x.prompt_len for x in items)
    T = max(len(x.ids) - x.prompt_len for x in items)
    if pad_to_multiple_of:
        S, T = (-(-n // pad_to_multiple_of) * pad_to_multiple_of for n in (S, T))
    B = len(items)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    labels = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, x in enumerate(items):
        source, target = x.ids[: x.prompt_len], x.ids[x.prompt_len:]
        input_ids[b, : len(source)] = torch.tensor(source, dtype=torch.long)
        attention_mask[b, : len(source)] = 1
        labels[b, : len(target)] = torch.tensor(target, dtype=torch.long)
        loss_mask[b, : len(target)] = True
    return ModelBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, loss_mask=loss_mask,
                      offsets=torch.full((B, T + 1, 2), -1, dtype=torch.long),
                      prompt_lengths=torch.tensor([x.prompt_len for x in items], dtype=torch.long),
                      texts=[x.text for x in items], prompt_chars=[x.prompt_chars for x in items])
