"""Cross-tokenizer alignment: pure text logic on character offsets, computed at collation time on CPU.

    exact_alignment(student_offsets, teacher_offsets) -> (student_index, teacher_index)
"""

from dualkd.align.offsets import exact_alignment

__all__ = ["exact_alignment"]
