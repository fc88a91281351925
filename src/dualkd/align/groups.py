"""Span groups: two tokenizations of one text cut at the character boundaries they share.

    groups = span_groups(student_spans, teacher_spans)     # [(student token indices, teacher token indices)]

Walk both token lists by their end characters, advancing the side whose token ends first; where both end at
the same character the group closes: its student tokens and its teacher tokens cover exactly the same text
(GOLD's alignment, TRL `GOLDTrainer`, which walks byte offsets; here character offsets, so the byte pieces of
one character, which report the same span, always stay in one group). A group is kept only if both sides
start at the same character; a trailing part that never reaches a shared boundary (a truncated side) is
dropped. Spans must be non-empty (callers leave out EOS and other added tokens) and in text order.
"""

from __future__ import annotations

from collections.abc import Sequence


def span_groups(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]]
                ) -> list[tuple[list[int], list[int]]]:
    """Groups of token indices (student, teacher) covering the same text, in text order (module docstring)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = first_i = first_j = 0
    n, m = len(student), len(teacher)
    while i < n and j < m:
        s_end, t_end = student[i][1], teacher[j][1]
        if s_end < t_end:
            i += 1
        elif s_end > t_end:
            j += 1
        else:
            i, j = i + 1, j + 1
            while i < n and student[i][1] == s_end:  # byte pieces of the same character
                i += 1
            while j < m and teacher[j][1] == t_end:
                j += 1
            if student[first_i][0] == teacher[first_j][0]:
                groups.append((list(range(first_i, i)), list(range(first_j, j))))
            first_i, first_j = i, j
    return groups
