"""Build what a run needs from its config: tokenized data, models, the teacher, the objective (after
train/prepare.py has made what must exist first: the examples and the student's tokenizer).

Everything that can fail because of the user's inputs fails here, before the first training step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dualkd.config import RunConfig
from dualkd.data.dataset import TokenizedDataset, make_dataset
from dualkd.data.formats import Example
from dualkd.data.preferences import make_preference_dataset
from dualkd.data.readers import LoadReport
from dualkd.errors import ConfigError
from dualkd.lm import is_seq2seq
from dualkd.methods import Objective, build_objective
from dualkd.methods.base import SetupContext
from dualkd.models import is_encoder_decoder, load_model, load_tokenizer, same_vocabulary
from dualkd.teachers import CachedTeacher, LiveTeacher, ServedTeacher, Teacher, cache_tokenizer
from dualkd.train.prepare import Prepared, prepare_run


@dataclass
class Parts:
    objective: Objective
    student: nn.Module
    teacher: Teacher | None
    """Where the teacher's outputs come from: a live model (placed by the loop), an offline cache or a server."""
    student_tokenizer: Any
    teacher_tokenizer: Any | None
    train_set: TokenizedDataset
    dev_set: TokenizedDataset | None
    reports: list[LoadReport]
    aligner: Any | None = None
    """Pairs student/teacher positions of two tokenizations (cross-tokenizer objectives); on-policy sources
    run it on student samples."""
    frozen: dict[str, nn.Module] | None = None
    """Extra frozen models of the objective (`teachers.<role>`), placed on the device with the teacher."""


def build_parts(cfg: RunConfig, run_dir: Path, engine: Any, objective: Objective | None = None,
                prepared: Prepared | None = None) -> Parts:
    """The run's parts. `objective`: one already built from `cfg.objective` (the loop builds it first, to tell
    the engine whether DDP must look for unused parameters); `prepared`: the run's examples and student
    tokenizer (train/prepare.py; prepared here when not given)."""
    objective = objective if objective is not None else build_objective(cfg.objective)
    # the teacher's outputs come from files: no teacher model is loaded
    cache_dir = cfg.teacher.cache if cfg.teacher is not None and objective.needs_teacher else None
    if objective.needs_teacher and cfg.teacher is None:
        raise ConfigError(f"objective `{cfg.objective.name}` needs a teacher: set `teacher.path`")

    data = cfg.data
    prepared = prepared if prepared is not None else prepare_run(cfg, run_dir, engine)
    student_tokenizer = prepared.student_tokenizer
    if cache_dir is not None:
        teacher_tokenizer = cache_tokenizer(cache_dir)
    else:
        teacher_tokenizer = (load_tokenizer(cfg.teacher, field="teacher") if objective.needs_teacher and cfg.teacher
                             else None)
    same = teacher_tokenizer is None or same_vocabulary(student_tokenizer, teacher_tokenizer)
    # the teacher reads its own tokenization only when an objective asks for it and the vocabularies differ
    own_teacher_tokens = teacher_tokenizer if objective.teacher_reads_own_tokens and not same else None
    aligner = objective.make_aligner(student_tokenizer, teacher_tokenizer) if own_teacher_tokens else None

    seq2seq = is_encoder_decoder(cfg.student)  # the encoder reads the prompt (source), the decoder the response

    def tokenized(examples: list[Example], report: LoadReport) -> Any:
        if objective.wants_pairs:  # DPO: both responses of each preference pair
            return make_preference_dataset(examples, report, data, student_tokenizer)
        return make_dataset(examples, report, data, student_tokenizer, own_teacher_tokens, aligner, seq2seq)

    train_set = tokenized(prepared.train_examples, prepared.train_report)
    dev_set = tokenized(prepared.dev_examples, prepared.dev_report) if prepared.dev_examples is not None else None

    student = load_model(cfg.student, student_tokenizer, role="student", seed=cfg.seed)
    teacher: Teacher | None = None
    if cache_dir is not None:
        cached = CachedTeacher(cache_dir, teacher_tokenizer, dtype=next(student.parameters()).dtype)
        assert cfg.teacher is not None
        source = cfg.teacher.tokenizer_source
        local = source is not None and Path(source).expanduser().is_dir()  # a hub id is named, not downloaded
        cached.check_teacher(cfg.teacher.path, load_tokenizer(cfg.teacher, field="teacher") if local else None)
        for split, dataset in (("train", train_set), ("dev", dev_set)):
            if dataset is not None:  # refuse a cache of other data, naming what differs
                cached.for_split(split).check(dataset.teacher_view)
        teacher = cached
    elif objective.needs_teacher and cfg.teacher is not None and cfg.teacher.server is not None:
        if seq2seq:
            raise ConfigError("teacher.server serves decoder-only teachers; an encoder-decoder student needs a live "
                              "teacher (`teacher.path`) or a cache")
        teacher = ServedTeacher.from_config(cfg.teacher.server, teacher_tokenizer, run_dir)
    elif objective.needs_teacher:
        assert cfg.teacher is not None
        model = load_model(cfg.teacher, teacher_tokenizer, role="teacher", seed=cfg.seed)
        if is_seq2seq(model) != seq2seq:
            raise ConfigError("the student and the teacher must both be encoder-decoder models or both decoder-only")
        teacher = LiveTeacher(model, teacher_tokenizer)
    frozen = _frozen_models(cfg, objective, student_tokenizer)
    # setup reads the heads (checks, pseudo-inverse projectors) and runs the models once: under ZeRO-3 they
    # were partitioned as they loaded, so they are gathered whole for it (transiently, on every process)
    with contextlib.ExitStack() as whole:
        for model in [student, *([teacher.model] if teacher is not None and "model" in teacher.provides else []),
                      *(frozen or {}).values()]:
            whole.enter_context(engine.gathered(model))
        objective.setup(SetupContext(student=student, teacher=teacher, student_tokenizer=student_tokenizer,
                                     teacher_tokenizer=teacher_tokenizer, same_tokenizer=same,
                                     student_pretrained=cfg.student.init != "random", frozen=frozen))
    reports = [r for r in (prepared.train_report, prepared.dev_report) if r is not None]
    return Parts(objective, student, teacher, student_tokenizer, teacher_tokenizer, train_set, dev_set, reports,
                 aligner, frozen)


def _frozen_models(cfg: RunConfig, objective: Objective, student_tokenizer: Any) -> dict[str, nn.Module]:
    """Load the objective's extra frozen models (`teachers.<role>`); each must read the student's tokens."""
    roles = objective.frozen_roles()
    missing = [r for r in roles if r not in cfg.teachers]
    if missing:
        raise ConfigError(f"objective `{cfg.objective.name}` needs " + "; ".join(
            f"`teachers.{r}.path`: {roles[r]}" for r in missing))
    unused = sorted(set(cfg.teachers) - set(roles))
    if unused:
        raise ConfigError(f"teachers.{unused[0]}: objective `{cfg.objective.name}` reads no such model "
                          f"(it reads: {sorted(roles) or 'none'})")
    frozen = {}
    for role in roles:
        spec = cfg.teachers[role]
        tokenizer = load_tokenizer(spec, field=f"teachers.{role}")
        if not same_vocabulary(student_tokenizer, tokenizer):
            raise ConfigError(f"teachers.{role}: its tokenizer differs from the student's; this objective needs one")
        frozen[role] = load_model(spec, tokenizer, role="teacher", seed=cfg.seed, field=f"teachers.{role}")
    return frozen
