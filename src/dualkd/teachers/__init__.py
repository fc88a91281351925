"""Where a teacher's outputs come from: a live model, an offline cache or a server, behind one protocol (base.py),
each opened from its config section by one factory (spec.py: `open_teacher`; the kinds: kinds.py); several
teachers at once are one more kind (several.py)."""

from dualkd.teachers.base import Teacher, response_rows
from dualkd.teachers.cached import CachedTeacher, CachedTeacherConfig, cache_tokenizer
from dualkd.teachers.kinds import KINDS, TeacherConfig
from dualkd.teachers.live import LiveTeacher, LiveTeacherConfig
from dualkd.teachers.served import ServedTeacher, ServedTeacherConfig, TeacherServer
from dualkd.teachers.spec import TeacherSite, TeacherSpec, open_teacher

__all__ = ["KINDS", "CachedTeacher", "CachedTeacherConfig", "LiveTeacher", "LiveTeacherConfig", "ServedTeacher",
           "ServedTeacherConfig", "Teacher", "TeacherConfig", "TeacherServer", "TeacherSite", "TeacherSpec",
           "cache_tokenizer", "open_teacher", "response_rows"]
