"""Where a teacher's outputs come from: a live model or an offline cache, behind one protocol (base.py)."""

from dualkd.teachers.base import Teacher, response_rows
from dualkd.teachers.cached import CachedTeacher, cache_tokenizer
from dualkd.teachers.live import LiveTeacher

__all__ = ["CachedTeacher", "LiveTeacher", "Teacher", "cache_tokenizer", "response_rows"]
