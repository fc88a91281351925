"""The span groups of a batch (align/groups.py) as row indices of each side's response rows: what GOLD and
X-Token read, one group of student tokens and one of teacher tokens covering the same text.

    student, teacher = grouped_tokens(batch.student, batch.teacher_view)   # SideGroups each, G groups
    student.rows[student.bounds[g]:student.bounds[g + 1]]                  # the student's rows of group g

A response row is a position of the loss mask: row r predicts the r-th response token, so a group's rows are the
positions that predict its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dualkd.align.groups import span_groups
from dualkd.data.collate import ModelBatch


@dataclass
class SideGroups:
    """One side's tokens of G groups, listed group by group, as rows of its response rows (loss_mask order)."""

    rows: Tensor  # [R] response row of each group token
    group: Tensor  # [R] its group
    last: Tensor  # [R] bool: the group's last token (GOLD's merge keeps its whole distribution)
    bounds: Tensor  # [G + 1] where each group's tokens start in `rows` (CPU)


@dataclass
class GroupedTeacher:
    hidden: Tensor  # [N_t, d_t] the teacher's last hidden states at its response positions
    labels: Tensor  # [N_t] the tokens they predict
    student: SideGroups
    teacher: SideGroups


def _side(groups: list[list[int]], first_row: int) -> tuple[list[int], list[int], list[bool]]:
    rows, group, last = [], [], []
    for g, tokens in enumerate(groups):
        rows += [first_row + k for k in tokens]
        group += [g] * len(tokens)
        last += [False] * (len(tokens) - 1) + [True]
    return rows, group, last


def grouped_tokens(student: ModelBatch, teacher: ModelBatch) -> tuple[SideGroups, SideGroups]:
    """The span groups of every example of a batch, as row indices of each side's response rows."""
    out: dict[str, list[Any]] = {k: [] for k in ("s_rows", "s_group", "s_last", "t_rows", "t_group", "t_last")}
    s_first = t_first = g_first = 0
    for b in range(student.input_ids.shape[0]):
        side_tokens = []
        for tokens in (student, teacher):
            pos = tokens.loss_mask[b].nonzero().squeeze(1).cpu()  # position p predicts sequence token p + 1
            spans = tokens.offsets[b, pos + 1].cpu().tolist()
            real = [k for k, (a, e) in enumerate(spans) if e > a]  # EOS (and added tokens) have empty spans
            side_tokens.append((pos.numel(), real, [tuple(spans[k]) for k in real]))
        (s_n, s_real, s_spans), (t_n, t_real, t_spans) = side_tokens
        pairs = span_groups(s_spans, t_spans)
        s_groups = [[s_real[k] for k in s] for s, _ in pairs]
        t_groups = [[t_real[k] for k in t] for _, t in pairs]
        for prefix, groups, first in (("s", s_groups, s_first), ("t", t_groups, t_first)):
            rows, group, last = _side(groups, first)
            out[f"{prefix}_rows"] += rows
            out[f"{prefix}_group"] += [g + g_first for g in group]
            out[f"{prefix}_last"] += last
        s_first, t_first, g_first = s_first + s_n, t_first + t_n, g_first + len(pairs)

    def side(prefix: str, device: torch.device) -> SideGroups:
        group = torch.tensor(out[f"{prefix}_group"], dtype=torch.long)
        bounds = torch.searchsorted(group, torch.arange(g_first + 1))
        return SideGroups(torch.tensor(out[f"{prefix}_rows"], dtype=torch.long, device=device), group.to(device),
                          torch.tensor(out[f"{prefix}_last"], dtype=torch.bool, device=device), bounds)

    return side("s", student.input_ids.device), side("t", teacher.input_ids.device)
