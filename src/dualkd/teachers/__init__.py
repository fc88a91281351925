"""Where a teacher's outputs come from: a live model, an offline cache or a server, behind one protocol (base.py)."""

from dualkd.teachers.base import Teacher, response_rows
from dualkd.teachers.cached import CachedTeacher, cache_tokenizer
from dualkd.teachers.live import LiveTeacher
from dualkd.teachers.served import ServedTeacher

__all__ = ["CachedTeacher", "LiveTeacher", "ServedTeacher", "Teacher", "cache_tokenizer", "response_rows"]
