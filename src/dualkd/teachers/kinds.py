"""The teacher kinds a run config can name (`teacher.kind`), and the field type that reads a teacher section.

A new kind: its file (a `TeacherSpec` subclass with `kind: Literal["name"]` and `open`, and its `Teacher`),
and one line here.
"""

from __future__ import annotations

from dualkd.schema import of_kind
from dualkd.teachers.cached import CachedTeacherConfig
from dualkd.teachers.live import LiveTeacherConfig
from dualkd.teachers.served import ServedTeacherConfig
from dualkd.teachers.served_hidden import ServedHiddenTeacherConfig
from dualkd.teachers.several import SeveralTeachersConfig
from dualkd.teachers.spec import KINDS, TeacherSpec

KINDS.update({
    "live": LiveTeacherConfig,
    "cache": CachedTeacherConfig,
    "server": ServedTeacherConfig,
    "hidden_server": ServedHiddenTeacherConfig,
    "several": SeveralTeachersConfig,
})

TeacherConfig = of_kind(TeacherSpec)
"""A teacher section of a run config, validated into the class of its kind."""
